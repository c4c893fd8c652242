"""Facts about this machine that slms measures once and caches, instead of guessing from a CPU
name: whether bf16 matmuls are fast (slms.precision), which MoE kernel is faster for a shape
(slms.model.tune).

Each kind of fact is one JSON file in ~/.cache/slms (SLMS_CACHE_DIR), its entries keyed by
what the measurement depends on: `machine_key()` (CPU model, thread count, torch version) and
whatever else the caller adds. A cache that cannot be read is measured again; one that cannot
be written (a read-only home) is measured again next time.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from slms.fsutil import atomic_write_text


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_models() -> str:
    """The visible CUDA devices' names ("" without CUDA): a cache shared between machines (a
    home directory on a cluster) must not carry one GPU type's choices to another."""
    if not torch.cuda.is_available():
        return ""
    return ",".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))


def machine_key() -> str:
    """What every measurement here depends on: the CPU, the GPUs, the threads torch uses,
    torch."""
    gpus = gpu_models()
    return (f"{cpu_model()}{f'|gpu={gpus}' if gpus else ''}|threads={torch.get_num_threads()}"
            f"|torch={torch.__version__}")


def cache_file(kind: str) -> Path:
    root = os.environ.get("SLMS_CACHE_DIR") or Path.home() / ".cache" / "slms"
    return Path(root) / f"{kind}.json"


def measured(kind: str, key: str, measure: Callable[[], Any]) -> Any:
    """The cached result of `measure()` for `key` in the `kind` cache, measured (and cached)
    the first time it is asked for. `measure` returns something JSON can hold."""
    path = cache_file(kind)
    cache = read_cache(path)
    if key not in cache:
        cache = read_cache(path)  # another process may have written it meanwhile
        cache[key] = measure()
        write_cache(path, cache)
    return cache[key]


def read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_cache(path: Path, cache: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(cache, indent=1, sort_keys=True) + "\n")
    except OSError:
        pass  # a read-only home: measured again next time
