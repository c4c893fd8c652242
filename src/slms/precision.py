"""`precision = "auto"`: bf16 autocast where bf16 matmuls are fast, fp32 elsewhere.

Decided by measurement, not by a list of CPU names: on a CPU, a short matmul micro-benchmark
times fp32 against bf16 once per machine (about 0.1 s; cached by CPU model, thread count and
torch version). CPUs with AMX or fast AVX512-BF16 run bf16 matmuls several times faster than
fp32; CPUs without bf16 units run them hundreds of times slower. On CUDA, bf16 is used where
the GPU supports it.
"""

from __future__ import annotations

import time

import torch

from slms.machine import cpu_model, machine_key, measured

__all__ = ["DTYPES", "auto_reason", "cpu_model", "inference_dtype", "resolve_precision"]

PROBE_SIZE = 256  # a 256^3 matmul: ~33 MFLOP, milliseconds where bf16 is fast or slow alike
FAST = 1.25  # bf16 must beat fp32 by this factor to be chosen


def resolve_precision(name: str, device: torch.device) -> str:
    """The precision to run in: `name`, or for "auto" bf16 where it is fast, else fp32."""
    if name != "auto":
        return name
    return "bf16" if bf16_is_fast(device) else "fp32"


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def inference_dtype(name: str, device: torch.device) -> torch.dtype:
    """The weights' dtype for generation: `name`, or for "auto" bf16 where it is fast for
    generation's shapes. On a CPU that means both training's probe and a one-row (decoding)
    matmul probe: decoding multiplies one row per sequence, where a CPU's bf16 kernels can be
    slower than fp32 even when large bf16 matmuls are several times faster (docs/benchmarks.md:
    on an AMD EPYC with AVX512-BF16, bf16 weights decoded seed-moe 0.7x as fast as fp32)."""
    if name == "auto" and device.type == "cpu":
        fast = bf16_is_fast(device) and cpu_bf16_decode_speedup() >= FAST
        return torch.bfloat16 if fast else torch.float32
    return DTYPES[resolve_precision(name, device)]


def cpu_bf16_decode_speedup() -> float:
    """fp32 time / bf16 time of a one-row linear layer (256 -> 1024, decoding's shape) on
    this CPU, measured once per machine and thread count (cached as cpu_bf16_speedup)."""
    return float(measured("precision", machine_key() + "|decode",
                          lambda: measure_decode_speedup()))


def measure_decode_speedup(width: int = PROBE_SIZE, repeats: int = 5, calls: int = 50) -> float:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, width, generator=g), torch.randn(4 * width, width, generator=g)
    b = torch.randn(4 * width, generator=g)

    def best(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> float:
        torch.nn.functional.linear(x, w, b)  # warm-up
        out = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(calls):
                torch.nn.functional.linear(x, w, b)
            out = min(out, (time.perf_counter() - t0) / calls)
        return max(out, 1e-9)
    return best(x, w, b) / best(x.bfloat16(), w.bfloat16(), b.bfloat16())


def auto_reason(device: torch.device) -> str:
    """Why "auto" chose what it chose, in a few words for the log."""
    if device.type == "cuda":
        return f"bf16 {'supported' if torch.cuda.is_bf16_supported() else 'not supported'}"
    if device.type != "cpu":
        return f"fp32 on {device.type}"
    return (f"bf16 matmuls measured {cpu_bf16_speedup():.2f}x as fast as fp32 on this CPU; "
            f"bf16 needs >= {FAST}x")


def bf16_is_fast(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return cpu_bf16_speedup() >= FAST


def cpu_bf16_speedup() -> float:
    """fp32 time / bf16 time of a small matmul on this CPU (> 1: bf16 is faster), measured
    once per machine and thread count and cached in ~/.cache/slms/precision.json."""
    return float(measured("precision", machine_key(), lambda: measure_speedup()))


def measure_speedup(n: int = PROBE_SIZE, repeats: int = 5) -> float:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    return _best_time(a, b, repeats) / _best_time(a.bfloat16(), b.bfloat16(), repeats)


def _best_time(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    a @ b  # warm-up (oneDNN primitive creation)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
        if best > 0.05:  # a slow path (no bf16 units): one sample says enough
            break
    return max(best, 1e-9)
