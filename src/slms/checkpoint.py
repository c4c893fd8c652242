"""The checkpoint format: a directory with model.safetensors, config.json, tokenizer.json (+
trainer.pt when it can resume training).

Written through `slms.fsutil.atomic_dir`, so a crash never leaves a half-written checkpoint and
never damages the previous one. Loading needs only the directory; nothing is unpickled except
`trainer.pt`, with `weights_only=True`. Every reader (slms.load, analysis, seed import, the
trainer) uses this module; run directories are `slms.rundir`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from slms import __version__
from slms.config import model_config_from_dict
from slms.fsutil import atomic_dir
from slms.model import GPT
from slms.tokenizer import Tokenizer

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
TRAINER_FILE = "trainer.pt"


class CheckpointError(ValueError):
    """A missing, truncated or corrupted checkpoint; the message names the file."""


def unwrap(model: torch.nn.Module) -> GPT:
    """The GPT inside DDP / torch.compile wrappers (so saved keys have no `_orig_mod.`)."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model  # type: ignore[return-value]


def save_checkpoint(path: str | Path, model: torch.nn.Module, tokenizer: Tokenizer,
                    info: dict[str, Any] | None = None,
                    trainer_state: dict[str, Any] | None = None) -> Path:
    """Atomically write a checkpoint directory at `path` (replacing an existing one)."""
    gpt = unwrap(model)
    with atomic_dir(path) as tmp:
        save_model(gpt, str(tmp / MODEL_FILE))
        meta = {"model": dataclasses.asdict(gpt.cfg), "slms_version": __version__,
                "torch_version": torch.__version__, **(info or {})}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        tokenizer.save(tmp / TOKENIZER_FILE)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_FILE)
    return Path(path)


def read_config(path: str | Path) -> dict[str, Any]:
    f = Path(path) / CONFIG_FILE
    if not f.is_file():
        raise CheckpointError(f"{f} not found: {path} is not a checkpoint directory")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is corrupted ({e}); use another checkpoint") from None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """Load (model in eval mode, tokenizer, config.json contents) from a checkpoint directory."""
    path = Path(path)
    meta = read_config(path)
    model = GPT(model_config_from_dict(meta["model"]))
    weights = path / MODEL_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights} not found: the checkpoint is incomplete")
    try:
        missing, unexpected = load_model(model, str(weights), strict=False, device=str(device))
    except Exception as e:  # safetensors raises several types for truncated files
        raise CheckpointError(f"{weights} is truncated or corrupted ({type(e).__name__}); "
                              "use another checkpoint") from None
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match its config.json "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    try:
        tokenizer = Tokenizer.from_file(path / TOKENIZER_FILE)
    except Exception as e:
        raise CheckpointError(f"{path / TOKENIZER_FILE} cannot be loaded ({e})") from None
    return model.to(device).eval(), tokenizer, meta


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    f = Path(path) / TRAINER_FILE
    if not f.is_file():
        raise CheckpointError(f"{f} not found: this checkpoint cannot resume training")
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{f} is truncated or corrupted ({type(e).__name__})") from None
