"""Process memory: settings for training on the CPU, and peak memory readings.

glibc's malloc returns freed memory to the operating system once more than a threshold is free
at the top of the heap, and serves large requests with fresh mmap()s. The threshold adapts to
the largest block freed (so 2x 16 MB), which a training step's activations and weight gradients
exceed: every step then faults its large tensors in again, page by page (a MoE layer of 64
experts: 7,000-14,000 page faults and ~10 ms per step, docs/benchmarks.md). Keeping freed
memory for reuse, as PyTorch's CUDA caching allocator does on the GPU, removes that.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys
from pathlib import Path

import torch

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
TRIM_BYTES = 256 << 20  # freed memory kept for reuse before any is returned
MMAP_BYTES = 32 << 20  # glibc's largest mmap threshold: smaller blocks come from the heap


def keep_freed_memory() -> bool:
    """Make glibc keep up to 256 MB of freed memory (per malloc arena: threads that allocate
    have their own), and serve blocks below 32 MB from the heap. Process-wide, for the
    process's lifetime. Returns whether both settings took (False where malloc is not
    glibc's, and nothing changed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim = mallopt(M_TRIM_THRESHOLD, TRIM_BYTES)
    mmap = mallopt(M_MMAP_THRESHOLD, MMAP_BYTES)
    return bool(trim) and bool(mmap)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator statistics, or on Linux the process's peak resident
    set ("VmHWM"; writing 5 to clear_refs resets it)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what): peak CUDA memory allocated, else the process's peak resident set since
    the last reset (Linux), else since the process started."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "peak_rss"
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * (1 if sys.platform == "darwin" else 1024), "peak_rss"  # bytes on macOS
