"""A study's results: one `Result` per trained variant, with its evaluation curve of `Point`s
(study.json lists them with these keys, in this order: `slms.study.report`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Point:
    """One evaluation of a run: cumulative training FLOPs and training seconds (the optimizer
    steps' time, evaluation excluded) up to its step, and its validation scores."""

    step: int
    flops: float
    train_seconds: float
    val_bpb: float
    val_loss: float


@dataclass(frozen=True)
class Result:
    """One trained variant, as study.json lists it."""

    name: str  # the variant's, also its run directory's
    kind: str  # dense | moe | upcycled
    n_experts: int
    top_k: int
    expert_hidden: int
    params_total: int
    params_active: int  # per token
    flops_per_token: int
    steps: int
    flops: float  # training FLOPs of its steps (those of the dense run before, for upcycled)
    flops_vs_budget: float | None  # None with a minutes budget
    final_val_bpb: float
    best_val_bpb: float
    train_seconds: float
    tokens_per_s: float
    precision: str  # as trained (auto resolved)
    # other processes on the CPU slow the run (and only its seconds): a load average above
    # the run's threads says it did not run alone
    load_avg_1min_after: float | None
    run_seconds: float  # the training call's, evaluation and checkpoints included
    run_dir: str
    curve: list[Point]
    # the upcycled variant's (absent from the others' entries): the dense run's step it
    # started from, the upcycled checkpoint it trained from, the expert noise
    upcycled_at_step: int | None = None
    init: str | None = None
    expert_noise: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.upcycled_at_step is None:
            for key in ("upcycled_at_step", "init", "expert_noise"):
                del out[key]
        return out
