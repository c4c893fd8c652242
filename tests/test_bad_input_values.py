"""Numbers out of their range, non-finite numbers and devices this machine lacks: in a config
(checked once, from each field's Range) and in a command's options (one argparse type): one
`slms: error` line naming the key or the option, exit status 2, nothing written."""

import dataclasses
import math

import pytest
import torch

from slms.cli import main
from slms.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    MoEConfig,
    TrainConfig,
    load_config,
)
from slms.ranges import numeric_type, range_of

SECTIONS = [("model", ModelConfig), ("model.moe", MoEConfig), ("data", DataConfig),
            ("train", TrainConfig)]
def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of `slms argv`; argparse's refusals exit through SystemExit."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def one_line_error(argv: list[str], capsys) -> str:
    code, err = run_cli(argv, capsys)
    assert code == 2 and err.startswith("slms: error: ") and err.count("\n") == 1, err
    return err


def numeric_fields():
    from slms.config import _field_types

    for prefix, cls in SECTIONS:
        hints = _field_types(cls)
        for f in dataclasses.fields(cls):
            kind = numeric_type(hints[f.name])
            if kind is not None:
                yield prefix, cls, f.name, kind


FIELDS = list(numeric_fields())


def overrides_for(prefix: str) -> list[str]:
    return ["model.moe.n_experts=4"] if prefix == "model.moe" else []


def test_every_numeric_config_field_has_a_range():
    assert len(FIELDS) > 40
    missing = [f"{p}.{n}" for p, cls, n, _ in FIELDS if range_of(cls, n) is None]
    assert missing == []
    for p, cls, n, _ in FIELDS:  # each default is in its own range
        default = getattr(cls(), n)
        assert default is None or range_of(cls, n).holds(default), f"{p}.{n}"


@pytest.mark.parametrize("prefix,cls,name,kind", FIELDS, ids=lambda x: getattr(x, "__name__", x))
def test_every_numeric_field_refuses_non_finite_and_huge_values(prefix, cls, name, kind):
    bad = ["inf", "-inf", "nan", "1e400"] if kind is float else [str(2**64), str(-2**64)]
    for value in bad:
        with pytest.raises(ConfigError) as e:
            load_config(None, [*overrides_for(prefix), f"{prefix}.{name}={value}"])
        msg = str(e.value)
        assert msg.startswith(f"{prefix}.{name} must be ") and "\n" not in msg, msg
    with pytest.raises(ConfigError, match=f"^{prefix}.{name} must be"):  # a config made in code
        made = cls(**{name: math.nan if kind is float else 2**64})
        made.validate(4) if cls is MoEConfig else made.validate()


@pytest.mark.parametrize("override,words", [  # the cases of #28
    ("train.max_minutes=inf", "train.max_minutes must be a finite number in [0, 10,000,000]"),
    ("train.epochs=inf", "train.epochs must be a finite number"),
    ("model.moe.capacity_factor=inf", "model.moe.capacity_factor must be a finite number"),
    ("train.beta1=1.5", "train.beta1 must be a finite number in [0, 1), got 1.5"),
    ("model.moe.bias_update_rate=nan", "model.moe.bias_update_rate must be a finite number"),
    ("model.logit_softcap=inf", "model.logit_softcap must be a finite number >= 0 (0 = off)"),
    ("train.weight_decay=nan", "train.weight_decay must be a finite number >= 0, got nan"),
    (f"train.seed={2**64}", "train.seed must be an integer between 0 and "),
    ("train.seed=-1", "train.seed must be an integer between 0 and "),
    ("train.lr=0", "train.lr must be a finite number > 0, got 0.0"),
    ("model.dropout=1", "model.dropout must be a finite number in [0, 1)"),
    ("data.vocab_size=0", "data.vocab_size must be an integer between 1 and "),
    ("train.threads=-1", "train.threads must be an integer between 0 and 4,096"),
    (f"train.lr={10**400}", "train.lr must be a finite number, got 1000"),
    ("train.device=nonsense", "train.device must be auto, cpu, cuda, cuda:N or mps"),
    ("train.device=cuda:x", "train.device must be auto, cpu, cuda, cuda:N or mps"),
])
def test_bad_numbers_in_a_config_are_one_line_and_nothing_is_written(override, words, tmp_path,
                                                                      capsys):
    out = tmp_path / "run"
    err = one_line_error(["train", "tiny", override, "train.max_steps=1", "--out", out], capsys)
    assert words in err
    assert not out.exists()


def test_a_toml_file_that_is_not_utf8_names_the_file_and_the_fix(tmp_path, capsys):
    f = tmp_path / "latin1.toml"
    f.write_bytes('name = "caf\u00e9"\n'.encode("latin-1"))
    err = one_line_error(["train", f], capsys)
    assert f"{f} is not UTF-8 text (byte 0xe9 at offset 11): save it as UTF-8" in err


# --- the options of the tools: one argparse type --------------------------------------------

BAD_OPTIONS = [  # (argv, words)
    (["eval", "{ckpt}", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
    (["eval", "{ckpt}", "--batch-size", "-1"], "argument --batch-size: must be an integer >= 1"),
    (["upcycle", "{ckpt}", "--out", "{tmp}/moe", "--expert-noise", "inf"],
     "argument --expert-noise: must be a finite number >= 0, got inf"),
    (["upcycle", "{ckpt}", "--out", "{tmp}/moe", "--expert-noise", "nan"],
     "argument --expert-noise: must be a finite number >= 0, got nan"),
    (["bench", "tiny", "--train-steps", "0"], "argument --train-steps: must be an integer >= 1"),
    (["bench", "tiny", "--prompt-tokens", "0"], "argument --prompt-tokens: must be an integer"),
    (["bench", "tiny", "--threads", "-1"], "argument --threads: must be an integer between 0"),
    (["tune", "tiny", "--threads", "-1"], "argument --threads: must be an integer between 0"),
    (["tune", "tiny", "--batch", "0"], "argument --batch: must be an integer >= 1"),
    (["experts", "{ckpt}", "--out", "{tmp}/x", "--max-tokens", "0"],
     "argument --max-tokens: must be an integer >= 1"),
    (["tokenizer", "--out", "{tmp}/t.json", "--max-train-bytes", "inf"],
     "argument --max-train-bytes: must be a finite number"),
    (["prepare", "--tokenizer", "{tmp}/t.json", "--out", "{tmp}/d", "--train-count", "-1"],
     "argument --train-count: must be an integer >= 1, got -1"),
    (["prepare", "--tokenizer", "{tmp}/t.json", "--out", "{tmp}/d", "--val-fraction", "nan"],
     "argument --val-fraction: must be a finite number in (0, 1)"),
    (["corpus", "--out", "{tmp}/c", "--stories", "0"], "argument --stories: must be an integer"),
    (["generate", "{ckpt}", "--device", "nonsense"],
     "argument --device: must be auto, cpu, cuda, cuda:N or mps, got 'nonsense'"),
    (["eval", "{ckpt}", "--batch-size", "two"], "must be an integer >= 1, got 'two'"),
]


@pytest.mark.parametrize("argv,words", BAD_OPTIONS, ids=lambda a: " ".join(a)[:60])
def test_bad_numbers_in_options_are_one_line(argv, words, tmp_path, capsys):
    argv = [a.format(ckpt=tmp_path / "nothing-here", tmp=tmp_path) for a in argv]
    err = one_line_error(argv, capsys)
    assert words in err and "--help" in err
    assert list(tmp_path.iterdir()) == []  # refused before anything was read or written


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("argv", [["generate", "{ckpt}", "--device", "cuda"],
                                  ["eval", "{ckpt}", "--device", "cuda:1"]])
def test_a_device_this_machine_lacks_is_not_blamed_on_the_checkpoint(argv, tmp_path, capsys):
    err = one_line_error([a.format(ckpt=tmp_path) for a in argv], capsys)
    assert "CUDA is not available on this machine" in err and "use --device cpu" in err
    assert "corrupted" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_load_checkpoint_checks_the_device_first(tmp_path):
    from slms.checkpoint import load_checkpoint

    with pytest.raises(ValueError, match="CUDA is not available"):
        load_checkpoint(tmp_path / "missing", device="cuda")  # before the files are read


def test_python_api_checks_too():
    from slms.analysis.evaluate import evaluate
    from slms.upcycle import upcycle

    with pytest.raises(ValueError, match="--expert-noise must be a finite number"):
        upcycle(None, 4, 2, expert_noise=math.inf)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--batch-size must be an integer >= 1"):
        evaluate(None, None, batch_size=0)  # type: ignore[arg-type]


@pytest.mark.parametrize("option,value,words", [
    ("--flops", "inf", "argument --flops: must be a finite number >= 0"),
    ("--minutes", "nan", "argument --minutes: must be a finite number"),
    ("--evals", "1", "argument --evals: must be an integer between 2 and"),
])
def test_study_options_are_checked_from_their_fields(option, value, words, tmp_path, capsys):
    err = one_line_error(["study", "tiny", option, value, "--out", tmp_path / "s"], capsys)
    assert words in err and not (tmp_path / "s").exists()


def test_train_checks_a_config_made_in_code(tmp_path):
    import dataclasses as dc

    from slms.train.trainer import train

    cfg = load_config("configs/tiny.toml", ["train.max_steps=1"])
    bad = dc.replace(cfg, train=dc.replace(cfg.train, beta1=1.5))
    with pytest.raises(ConfigError, match=r"^train.beta1 must be a finite number in \[0, 1\)"):
        train(bad, out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
