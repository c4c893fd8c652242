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
