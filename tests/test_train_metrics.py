"""Epochs, metrics records (MFU, memory), plots, TensorBoard as an optional dependency."""

import json
import time
from types import SimpleNamespace

import pytest

from slms.cli import main
from slms.config import model_config_from_dict
from slms.data.loader import PackedData
from slms.model import GPT, IGNORE_INDEX
from slms.train.metrics import MetricsWriter, TensorBoardMissingError, read_metrics
from test_model import counted_flops  # torch's FLOP count of a training step
from train_helpers import TINY

BLOCK = 400  # the stories below are 300-480 tokens: padded rows and full (truncated) rows


@pytest.fixture(scope="module")
def epoch_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("epochs") / "run"
    assert main(["train", "configs/tiny.toml", f"data.path={data_dir}", *TINY,
                 "train.epochs=0.005", "train.peak_flops=1e12", "--out", str(out)]) == 0
    return out


def test_epochs_set_the_total_steps(epoch_run, data_dir):
    meta = json.loads((data_dir / "meta.json").read_text())
    expected = -(-0.005 * meta["splits"]["train"]["tokens"] // (4 * 32))  # ceil
    saved = json.loads((epoch_run / "run_config.json").read_text())
    assert saved["train"]["max_steps"] == expected == 5
    assert [r["step"] for r in read_metrics(epoch_run) if "loss" in r] == [1, 2, 3, 4, 5]


def test_records_have_the_lr_each_step_used(epoch_run):
    """Step s logs the learning rate its update was taken with (the schedule at index s - 1),
    not the next step's: the last step of a schedule that decays to 0 still shows its own."""
    from slms.config import run_config_from_dict
    from slms.train.optim import lr_factor

    tc = run_config_from_dict(json.loads((epoch_run / "run_config.json").read_text())).train
    logged = [(r["step"], r["lr"]) for r in read_metrics(epoch_run) if "loss" in r]
    assert logged == [(s, pytest.approx(tc.lr * lr_factor(s - 1, tc))) for s, _ in logged]
    assert logged[-1][1] > tc.lr * lr_factor(tc.max_steps, tc)


def test_records_have_throughput_and_memory(epoch_run):
    for r in (r for r in read_metrics(epoch_run) if "loss" in r):
        assert r["tokens_per_s"] > 0 and r["memory_gb"] > 0 and r["grad_norm"] > 0
        assert r["tokens"] == r["step"] * 4 * 32 and len(r["moe"]) == 2


@pytest.fixture(scope="module")
def clocked_run(tmp_path_factory, stories, tokenizer):
    """Three steps on padded rows, on a clock that advances exactly 1 s per training step (and
    not at all elsewhere): its throughput records are exact numbers, not timings."""
    import slms.train.trainer as trainer
    from slms.data.prepare import PrepareOptions, prepare_source
    from slms.data.sources import Source

    tmp = tmp_path_factory.mktemp("clocked")
    chosen = {"train": stories[:24], "val": stories[24:26]}
    src = Source(None)
    src.iter = lambda split: iter(chosen[split])
    prepare_source(src, tokenizer, tmp / "pad", PrepareOptions(layout="padded", block_size=BLOCK))
    now = [0.0]
    real_step = trainer.train_step

    def one_second_step(*args, **kwargs):
        now[0] += 1.0
        return real_step(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "train_step", one_second_step)
        clock = SimpleNamespace(**{**vars(time), "perf_counter": lambda: now[0]})
        mp.setattr(trainer, "time", clock)
        assert main(["train", "configs/tiny.toml", f"data.path={tmp / 'pad'}", *TINY,
                     f"model.block_size={BLOCK}", "train.max_steps=3", "train.peak_flops=1e12",
                     "--out", str(tmp / "run")]) == 0
    return tmp / "run", PackedData(tmp / "pad")


def test_mfu_is_measured_flops_of_real_tokens_over_the_peak(clocked_run, monkeypatch):
    """tokens_per_s counts the real targets of the window (not the B x T positions, pads
    included); mfu = FLOPs per token, as torch counts them in a training step with the full
    T x T attention (the PaLM convention), x tokens_per_s / train.peak_flops."""
    run, data = clocked_run
    cfg = json.loads((run / "run_config.json").read_text())
    model = GPT(model_config_from_dict(cfg["model"]))
    total, _ = counted_flops(model, 1, BLOCK, monkeypatch)
    measured_per_token = total / BLOCK
    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    seen = 0
    for r in records:
        _, y = data.train_batch(4, BLOCK, cfg["train"]["seed"], r["step"] - 1)
        real = int((y != IGNORE_INDEX).sum())
        seen += real
        assert r["tokens_per_s"] == real  # one step of one second
        assert r["tokens"] == seen
        assert r["mfu"] == pytest.approx(measured_per_token * real / 1e12, rel=1e-12)
    assert seen < 3 * 4 * BLOCK  # the batches hold pads: counting positions would differ


def test_plot_writes_labelled_pngs(epoch_run, capsys):
    assert main(["plot", str(epoch_run)]) == 0
    out = capsys.readouterr().out
    for name in ("loss.png", "expert_load.png"):
        png = epoch_run / name
        assert f"wrote {png}" in out and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(epoch_run / "nothing")]) == 2


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(TensorBoardMissingError, match="pip install tensorboard"):
        MetricsWriter(tmp_path / "metrics.jsonl", tensorboard=True)
