"""train.precision=auto: bf16 where a measured probe says bf16 matmuls are fast."""

import json

import pytest
import torch

from slms import precision


@pytest.mark.parametrize("speedup,expected", [(4.2, "bf16"), (1.0, "fp32"), (0.0025, "fp32")])
def test_auto_follows_the_probe(speedup, expected, monkeypatch, tmp_path):
    """A CPU with AMX (bf16 ~4x fp32) gets bf16; one without bf16 units (~400x slower) fp32."""
    monkeypatch.setenv("SLMS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(precision, "measure_speedup", lambda: speedup)
    assert precision.resolve_precision("auto", torch.device("cpu")) == expected
    for explicit in ("fp32", "bf16", "fp16"):
        assert precision.resolve_precision(explicit, torch.device("cpu")) == explicit


def test_auto_is_the_default():
    from slms.config import TrainConfig

    assert TrainConfig().precision == "auto"


def test_the_probe_runs_once_per_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("SLMS_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(precision, "measure_speedup", lambda: calls.append(1) or 3.0)
    for _ in range(3):
        assert precision.cpu_bf16_speedup() == 3.0
    assert calls == [1]
    cached = json.loads((tmp_path / "precision.json").read_text())
    assert list(cached.values()) == [3.0] and precision.cpu_model() in next(iter(cached))


def test_the_real_probe_measures_a_ratio():
    ratio = precision.measure_speedup(n=64, repeats=2)
    assert ratio > 0 and ratio != 1.0


def test_training_with_auto_records_what_it_chose(monkeypatch, tmp_path, data_dir):
    from slms.cli import main
    from slms.rundir import RunDir

    monkeypatch.setenv("SLMS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(precision, "measure_speedup", lambda: 0.01)  # no bf16 units
    argv = ["train", "configs/tiny.toml", f"data.path={data_dir}", "train.precision=auto",
            "train.max_steps=1", "model.n_layer=1", "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    assert RunDir(tmp_path / "run").read_config()["train"]["precision"] == "fp32"


def test_generate_and_bench_take_a_precision(tmp_path, tokenizer, capsys):
    from conftest import tiny_config
    from slms.checkpoint import save_checkpoint
    from slms.cli import main
    from slms.model import GPT

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "ck", GPT(tiny_config(moe=True)), tokenizer)
    outs = []
    for p in ("fp32", "bf16"):
        assert main(["generate", str(ckpt), "--prompt", "Once", "--max-new-tokens", "6",
                     "--temperature", "0", "--precision", p]) == 0
        outs.append(capsys.readouterr().out)
    assert all(o.startswith("Once") and len(o) > len("Once\n") for o in outs)
    assert main(["bench", str(ckpt), "--precision", "bf16", "--new-tokens", "4",
                 "--b8-new-tokens", "2", "--train-steps", "1", "--train-block", "16",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["precision"] == "bfloat16" and r["train_tokens_per_s"] > 0


@pytest.mark.parametrize("matmul,decode,training,generation", [
    (4.0, 2.0, "bf16", torch.bfloat16),  # AMX-like: bf16 fast for both
    (3.3, 0.7, "bf16", torch.float32),  # fast large matmuls, slow one-row ones: fp32 weights
    (0.0025, 0.01, "fp32", torch.float32),  # no bf16 units
])
def test_generation_auto_also_needs_fast_one_row_matmuls(matmul, decode, training, generation,
                                                         monkeypatch, tmp_path):
    monkeypatch.setenv("SLMS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(precision, "measure_speedup", lambda: matmul)
    monkeypatch.setattr(precision, "measure_decode_speedup", lambda: decode)
    cpu = torch.device("cpu")
    assert precision.resolve_precision("auto", cpu) == training
    assert precision.inference_dtype("auto", cpu) == generation
    assert precision.inference_dtype("bf16", cpu) == torch.bfloat16  # explicit: as asked


def test_the_real_decode_probe_measures_a_ratio():
    assert precision.measure_decode_speedup(width=64, repeats=2, calls=5) > 0
