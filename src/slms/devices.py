"""The device a config or --device names, checked against this machine: a nonsense name or a
device this machine lacks is one line that says which devices there are, before any file is
read (so that a missing GPU is never blamed on a checkpoint)."""

from __future__ import annotations

import torch

from slms.config import DEVICE


def resolve_device(name: str, key: str = "--device") -> torch.device:
    """torch.device for `name` (auto: cuda, else mps, else cpu); a ValueError naming `key` when
    the name is not a device or this machine has no such device."""
    if not isinstance(name, str) or DEVICE.fullmatch(name) is None:
        raise ValueError(f"{key} must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{key} {name}: CUDA is not available on this machine (torch "
                             f"{torch.__version__}); use {_fix(key, 'cpu')}")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"{key} {name}: this machine has {count} CUDA device(s), "
                             f"cuda:0..cuda:{count - 1}")
    if device.type == "mps" and not _mps_available():
        raise ValueError(f"{key} mps: Apple's MPS is not available on this machine; use "
                         f"{_fix(key, 'cpu')}")
    return device


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def _fix(key: str, name: str) -> str:
    return f"{key} {name}" if key.startswith("--") else f"{key}={name}"
