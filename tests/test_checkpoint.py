import pytest
import torch

import slms
from conftest import tiny_config
from slms.model import GPT
from slms.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    resolve,
    save_checkpoint,
)


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_identical_logits(tmp_path, tokenizer, tie):
    torch.manual_seed(0)
    model = GPT(tiny_config(moe=True, tie_weights=tie)).eval()
    save_checkpoint(tmp_path / "ck", model, tokenizer, {"step": 3})
    loaded, tok, meta = load_checkpoint(tmp_path / "ck")
    x = torch.randint(0, 300, (2, 16))
    assert torch.equal(model(x).logits, loaded(x).logits)
    assert meta["step"] == 3 and tok.sha256 == tokenizer.sha256
    assert (loaded.lm_head.weight is loaded.wte.weight) == tie


def test_load_resolves_run_directories(tmp_path, tokenizer):
    model = GPT(tiny_config())
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "step-10", model, tokenizer)
    save_checkpoint(run / "checkpoints" / "step-2", model, tokenizer)
    assert resolve(run) == run / "checkpoints" / "step-10"
    save_checkpoint(run / "best", model, tokenizer)
    assert resolve(run) == run / "best"
    m, tok = slms.load(run)
    assert isinstance(m, GPT) and not m.training


def test_corrupted_checkpoint_is_a_clear_error(tmp_path, tokenizer):
    save_checkpoint(tmp_path / "ck", GPT(tiny_config()), tokenizer)
    weights = tmp_path / "ck" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated or corrupted"):
        load_checkpoint(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="not found"):
        resolve(tmp_path / "nothing")


def test_failed_save_keeps_previous_checkpoint(tmp_path, tokenizer, monkeypatch):
    model = GPT(tiny_config())
    save_checkpoint(tmp_path / "ck", model, tokenizer, {"step": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(tokenizer), "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "ck", model, tokenizer, {"step": 2})
    _, _, meta = load_checkpoint(tmp_path / "ck")
    assert meta["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp dir left
