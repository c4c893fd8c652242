"""Checkpoints: a directory with model.safetensors, config.json, tokenizer.json (+ trainer.pt).

Writes go to a temporary sibling directory that is fsynced and renamed into place, so a crash
never leaves a half-written checkpoint and never damages the previous one. An existing directory
is replaced in one atomic step where the OS allows (Linux renameat2 RENAME_EXCHANGE); elsewhere
with two renames, whose crash window `recover` repairs. Loading needs only the directory; nothing
is unpickled except `trainer.pt`, with `weights_only=True`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import functools
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
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


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace the file at `path` with `text`: after a crash it holds the old text or the new,
    whole, and the new survives a power loss once this returns."""
    path = Path(path)
    # os.open with mode 0o666 honours the umask (mkstemp would make the file private)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w",
                       encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# errors that mean "this kernel / filesystem cannot exchange": fall back to two renames (EPERM:
# some container seccomp profiles deny syscalls they do not know)
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM}


@functools.cache
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.4
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange(a: str | Path, b: str | Path) -> bool:
    """Atomically swap two existing paths; False (nothing done) where the OS or filesystem
    cannot, so the caller falls back."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def replace_dir(new: Path, path: Path) -> None:
    """Move the complete directory `new` to `path`, replacing any directory there: in one atomic
    step where the OS allows; else `path` is missing for a moment, which `recover` repairs."""
    if not path.exists():
        os.replace(new, path)
    elif exchange(new, path):
        shutil.rmtree(new, ignore_errors=True)  # `new` now names the old checkpoint
    else:
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(new, path)  # a crash before this line leaves only `old`: see recover()
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(path.parent)


def _siblings(path: Path, kind: str) -> list[Path]:
    """The `.NAME.old-*` or `.NAME.tmp-*` siblings of `path`, oldest first."""
    if not path.parent.is_dir():
        return []
    found = []
    for p in path.parent.iterdir():
        if p.name.startswith(f".{path.name}.{kind}-"):
            try:
                found.append((p.lstat().st_mtime_ns, p))
            except FileNotFoundError:  # removed meanwhile by the writer that owned it
                pass
    return [p for _, p in sorted(found)]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover(path: str | Path) -> None:
    """Repair what a crash while replacing `path` left (call where nothing else writes it): a
    missing `path` gets back its newest `.NAME.old-*` copy; once `path` exists its stale
    `.NAME.old-*` / `.NAME.tmp-*` siblings are removed."""
    path = Path(path)
    olds = _siblings(path, "old")
    if olds and not path.exists():
        os.replace(olds.pop(), path)
        _fsync_dir(path.parent)
    if path.exists():
        for p in olds + _siblings(path, "tmp"):
            _remove(p)


_LEFTOVER = re.compile(r"^\.(.+)\.(old|tmp)-[\w-]+$")


def tidy(parent: str | Path) -> None:
    """On resume (no writer running): `recover` every entry of `parent` with leftovers, then
    drop the temp files and directories of writes that never finished."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    for name in sorted({m.group(1) for p in parent.iterdir() if (m := _LEFTOVER.match(p.name))}):
        recover(parent / name)
        for p in _siblings(parent / name, "tmp"):
            _remove(p)


def save_checkpoint(path: str | Path, model: torch.nn.Module, tokenizer: Tokenizer,
                    info: dict[str, Any] | None = None,
                    trainer_state: dict[str, Any] | None = None) -> Path:
    """Atomically write a checkpoint directory at `path` (replacing an existing one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)  # a crash in an earlier replace may have left `path` missing
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
        replace_dir(tmp, path)
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
    found = _readable(path)
    if found is not None:
        return found
    if not path.exists():
        raise CheckpointError(f"{path} not found: give a run directory or a checkpoint directory")
    best = _readable(path / "best")
    if best is not None:
        return best
    ckpts = list_checkpoints(path)
    if ckpts:
        return ckpts[-1]
    raise CheckpointError(f"{path} holds no checkpoint (no {MODEL_FILE}, best/ or checkpoints/)")


def _readable(path: Path) -> Path | None:
    """`path` if it holds weights, else the newest `.NAME.old-*` copy a crash in the middle of
    a replace left behind (read-only: a reader must not move what a live writer may own)."""
    for p in [path, *reversed(_siblings(path, "old"))]:
        if (p / MODEL_FILE).is_file():
            return p
    return None


def prune(run_dir: str | Path, keep: int) -> None:
    """Keep the newest `keep` step checkpoints."""
    for p in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
