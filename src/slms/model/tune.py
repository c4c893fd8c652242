"""Kernels chosen by measurement: where a fast path has alternatives, each is timed once per
machine and shape class, and the fastest runs.

The MoE layer's dispatch engine (slms.model.moe_dispatch) asks `fastest` for its kernel: the
C++ kernels, the plain torch loop or torch._grouped_mm, for decoding (a few tokens) and for the
sorted paths (training, evaluation, prefill). The first call of a shape class times every
candidate on synthetic inputs of that shape (a few milliseconds for decoding shapes, up to a
second for large training shapes) and caches the winner in ~/.cache/slms/kernels.json, keyed by
the CPU model, torch's thread count and version (`slms.machine`), and the build of the C++
kernels (its name hashes their source, flags and the CPU's features): a new torch, CPU or kernel
source measures again. `slms tune CONFIG` measures a model's shapes ahead of time.

The plain torch path wins ties (it must be beaten by TIE); SLMS_NATIVE=1 uses the C++ kernels
wherever they can run without timing them, SLMS_NATIVE=0 never builds them, and SLMS_TUNE=0
turns measuring off (each situation's rule decides, as `slms.model.moe_dispatch.choose_path`
says).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager

import torch

from slms import machine
from slms.model import native

log = logging.getLogger(__name__)

PLAIN = "torch"  # the plain torch path: what every other kernel must beat
TIE = 0.97  # a kernel wins over the plain path only below this fraction of its time
SAMPLES = 5  # timed samples per candidate (the minimum counts)
MIN_SAMPLE_S = 0.002  # a sample repeats short calls until it lasts this long

_chosen: dict[Hashable, str] = {}  # this process's choices, by shape class


def enabled() -> bool:
    return os.environ.get("SLMS_TUNE", "1") != "0"


def fastest(shape_class: tuple, timers: Callable[[], dict[str, Callable[[], None]]],
            context: Callable[[], AbstractContextManager] = contextlib.nullcontext) -> str:
    """The fastest kernel for `shape_class` (a tuple of what decides the speed), from the cache
    or measured now: `timers()` gives, for each candidate, a call of it on synthetic inputs of
    the class's shapes (PLAIN among them), to run inside `context()` (grad mode, autocast).

    Measured in a thread of its own, so that the caller's autograd state (gradient
    checkpointing's hooks, a graph being built) stays out of it."""
    local = (torch.get_num_threads(), shape_class)  # a choice holds for its thread count
    if (hit := _chosen.get(local)) is not None:
        return hit
    key = "|".join([machine.machine_key(), build(), *map(str, shape_class)])

    def measure() -> dict:
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(_measure, shape_class, timers, context).result()
    entry = machine.measured("kernels", key, measure)
    _chosen[local] = entry["kernel"]
    return entry["kernel"]


def machine_entries() -> dict[str, dict]:
    """This machine's measured choices (for this build of the kernels), by shape class:
    {"decode|cpu|float32|...": {"kernel": ..., "ms": {candidate: ms}}}."""
    prefix = "|".join([machine.machine_key(), build()]) + "|"
    cache = machine.read_cache(machine.cache_file("kernels"))
    return {k[len(prefix):]: v for k, v in cache.items() if k.startswith(prefix)}


def known(shape_class: tuple) -> str | None:
    """The kernel chosen for `shape_class` in this process, if it was measured or read."""
    return _chosen.get((torch.get_num_threads(), shape_class))


def pick(seconds: dict[str, float]) -> str:
    """The winner of measured times: the fastest, unless it does not beat the plain path by
    TIE (noise must not trade the plain path for a kernel that is no faster)."""
    best = min(seconds, key=seconds.__getitem__)
    if PLAIN in seconds and seconds[best] > TIE * seconds[PLAIN]:
        return PLAIN
    return best


def _measure(shape_class: tuple, timers: Callable[[], dict[str, Callable[[], None]]],
             context: Callable[[], AbstractContextManager]) -> dict:
    t0 = time.perf_counter()
    with context():
        seconds = time_candidates(timers())
    kernel = pick(seconds)
    log.info("slms: MoE kernel for %s: %s (%s; measured once for this machine in %.2f s)",
             shape_class, kernel, ", ".join(f"{k} {s * 1e3:.3f} ms" for k, s in seconds.items()),
             time.perf_counter() - t0)
    return {"kernel": kernel, "ms": {k: round(s * 1e3, 4) for k, s in seconds.items()}}


def time_candidates(timers: dict[str, Callable[[], None]]) -> dict[str, float]:
    """Seconds per call of each candidate that runs (one that raises on the shape is left out):
    the minimum over SAMPLES samples, taken in turn so that machine noise hits them alike; each
    sample repeats the call until MIN_SAMPLE_S."""
    timers = dict(timers)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    repeats = {}
    for name, call in list(timers.items()):  # warm-up, and how often a sample must call
        sync()
        t0 = time.perf_counter()
        try:
            call()
        except RuntimeError as exc:  # e.g. torch._grouped_mm's alignment rules for odd widths
            if name == PLAIN:
                raise
            log.debug("slms: kernel %s cannot run this shape: %s", name, exc)
            del timers[name]
            continue
        sync()
        repeats[name] = max(1, min(100, int(MIN_SAMPLE_S / max(time.perf_counter() - t0, 1e-7))))
    best = dict.fromkeys(timers, float("inf"))
    for _ in range(SAMPLES):
        for name, call in timers.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(repeats[name]):
                call()
            sync()
            best[name] = min(best[name], (time.perf_counter() - t0) / repeats[name])
    return best


def build() -> str:
    """The C++ kernels' build (source, flags, CPU features, torch, Python), or that they are
    off: a choice measured with one build says nothing about another."""
    return native.build_name() if native.enabled() else "native-off"


def forget() -> None:
    """Drop this process's choices (tests; `slms tune --again`)."""
    _chosen.clear()
