"""The checkpoint format: a directory with model.safetensors, config.json, tokenizer.json (+
trainer.pt when it can resume training).

Written through `slms.fsutil.atomic_dir`, so a crash never leaves a half-written checkpoint and
never damages the previous one. Loading needs only the directory; nothing is unpickled except
`trainer.pt`, with `weights_only=True`. Every reader (slms.load, analysis, seed import, the
trainer) uses this module. It knows the format only: run directories are `slms.rundir`, what a
run may take from a checkpoint is `slms.train.state`.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from slms.config import ModelConfig, model_config_from_dict
from slms.fsutil import atomic_dir, read_json
from slms.model import GPT
from slms.tokenizer import Tokenizer
from slms.version import slms_version

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
TRAINER_FILE = "trainer.pt"


class CheckpointError(ValueError):
    """A missing, truncated or corrupted checkpoint; the message names the file."""


def save_checkpoint(path: str | Path, model: GPT, tokenizer: Tokenizer,
                    info: dict[str, Any] | None = None,
                    trainer_state: dict[str, Any] | None = None) -> Path:
    """Atomically write a checkpoint directory at `path` (replacing an existing one). `model` is
    the plain GPT (the trainer unwraps DDP / torch.compile: `slms.train.distributed.unwrap`),
    so the saved keys have no `_orig_mod.`."""
    with atomic_dir(path) as tmp:
        save_model(model, str(tmp / MODEL_FILE))
        # the tokenizer's hash: a tokenizer.json swapped in later is refused on load
        meta = {"model": dataclasses.asdict(model.cfg), "slms_version": slms_version(),
                "torch_version": torch.__version__, **(info or {}),
                "tokenizer_sha256": tokenizer.sha256}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        tokenizer.save(tmp / TOKENIZER_FILE)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_FILE)
    return Path(path)


def read_config(path: str | Path) -> dict[str, Any]:
    f = Path(path) / CONFIG_FILE
    if not f.is_file():
        raise CheckpointError(f"{f} not found: {path} is not a checkpoint directory")
    meta = read_json(f, "; use another checkpoint", CheckpointError)
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{f} has no \"model\" table: it is not an slms checkpoint "
                              "config; use another checkpoint")
    return meta


def checkpoint_model_config(path: str | Path, meta: dict[str, Any] | None = None
                            ) -> ModelConfig:
    """The validated model config of a checkpoint; a bad value names config.json."""
    meta = read_config(path) if meta is None else meta
    try:
        return model_config_from_dict(meta["model"])
    except ValueError as e:
        raise CheckpointError(f"{Path(path) / CONFIG_FILE}: {e}; use another checkpoint "
                              "(or restore its config.json)") from None


def check_weights_header(weights: Path, cfg: ModelConfig) -> None:
    """Compare the tensor shapes in the safetensors header (read without loading any tensor)
    with those `cfg` implies, before a model of that size is allocated."""
    with torch.device("meta"):  # shapes only: no memory is allocated
        expected = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
    try:
        with safe_open(str(weights), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a damaged header
        raise CheckpointError(f"{weights} is truncated or corrupted ({type(e).__name__}); "
                              "use another checkpoint") from None
    first = ("wte.weight", "lm_head.weight", "wpe.weight")  # the most telling mismatches
    for key in sorted(found, key=lambda k: (k not in first, k)):
        shape, want = found[key], expected.get(key)
        if want is not None and want != shape:
            raise CheckpointError(
                f"{weights} does not match its config.json: {key} has shape {list(shape)} "
                f"in the weights but the config (vocab_size={cfg.vocab_size}, n_embd="
                f"{cfg.n_embd}, block_size={cfg.block_size}, n_layer={cfg.n_layer}) implies "
                f"{list(want)}; restore the checkpoint's own config.json")


def check_tokenizer(path: Path, tokenizer: Tokenizer, cfg: ModelConfig,
                    meta: dict[str, Any]) -> None:
    """The tokenizer must be the one the model was trained with: never more tokens than the
    model has rows, and the recorded hash when config.json has one."""
    f = path / TOKENIZER_FILE
    fix = "put back the checkpoint's own tokenizer.json"
    assert cfg.vocab_size is not None  # a loaded config always has one
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{f} has {tokenizer.vocab_size:,} tokens but the model has a "
                              f"{cfg.vocab_size:,}-token vocab: it is not this model's "
                              f"tokenizer; {fix}")
    want = meta.get("tokenizer_sha256")
    if want is not None and want != tokenizer.sha256:
        raise CheckpointError(f"{f} is not the tokenizer this model was trained with (sha256 "
                              f"{tokenizer.sha256[:12]}, config.json records {str(want)[:12]}; "
                              f"{tokenizer.vocab_size:,} tokens, model {cfg.vocab_size:,}); "
                              f"{fix}")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """Load (model in eval mode, tokenizer, config.json contents) from a checkpoint directory.

    Everything is checked before the model is built: config values, the weights' shapes
    (from the safetensors header) and the tokenizer (its size, and its hash when recorded)."""
    from slms.devices import resolve_device

    device = resolve_device(device) if isinstance(device, str) else device
    path = Path(path)
    meta = read_config(path)
    cfg = checkpoint_model_config(path, meta)
    weights = path / MODEL_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights} not found: the checkpoint is incomplete")
    check_weights_header(weights, cfg)
    tok_file = path / TOKENIZER_FILE
    if not tok_file.is_file():
        raise CheckpointError(f"{tok_file} not found: the checkpoint is incomplete")
    try:
        tokenizer = Tokenizer.from_file(tok_file)
    except ValueError as e:
        raise CheckpointError(f"{e}; put back the checkpoint's own tokenizer.json") from None
    check_tokenizer(path, tokenizer, cfg, meta)
    model = GPT(cfg)
    try:
        missing, unexpected = load_model(model, str(weights), strict=False, device=str(device))
    except Exception as e:  # safetensors raises several types for truncated files
        raise CheckpointError(f"{weights} is truncated or corrupted ({type(e).__name__}); "
                              "use another checkpoint") from None
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match its config.json "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    check_finite(model, weights)
    return model.to(device).eval(), tokenizer, meta


def check_finite(model: GPT, weights: Path) -> None:
    """A model with NaN or inf weights computes NaN for every token: refuse it by name rather
    than fail later in sampling."""
    bad = [k for k, t in model.state_dict().items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise CheckpointError(f"{weights} has non-finite weights (NaN or inf in {bad[0]}{more}): "
                              "the run diverged before this checkpoint was saved; use an "
                              "earlier checkpoint")


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    f = Path(path) / TRAINER_FILE
    if not f.is_file():
        raise CheckpointError(f"{f} not found: this checkpoint cannot resume training")
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise CheckpointError(f"{f} is truncated or corrupted (UnpicklingError)") from None
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(f"{f} was refused as unsafe: it holds pickled Python objects"
                              f"{what} that could run code when loaded, and slms loads only "
                              "tensors and plain data; use a checkpoint written by slms") from None
    except Exception as e:
        raise CheckpointError(f"{f} is truncated or corrupted ({type(e).__name__})") from None

