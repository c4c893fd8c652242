"""Checkpoints: a directory with model.safetensors, config.json, tokenizer.json (+ trainer.pt).

Writes go to a temporary sibling directory that is fsynced and renamed into place, so a crash
never leaves a half-written checkpoint and never damages the previous one. Loading needs only
the directory; nothing is unpickled except `trainer.pt`, with `weights_only=True`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from slms import __version__
from slms.config import model_config_from_dict
from slms.model import GPT
from slms.tokenizer import Tokenizer

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
TRAINER_FILE = "trainer.pt"
RUN_CONFIG = "run_config.json"  # a run directory's resolved config (and its data directory)


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: str | Path, model: torch.nn.Module, tokenizer: Tokenizer,
                    info: dict[str, Any] | None = None,
                    trainer_state: dict[str, Any] | None = None) -> Path:
    """Atomically write a checkpoint directory at `path` (replacing an existing one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    gpt = unwrap(model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_model(gpt, str(tmp / MODEL_FILE))
        meta = {"model": dataclasses.asdict(gpt.cfg), "slms_version": __version__,
                "torch_version": torch.__version__, **(info or {})}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        tokenizer.save(tmp / TOKENIZER_FILE)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_FILE)
        for f in tmp.iterdir():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


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


_STEP = re.compile(r"^step-(\d+)$")


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's step checkpoints, oldest first."""
    ckpts = Path(run_dir) / "checkpoints"
    if not ckpts.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpts.iterdir() if (m := _STEP.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve(path: str | Path) -> Path:
    """A checkpoint directory from a run directory (its best/, else its latest checkpoint)
    or a checkpoint directory itself."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} not found: give a run directory or a checkpoint directory")
    if (path / MODEL_FILE).is_file():
        return path
    if (path / "best" / MODEL_FILE).is_file():
        return path / "best"
    ckpts = list_checkpoints(path)
    if ckpts:
        return ckpts[-1]
    raise CheckpointError(f"{path} holds no checkpoint (no {MODEL_FILE}, best/ or checkpoints/)")


def prune(run_dir: str | Path, keep: int) -> None:
    """Keep the newest `keep` step checkpoints."""
    for p in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
