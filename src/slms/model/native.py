"""C++ kernels for the MoE experts on CPU, compiled on first use.

`csrc/moe_cpu.cpp` holds three ops (torch.ops.slms.*):
- experts_fwd / experts_bwd: the experts' loop of training and evaluation, with the experts
  split across the CPU threads (each thread runs whole experts with single-threaded matmuls,
  instead of every small matmul being split across the threads) and no Python per expert;
- experts_decode: a few tokens without autograd (generation's steps): each chosen expert's
  weights are streamed once for all its tokens by hand-vectorised loops, where a BLAS call
  costs as much for 1-8 rows as for dozens.
Compiled once by torch's extension builder (about 10-20 s) the first time a MoE layer runs on
the CPU, and cached in TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions), one build per
source, flags, CPU, torch and Python. On by default on Linux (where it is tested; it needs
OpenMP to use the threads); SLMS_NATIVE=1 turns it on elsewhere, SLMS_NATIVE=0 off. Without a
C++ compiler (one warning), or off, the Python paths of `moe_dispatch` and `moe_kernels` run
instead: the same maths (rounding aside), slower (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "moe_cpu.cpp"
STALE_LOCK_S = 600  # a build takes 10-20 s: a lock this old was left by a killed build
_lock = threading.Lock()
_ops: object | None = None
_tried = False
_fakes = False  # fake implementations registered (once per process)


def enabled() -> bool:
    """Whether the C++ kernels may be used: SLMS_NATIVE=1 / 0, by default on Linux only."""
    flag = os.environ.get("SLMS_NATIVE", "")
    return flag == "1" or (flag != "0" and sys.platform.startswith("linux"))


def forced() -> bool:
    """SLMS_NATIVE=1: the kernels wherever they can run, without timing them against torch."""
    return os.environ.get("SLMS_NATIVE", "") == "1"


def ops() -> object | None:
    """torch.ops.slms with the compiled kernels, or None when they are off (SLMS_NATIVE, read
    at the first call) or cannot be built (the reason is logged once, as a warning). Cheap
    after the first call: decoding asks for every layer at every step."""
    return _ops if _tried else _load()


@torch.compiler.disable  # the lock and the build are not for tracing
def _load() -> object | None:
    global _ops, _tried
    with _lock:
        if not _tried:
            _ops = _build() if enabled() else None
            _tried = True
    return _ops


def _flags() -> list[str]:
    # -march=native: the decode kernel's loops vectorise for this CPU (the build is cached per
    # CPU, see _name); -ffp-contract=fast: multiply-adds become FMA instructions.
    flags = ["-O3", "-march=native", "-ffp-contract=fast"]
    return flags + ["-fopenmp"] if sys.platform.startswith("linux") else flags


@functools.cache
def build_name() -> str:
    """One build per source, flags, CPU (-march=native code must not run on another CPU that
    shares the cache), torch and Python."""
    cpu = platform.machine() + platform.processor()
    with contextlib.suppress(OSError):
        cpu += Path("/proc/cpuinfo").read_text().split("flags", 1)[-1].split("\n", 1)[0]
    key = " ".join([SOURCE.read_text(), *_flags(), cpu, torch.__version__, sys.version])
    return f"slms_moe_cpu_{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def _build_dir(name: str) -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / name


def _find_ninja() -> None:
    """torch's builder runs `ninja` from PATH: add the ninja package's (a dependency of slms)
    when a virtual environment's bin directory is not on PATH."""
    if shutil.which("ninja") is None:
        with contextlib.suppress(ImportError):
            import ninja
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _clear_stale_lock(build_dir: Path) -> None:
    """torch's builder waits forever on the lock file of a build that was killed: remove one
    older than any build takes."""
    lock = build_dir / "lock"
    with contextlib.suppress(OSError):
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()
            log.warning("slms: removed %s, left by an interrupted build of the C++ MoE kernels",
                        lock)


def _build() -> object | None:
    name = build_name()
    build_dir = _build_dir(name)
    try:
        from torch.utils.cpp_extension import load
        _find_ninja()
        build_dir.mkdir(parents=True, exist_ok=True)
        _clear_stale_lock(build_dir)
        if not (build_dir / f"{name}.so").exists():
            log.info("slms: compiling the C++ MoE kernels (once, 10-20 s) in %s", build_dir)
        load(name=name, sources=[str(SOURCE)], extra_cflags=_flags(), is_python_module=False,
             build_directory=str(build_dir), verbose=False)
    except Exception as exc:  # no compiler, no headers, ...: the Python paths run instead
        log.debug("building the C++ MoE kernels failed:\n%s", exc)
        log.warning("slms: C++ MoE kernels unavailable (%s); using the Python loop. "
                    "Install a C++ compiler, or set SLMS_NATIVE=0 to silence this.",
                    _first_error(exc))
        return None
    _register_fakes()
    return torch.ops.slms


def _first_error(exc: Exception) -> str:
    """The line of a build failure that says what failed (torch's message ends with ninja's
    'build stopped'), else its first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() and "building extension"
              not in line.lower()]
    return (errors or lines or [type(exc).__name__])[0]


def _register_fakes() -> None:
    """Shapes of the ops' outputs for torch.compile's tracing (fake tensors)."""
    global _fakes
    if _fakes:
        return
    _fakes = True
    from torch.library import register_fake

    @register_fake("slms::experts_fwd")
    def _(x, token, w1, b1, w2, b2, counts, activation):  # noqa: ANN001, ANN202
        return x.new_empty(token.numel(), w1.size(2)), x.new_empty(token.numel(), w2.size(2))

    @register_fake("slms::experts_bwd")
    def _(g, x, token, w_N, pre, y, w1, w2, counts, activation, need_gx):  # noqa: ANN001, ANN202
        return (torch.empty_like(w_N), torch.empty_like(w1), w1.new_empty(w1.shape[::2]),
                torch.empty_like(w2), w2.new_empty(w2.shape[::2]))

    @register_fake("slms::experts_decode")
    def _(x, experts, weights, w1, b1, w2, b2, activation):  # noqa: ANN001, ANN202
        return torch.empty_like(x)
