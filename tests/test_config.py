from pathlib import Path

import pytest
import torch

from slms.config import ConfigError, load_config
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
    ("train.max_steps=0", "train.max_steps must be >= 1"),
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


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nmax_steps = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
