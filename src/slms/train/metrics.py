"""Training metrics: one JSON object per line in metrics.jsonl, and compact console summaries.

Throughput fields of a training record, over the steps since the previous record (evaluation
time excluded):
    tokens_per_s  real (scored) target tokens per second: pads are not counted
    mfu           model FLOPs utilisation = flops_per_token * tokens_per_s / peak FLOP/s of the
                  devices; FLOPs per token as `slms info` counts them (forward + backward:
                  6 x active matmul weights + non-causal attention at context block_size, the
                  PaLM / nanoGPT convention); null when the peak is unknown
    tokens        real target tokens seen since the start of the run
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from slms.memory import peak_memory
from slms.rundir import RunDir

# Dense peak FLOP/s per device (bf16/fp16 tensor cores, and fp32 without TF32), from the vendors'
# data sheets. More specific names first ("H100 PCIe" before "H100").
PEAK_FLOPS: list[tuple[str, float, float]] = [
    ("H200", 989e12, 67e12),
    ("GH200", 989e12, 67e12),
    ("H100 PCIe", 756e12, 51e12),
    ("H100", 989e12, 67e12),
    ("A100", 312e12, 19.5e12),
    ("L40S", 362e12, 91.6e12),
    ("L4", 121e12, 30.3e12),
    ("A10", 125e12, 31.2e12),
    ("RTX 4090", 165e12, 82.6e12),
    ("V100", 125e12, 15.7e12),
]


class TensorBoardMissingError(ValueError):
    """train.tensorboard = true without the tensorboard package."""


class MetricsWriter:
    """metrics.jsonl (always) and TensorBoard events (optional); disabled on ranks > 0.

    `path` is a run's metrics file (`RunDir.metrics_file`); the events go to that run
    directory's `RunDir.tensorboard_dir`."""

    def __init__(self, path: str | Path, enabled: bool = True, tensorboard: bool = False):
        self.path = Path(path)
        self.enabled = enabled
        self.tb = None
        if tensorboard and enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TensorBoardMissingError(
                    "train.tensorboard = true needs the tensorboard package: "
                    "pip install tensorboard (or set train.tensorboard=false)") from None
            self.tb = SummaryWriter(str(RunDir(self.path.parent).tensorboard_dir))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and value is not None:
                    self.tb.add_scalar(key, value, record["step"])
            for i, layer in enumerate(record.get("moe", [])):
                self.tb.add_scalar(f"moe/load_max_over_mean/layer{i}", layer["max_over_mean"],
                                   record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def peak_flops(device: torch.device, precision: str, configured: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: train.peak_flops when set, else the data-sheet figure for a
    known GPU, else None (MFU is not reported: a CPU's peak is not a well-defined number)."""
    if configured > 0:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, low, fp32 in PEAK_FLOPS:
        if key in name:
            return fp32 if precision == "fp32" else low
    return None


def memory_gb(device: torch.device) -> tuple[float, str]:
    """(GB, what): peak CUDA memory allocated, else the process's peak resident set size."""
    peak, kind = peak_memory(device)
    return peak / 1e9, kind


def console_line(r: dict[str, Any], max_steps: int) -> str:
    """One line per log interval: step, loss, lr, grad norm, tokens/s, MFU (non-causal attention
    FLOPs, PaLM's convention: see the module docstring), memory."""
    mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
    line = (f"step {r['step']}/{max_steps} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | "
            f"grad norm {r['grad_norm']:.3f} | {fmt_count(r['tokens_per_s'])} tok/s | "
            f"MFU {mfu} | mem {r['memory_gb']:.2f} GB")
    if r.get("skipped_steps"):
        line += f" | skipped {r['skipped_steps']} non-finite"
    return line


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics file, or of a run directory's."""
    path = Path(path)
    if path.is_dir():
        path = RunDir(path).metrics_file
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            record = None
        if not isinstance(record, dict):
            if n == len(lines) and not line.endswith("\n"):
                break  # the line a crash cut short: the run's resume drops it too
            raise ValueError(f"{path}:{n} is not a metrics record (a JSON object); the file "
                             "is damaged: remove that line")
        records.append(record)
    return records


def moe_summary(layers: list[dict[str, Any]]) -> str:
    """One compact line: per MoE layer the max/mean expert load (1.00 = perfect balance)."""
    if not layers:
        return ""
    loads = " ".join(f"{layer['max_over_mean']:.2f}" for layer in layers)
    aux = sum(layer["aux_loss"] for layer in layers) / len(layers)
    dropped = max(layer["dropped_share"] for layer in layers)
    line = f"moe load max/mean per layer: {loads} | balance loss {aux:.3f}"
    return line + (f" | dropped {dropped:.1%}" if dropped else "")


def expert_usage_line(shares: list[float]) -> str:
    """'e0 13% e1 12% ...': the share of routed tokens each expert received."""
    return " ".join(f"e{i} {s:.0%}" for i, s in enumerate(shares))


def fmt_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}" if not math.isnan(n) else "nan"
