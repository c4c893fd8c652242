"""Training to a time budget (train.max_minutes) and watching validation (overfitting
warnings, train.early_stop).

max_minutes: the first PROBE_STEPS optimizer steps are timed (evaluation and checkpoints are
not counted), then max_steps is fixed so that training fits the budget, and the learning-rate
schedule is computed from it (its warm-up steps do not depend on the total, so the probe's steps
follow the same schedule; with the onecycle schedule they use the provisional total). The first
steps of some models run slower than the rest, so the count is fitted once more after
REFIT_STEPS steps, from their second half. The fixed max_steps is written to the run's config,
so a resumed run does not probe again and reproduces the uninterrupted one.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

PROBE_STEPS = 10
REFIT_STEPS = 50


@dataclass
class TimeBudget:
    minutes: float  # 0: no budget
    times: list[float] = field(default_factory=list)  # seconds of the probe's steps

    def record(self, seconds: float) -> int | None:
        """Add one step's time; returns the total number of steps when it is fitted (after
        PROBE_STEPS and again after REFIT_STEPS steps, if the run gets that far), else None."""
        if self.minutes <= 0:
            return None
        self.times.append(seconds)
        if len(self.times) not in (PROBE_STEPS, REFIT_STEPS):
            return None
        per_step = statistics.median(self.times[len(self.times) // 2:])  # after warm-up
        left = self.minutes * 60 - sum(self.times)
        steps = len(self.times) + max(0, math.floor(left / per_step))
        if len(self.times) == REFIT_STEPS or steps <= REFIT_STEPS:
            self.minutes = 0  # fitted for good
        return steps


@dataclass
class ValidationWatch:
    """Evaluations since the best one, and the last (train loss, val loss) pair."""

    patience: int  # train.early_stop: stop after this many evaluations without a new best
    best: float = math.inf
    since_best: int = 0
    last: tuple[float, float] | None = None

    def update(self, train_loss: float | None, val_loss: float) -> str | None:
        """Record an evaluation; returns a warning when validation loss rose while training
        loss fell since the previous evaluation (the model is fitting its training set)."""
        warning = None
        if self.last is not None and train_loss is not None:
            prev_train, prev_val = self.last
            if val_loss > prev_val and train_loss < prev_train:
                warning = (f"validation loss rose {prev_val:.4f} -> {val_loss:.4f} while "
                           f"training loss fell {prev_train:.4f} -> {train_loss:.4f}: "
                           "overfitting; best/ keeps the best checkpoint (more data, dropout, "
                           "weight decay or train.early_stop help)")
        self.last = (train_loss, val_loss) if train_loss is not None else self.last
        if val_loss < self.best:
            self.best, self.since_best = val_loss, 0
        else:
            self.since_best += 1
        return warning

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.since_best >= self.patience
