"""Process memory settings for training on the CPU.

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
import sys

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
