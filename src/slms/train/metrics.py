"""Training metrics: one JSON object per line in metrics.jsonl, and compact console summaries."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsWriter:
    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


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
