"""C++ kernels for the MoE experts on CPU, compiled on first use.

`csrc/moe_cpu.cpp` holds three ops (torch.ops.slms.*):
- experts_fwd / experts_bwd: the experts' loop of training and evaluation, with the experts
  split across the CPU threads (each thread runs whole experts with single-threaded matmuls,
  instead of every small matmul being split across the threads) and no Python per expert;
- experts_decode: a few tokens without autograd (generation's steps): each chosen expert's
  weights are streamed once for all its tokens by hand-vectorised loops, where a BLAS call
  costs as much for 1-8 rows as for dozens.
Compiled once by torch's extension builder (about 10-20 s; cached under TORCH_EXTENSIONS_DIR,
by default ~/.cache/torch_extensions) the first time a MoE layer runs on the CPU. Without a C++
compiler (one warning), or with SLMS_NATIVE=0, the Python paths of `moe` and `moe_kernels` run
instead: the same results, slower (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "moe_cpu.cpp"
_lock = threading.Lock()
_ops: object | None = None
_tried = False


def enabled() -> bool:
    """Whether the C++ kernels may be used (SLMS_NATIVE=0 turns them off)."""
    return os.environ.get("SLMS_NATIVE", "1") != "0"


def ops() -> object | None:
    """torch.ops.slms with the compiled kernels, or None when they are off or cannot be built
    (the reason is logged once, as a warning)."""
    global _ops, _tried
    if _tried or not enabled():
        return _ops if enabled() else None
    with _lock:
        if not _tried:
            _ops = _build()
            _tried = True
    return _ops


def _flags() -> list[str]:
    # -march=native: the decode kernel's loops vectorise for this CPU (the build is cached per
    # CPU, see _name); -ffp-contract=fast: multiply-adds become FMA instructions.
    flags = ["-O3", "-march=native", "-ffp-contract=fast"]
    return flags + ["-fopenmp"] if sys.platform.startswith("linux") else flags


def _name() -> str:
    """The extension's name, one per source, flags and CPU: -march=native code must not be
    loaded on another CPU sharing the cache directory."""
    cpu = platform.machine() + platform.processor()
    with contextlib.suppress(OSError):
        cpu += Path("/proc/cpuinfo").read_text().split("flags", 1)[-1].split("\n", 1)[0]
    key = hashlib.sha1((SOURCE.read_text() + " ".join(_flags()) + cpu).encode()).hexdigest()
    return f"slms_moe_cpu_{key[:12]}"


def _find_ninja() -> None:
    """torch's builder runs `ninja` from PATH: add the ninja package's (a dependency of slms)
    when a virtual environment's bin directory is not on PATH."""
    if shutil.which("ninja") is None:
        with contextlib.suppress(ImportError):
            import ninja
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _build() -> object | None:
    try:
        from torch.utils.cpp_extension import load
        _find_ninja()
        log.info("compiling slms's C++ MoE kernels (once; cached by torch)")
        load(name=_name(), sources=[str(SOURCE)], extra_cflags=_flags(),
             is_python_module=False, verbose=False)
    except Exception as exc:  # no compiler, no headers, ...: the Python loop runs instead
        log.warning("slms: C++ MoE kernels unavailable (%s); using the Python loop. "
                    "Install a C++ compiler, or set SLMS_NATIVE=0 to silence this.",
                    str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__)
        return None
    return torch.ops.slms
