"""Dropout that is cheap on CPU.

`torch.nn.Dropout` draws its mask with `bernoulli_`, one float per element from a generator
that runs on one thread: at the modern CPU preset's shape (16 x 256 x 192) a mask costs
10-14 ms, about as much as a block's matmuls (docs/benchmarks.md "Dropout on CPU"). One random
byte per element from `randint` costs a third of that, so on CPU the mask is drawn as bytes
and the rate rounded to a multiple of 1/256 (0.2 -> 51/256 = 0.199; `effective_rate`); other
devices keep `F.dropout`, whose fused kernels are already cheap. Both draw from torch's
generator, so a resumed run restores the same masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LEVELS = 256  # a CPU mask drops an element when its random byte is below round(p * LEVELS)


def effective_rate(p: float, device: torch.device) -> float:
    """The rate a CPU mask applies for `p` (exactly `p` on other devices)."""
    return round(p * LEVELS) / LEVELS if device.type == "cpu" else p


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout of `x` at rate `p` when training (kept elements scaled by 1/(1-p))."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    cut = round(p * LEVELS)
    if cut == 0:
        return x
    if cut >= LEVELS:
        return torch.zeros_like(x)
    keep = torch.randint(0, LEVELS, x.shape, dtype=torch.uint8, device=x.device) >= cut
    return x * keep * (LEVELS / (LEVELS - cut))


class Dropout(nn.Module):
    """`nn.Dropout`'s interface (`p`, train/eval), with `dropout`'s cheap CPU mask."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
