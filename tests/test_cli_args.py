"""The command line takes options and KEY=VALUE overrides in any order."""

import json

import pytest

from slms.cli import build_parser, main


@pytest.mark.parametrize("argv", [
    ["train", "tiny", "--out", "runs/x", "train.max_steps=50", "model.n_layer=2"],
    ["train", "tiny", "train.max_steps=50", "--out", "runs/x", "model.n_layer=2"],
    ["train", "tiny", "train.max_steps=50", "model.n_layer=2", "--out", "runs/x"],
    ["train", "--out", "runs/x", "tiny", "train.max_steps=50", "model.n_layer=2"],
])
def test_train_takes_overrides_before_and_after_options(argv):
    args = build_parser().parse_args(argv)
    assert args.config == "tiny" and args.out == "runs/x"
    assert args.overrides == ["train.max_steps=50", "model.n_layer=2"]


@pytest.mark.parametrize("argv", [
    ["demo", "tiny", "--out", "runs/d", "train.max_steps=5"],
    ["demo", "tiny", "train.max_steps=5", "--out", "runs/d"],
])
def test_demo_takes_overrides_in_any_order(argv):
    args = build_parser().parse_args(argv)
    assert (args.config, args.out, args.overrides) == ("tiny", "runs/d", ["train.max_steps=5"])


def test_bench_takes_targets_and_overrides_around_options():
    args = build_parser().parse_args(["bench", "tiny", "--train-steps", "1", "model.n_layer=1",
                                      "--json"])
    assert args.targets == ["tiny", "model.n_layer=1"] and args.train_steps == 1 and args.json


@pytest.mark.parametrize("order", ["before", "after"])
def test_info_overrides_after_an_option_take_effect(order, capsys):
    keys = ["model.n_layer=1", "model.vocab_size=256"]
    argv = ["info", "tiny", "--json", *keys] if order == "after" else ["info", "tiny", *keys,
                                                                      "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["n_layer"] == 1


def test_unknown_options_are_still_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "tiny", "--outt", "runs/x"])
    assert e.value.code == 2
    assert "unrecognized arguments: --outt" in capsys.readouterr().err


@pytest.mark.parametrize("config,overrides,expected", [
    ("tiny", ["a.b=1"], ("tiny", ["a.b=1"])),
    ("train.max_steps=5", ["a.b=1"], (None, ["train.max_steps=5", "a.b=1"])),
    (None, [], (None, [])),
])
def test_a_key_value_in_the_config_place_is_an_override(config, overrides, expected):
    from slms.commands.options import split_config

    given = list(overrides)
    assert split_config(config, given) == expected
    assert given == overrides  # the parsed arguments are not rewritten


def test_train_without_a_config_takes_overrides_first(monkeypatch):
    import slms.config

    seen = []

    def load_config(path, overrides):
        seen.append((path, overrides))
        raise ValueError("stop here")

    monkeypatch.setattr(slms.config, "load_config", load_config)
    assert main(["train", "train.max_steps=5", "model.n_layer=1"]) == 2
    assert seen == [(None, ["train.max_steps=5", "model.n_layer=1"])]


def test_study_options_default_to_study_options_fields():
    """`slms study` without options asks for StudyOptions' defaults (written once, there)."""
    import dataclasses

    from slms.commands.study import study_options
    from slms.study import StudyOptions

    opts = study_options(build_parser().parse_args(["study", "--out", "runs/s"]))
    defaults = StudyOptions(config=opts.config, out=opts.out)
    assert opts == defaults
    assert opts.experts == (4, 8, 16) and opts.upcycle == (8, 2) and opts.router == "bias"
    assert all(getattr(opts, f.name) == getattr(defaults, f.name)
               for f in dataclasses.fields(StudyOptions))


@pytest.mark.parametrize("command,length", [("generate", 200), ("chat", None)])
def test_generation_options_default_to_sampling_fields(command, length):
    from slms.commands.options import sampling_of
    from slms.infer.sampling import Sampling

    args = build_parser().parse_args([command, "ckpt"])
    assert args.max_new_tokens == length
    assert sampling_of(args, Sampling().max_new_tokens) == Sampling()


def test_source_options_default_to_source_options_fields():
    from slms.commands.options import source_of
    from slms.data.sources import SourceOptions

    args = build_parser().parse_args(["prepare", "--tokenizer", "t.json", "--out", "o"])
    assert source_of("synthetic", args).opts == SourceOptions()


def test_help_shows_the_dataclass_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["study", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("expert counts (default 4,8,16)", "experts per token (default 1,2)",
                 "(default 8,2; none: skip it)", "{noisy_topk,topk,bias}",
                 "router of the MoE variants (default bias)", "(default 0.01, as in",
                 "evaluations per run (default 10)", "with --minutes (default 50)"):
        assert text in out, text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "0 = greedy (default 0.8)" in out and "0 = off (default 50)" in out


def test_add_field_takes_default_type_and_choices_from_the_field():
    import argparse
    from dataclasses import dataclass
    from typing import Literal

    from slms.commands.options import add_field

    @dataclass
    class Opts:
        n: int = 3
        rate: float | None = None
        mode: Literal["a", "b"] = "a"
        sizes: tuple[int, ...] = (1, 2)
        flag: bool = False

    p = argparse.ArgumentParser()
    for name in ("n", "rate", "mode", "sizes"):
        add_field(p, Opts, name, help="(default %(default)s)")
    add_field(p, Opts, "n", "--count", default=7)  # a command's own default
    assert vars(p.parse_args([])) == {"n": 3, "rate": None, "mode": "a", "sizes": "1,2",
                                      "count": 7}
    args = p.parse_args(["--n", "5", "--rate", "0.5", "--mode", "b", "--sizes", "4,8"])
    assert (args.n, args.rate, args.mode, args.sizes) == (5, 0.5, "b", "4,8")
    with pytest.raises(SystemExit):
        p.parse_args(["--mode", "c"])  # not a choice
    with pytest.raises(SystemExit):
        p.parse_args(["--n", "x"])  # not an int
    with pytest.raises(TypeError, match="no command-line option"):
        add_field(p, Opts, "flag")
