import dataclasses
from pathlib import Path

import pytest
import torch

from slms.config import (
    ACTIVATIONS,
    ROUTERS,
    ConfigError,
    ModelConfig,
    MoEConfig,
    TrainConfig,
    choices_of,
    load_config,
)
from slms.model import GPT

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


def test_there_are_presets():
    assert {"tiny", "seed-moe", "seed-dense"} <= {p.stem for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads_and_builds(path):
    cfg = load_config(path, ["model.vocab_size=2048"])
    assert cfg.name == path.stem
    with torch.device("meta"):
        GPT(cfg.model)


def test_overrides_apply_with_types():
    cfg = load_config(None, ["train.max_steps=7", "model.n_layer=2", "train.lr=3e-4",
                             "model.moe.n_experts=4", "model.moe.top_k=1", "data.path=x.txt"])
    assert cfg.train.max_steps == 7 and cfg.model.n_layer == 2 and cfg.train.lr == 3e-4
    assert cfg.model.moe.n_experts == 4 and cfg.model.moe.top_k == 1 and cfg.data.path == "x.txt"
    dense = load_config(Path("configs/seed-moe.toml"), ["model.moe=none"])
    assert dense.model.moe is None


@pytest.mark.parametrize("override,message", [
    ("train.max_stepz=5", "unknown config key 'train.max_stepz'"),
    ("train.max_steps=many", "train.max_steps must be of type int"),
    ("train.max_steps=0", "train.max_steps must be an integer between 1 and "),
    ("model.n_head=5", "model.n_embd must be divisible by model.n_head"),
    ("model.moe.top_k=9", "model.moe.top_k must be between 1 and n_experts"),
    ("model.moe.router=magic", "model.moe.router must be one of"),
    ("train.schedule=linear", "train.schedule must be one of"),
    ("nonsense", "must look like section.key=value"),
])
def test_bad_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(Path("configs/tiny.toml"), [override])
    assert "\n" not in str(e.value)


CHOICE_KEYS = [(prefix, cls, f.name) for prefix, cls in (("model", ModelConfig),
                                                       ("model.moe", MoEConfig),
                                                       ("train", TrainConfig))
               for f in dataclasses.fields(cls) if choices_of(cls, f.name)]


def test_choice_keys_are_those_with_a_fixed_set_of_values():
    assert {f"{p}.{n}" for p, _, n in CHOICE_KEYS} == {
        "model.activation", "model.attn_scale", "model.positions", "model.norm",
        "model.moe.router", "train.schedule", "train.optimizer", "train.precision",
        "train.resume", "train.parallel"}
    assert choices_of(MoEConfig, "router") == ROUTERS == ("noisy_topk", "topk", "bias")
    assert choices_of(ModelConfig, "activation") == ACTIVATIONS
    assert choices_of(TrainConfig, "lr") is None and choices_of(TrainConfig, "device") is None


@pytest.mark.parametrize("prefix,cls,name", CHOICE_KEYS, ids=lambda x: getattr(x, "__name__", x))
def test_a_choice_key_refuses_another_value_naming_its_choices(prefix, cls, name):
    choices = choices_of(cls, name)
    assert getattr(cls(), name) in choices  # the default is one of them
    extra = ["model.moe.n_experts=4"] if prefix == "model.moe" else []
    for value, shown in (("bogus", "'bogus'"), ("1", "1")):
        with pytest.raises(ConfigError) as e:
            load_config(Path("configs/tiny.toml"), [*extra, f"{prefix}.{name}={value}"])
        assert str(e.value) == f"{prefix}.{name} must be one of {', '.join(choices)}, got {shown}"
    for value in choices:  # each choice loads
        load_config(Path("configs/tiny.toml"), [*extra, f"{prefix}.{name}={value}"])
    made = cls(**{name: "bogus"})  # a config made in code is checked by validate()
    with pytest.raises(ConfigError, match=f"^{prefix}.{name} must be one of .*, got 'bogus'$"):
        made.validate(4) if cls is MoEConfig else made.validate()


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nmax_steps = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
