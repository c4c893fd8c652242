import json
import subprocess
import sys

import pytest

from slms.cli import main
from slms.train.metrics import read_metrics

TINY = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=32",
        "model.moe.expert_hidden=32", "train.batch_size=4", "train.log_every=2",
        "train.eval_every=3", "train.checkpoint_every=3", "train.warmup_steps=2"]


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "slms", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for cmd in ("demo", "corpus", "tokenizer", "prepare", "train", "info", "generate"):
        assert f"    {cmd}" in out


@pytest.mark.slow
def test_pipeline_end_to_end(tmp_path, capsys):
    d = tmp_path
    assert main(["corpus", "--out", str(d / "corpus"), "--stories", "200", "--seed", "3"]) == 0
    assert main(["tokenizer", "--data", str(d / "corpus"), "--vocab-size", "320",
                 "--out", str(d / "tok.json")]) == 0
    assert main(["prepare", "--source", str(d / "corpus"), "--tokenizer", str(d / "tok.json"),
                 "--out", str(d / "data"), "--train-count", "150"]) == 0
    meta = json.loads((d / "data" / "meta.json").read_text())
    assert meta["splits"]["train"]["stories"] == 150 and meta["splits"]["val"]["stories"] == 10
    assert main(["train", "configs/tiny.toml", f"data.path={d / 'data'}", "train.max_steps=6",
                 *TINY, "--out", str(d / "run")]) == 0
    records = read_metrics(d / "run")
    train_recs = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train_recs] == [2, 4, 6]
    assert [r["step"] for r in evals] == [3, 6]
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in train_recs)
    assert len(train_recs[0]["moe"]) == 2  # one entry per MoE layer
    assert (d / "run" / "best" / "model.safetensors").is_file()
    assert (d / "run" / "checkpoints" / "step-6" / "trainer.pt").is_file()
    capsys.readouterr()
    assert main(["generate", str(d / "run"), "--prompt", "Once upon a time",
                 "--max-new-tokens", "10", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Once upon a time") and len(out) > len("Once upon a time")


def test_info_prints_the_true_seed_count(capsys):
    assert main(["info", "configs/seed-moe.toml", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params_total"] == 54_992_576
    assert info["params_active"] == 17_151_680
    from slms.config import load_config
    from slms.model import flops_per_token  # measured against torch's count in test_model.py

    assert info["flops_per_token"] == flops_per_token(load_config("configs/seed-moe.toml").model)
    assert main(["info", "seed-moe"]) == 0
    assert "54,992,576" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["train", "configs/tiny.toml", "train.max_stepz=1"], "unknown config key"),
    (["train", "configs/missing.toml"], "not found"),
    (["generate", "no/such/run"], "not found"),
    (["prepare", "--source", "missing.txt", "--tokenizer", "missing.json", "--out", "x"],
     "tokenizer file missing.json not found"),
])
def test_user_mistakes_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("slms: error:")


def test_vocab_mismatch_is_a_clear_error(data_dir, capsys, tmp_path):
    argv = ["train", "configs/tiny.toml", f"data.path={data_dir}", "model.vocab_size=512",
            "train.max_steps=1", "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    assert "300-token vocab but model.vocab_size is 512" in capsys.readouterr().err


def test_prompt_too_long(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    assert main(["train", "configs/tiny.toml", f"data.path={data_dir}", "train.max_steps=1",
                 *TINY, "--out", str(run)]) == 0
    long_prompt = "Once upon a time " * 20
    assert main(["generate", str(run), "--prompt", long_prompt, "--max-new-tokens", "8"]) == 2
    assert "--truncate left" in capsys.readouterr().err
    assert main(["generate", str(run), "--prompt", long_prompt, "--max-new-tokens", "8",
                 "--truncate", "left"]) == 0
    assert "truncated" in capsys.readouterr().err


def test_parsing_imports_no_torch():
    # `slms --help` stays fast: the commands import their work inside run()
    code = ("import sys\nfrom slms.cli import build_parser\n"
            "build_parser().parse_args(['train', 'tiny', 'train.max_steps=1'])\n"
            "print(sorted(m for m in ('torch', 'numpy', 'tokenizers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_every_command_is_a_module_with_help_arguments_and_run():
    import argparse

    from slms.cli import COMMANDS, build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == list(COMMANDS)
    for name, module in COMMANDS.items():
        assert module.HELP and callable(module.add_arguments) and callable(module.run), name
        assert sub.choices[name].get_default("command") is module
