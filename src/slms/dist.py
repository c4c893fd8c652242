"""Which process of a torchrun group this is, and the few collectives that training and
evaluation share (evaluation must not import train/). Without torchrun (or with WORLD_SIZE=1)
`Dist()` is a single process and every collective is a no-op."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this run created the process group (and destroys it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum of `values` over ranks (one all-reduce)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def mean(self, values: list[float], device: torch.device) -> list[float]:
        return [v / self.world for v in self.sum(values, device)]

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when it is True on one (all ranks agree to stop)."""
        return self.sum([float(flag)], device)[0] > 0

    def gather(self, obj: Any) -> list[Any]:
        """`obj` of every rank, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()
