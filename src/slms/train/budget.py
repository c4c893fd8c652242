"""Training to a time budget (train.max_minutes) and watching validation (overfitting
warnings, train.early_stop).

max_minutes: the first PROBE_STEPS optimizer steps are timed (evaluation and checkpoints are
not counted), then max_steps is fixed so that training fits the budget, and the learning-rate
schedule is computed from it (its warm-up steps do not depend on the total, so the probe's steps
follow the same schedule; with the onecycle schedule they use the provisional total). The first
steps of some models run slower than the rest, so the count is fitted again after REFIT_STEPS
steps, from their second half; and a machine's speed drifts (other work, clocks: a 10-minute run
here sped up 15% after its first minute, another slowed 12%), so it is refitted from the speed
of the steps since the last fit at a quarter, half and three quarters of the fitted count; a
count is taken only where it moves by more than MIN_CHANGE (the schedule's remaining progress
then spreads over the new total: the learning rate is continuous, `optim.Schedule.refit`). The
budget's state (step times, time spent, the count, the fits done) is saved in every checkpoint,
so a resumed run continues its budget instead of starting it over.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

PROBE_STEPS = 10
# train.max_steps of a run with a time budget until its probe steps are timed and the trainer
# sets the steps that fit: more than any such run takes
PROVISIONAL_STEPS = 10**9
REFIT_STEPS = 50
REFIT_SHARES = (0.25, 0.5, 0.75)  # of the fitted step count, where it is refitted once more
MIN_CHANGE = 0.01  # a refit that moves the count by at most this share keeps the old count


@dataclass
class TimeBudget:
    """Every process times its own steps and proposes a count at the same steps (`record`);
    the trainer takes rank 0's proposal to all of them, and `accept` decides alike on each."""

    minutes: float  # 0: no budget (or fitted for good)
    times: list[float] = field(default_factory=list)  # seconds of each step so far
    spent: float = 0.0  # their sum
    steps: int | None = None  # the accepted count
    mark: int = 0  # the step of the last fit: later fits time the steps since
    shares_done: int = 0  # how many of REFIT_SHARES were fitted at

    @property
    def started(self) -> bool:
        """Whether any step was timed or a count fitted (a run without a budget: never)."""
        return bool(self.times) or self.steps is not None

    def record(self, seconds: float) -> int | None:
        """Add one step's time; at a fitting step (PROBE_STEPS, REFIT_STEPS, then REFIT_SHARES
        of the accepted count) returns the count that would fill the budget, else None."""
        if self.minutes <= 0:
            return None
        self.times.append(seconds)
        self.spent += seconds
        n = len(self.times)
        if n in (PROBE_STEPS, REFIT_STEPS):
            window = self.times[n // 2:]  # after warm-up
        elif n > REFIT_STEPS and n == self._next_share():
            self.shares_done += 1
            window = self.times[self.mark:]  # the speed since the last fit
        else:
            return None
        self.mark = n
        left = self.minutes * 60 - self.spent
        return n + max(0, math.floor(left / statistics.median(window)))

    def accept(self, proposal: int) -> int | None:
        """The count to train for from now on (None: keep the current one, moved by at most
        MIN_CHANGE); after the last fit the budget is done."""
        moved = self.steps is None or abs(proposal - self.steps) > MIN_CHANGE * self.steps
        if moved:
            self.steps = proposal
        n = len(self.times)
        if self.steps <= REFIT_STEPS or (n >= REFIT_STEPS and self._next_share() is None):
            self.minutes = 0  # fitted for good
            self.times = []  # no window is timed again
        return proposal if moved else None

    @property
    def settled_now(self) -> bool:
        """Whether the fit just made is the one to plan by: the fit after warm-up
        (REFIT_STEPS; the first steps run slower than the rest), or the first when it was
        final. Call it right after `accept`."""
        return self.mark == REFIT_STEPS or (self.mark == PROBE_STEPS and self.minutes == 0)

    def _next_share(self) -> int | None:
        """The step of the next REFIT_SHARES fit (None: no more), of the accepted count; shares
        that fall before the current step are passed over (counted in shares_done)."""
        n = len(self.times)
        while self.shares_done < len(REFIT_SHARES):
            step = math.ceil(REFIT_SHARES[self.shares_done] * (self.steps or 0))
            if step >= n:
                return step
            self.shares_done += 1
        return None


@dataclass
class ValidationWatch:
    """Evaluations since the best one, and the last (mean train loss, val loss) pair. The
    training loss compared is the mean over the steps since the previous evaluation: one
    step's loss is noisier than late-run changes of the validation loss. Its state is saved in
    every checkpoint (a resumed run keeps its patience count)."""

    patience: int  # train.early_stop: stop after this many evaluations without a new best
    best: float = math.inf
    since_best: int = 0
    last: tuple[float, float] | None = None
    window_sum: float = 0.0  # finite training losses since the previous evaluation
    window_steps: int = 0
    train_at_best: float | None = None  # the mean training loss before the best evaluation

    def add_train(self, loss: float) -> None:
        """One optimizer step's training loss (non-finite ones are left out)."""
        if math.isfinite(loss):
            self.window_sum += loss
            self.window_steps += 1

    def evaluated(self, val_loss: float) -> str | None:
        """`update` with the mean training loss of the window, which then starts again."""
        train = self.window_sum / self.window_steps if self.window_steps else None
        self.window_sum, self.window_steps = 0.0, 0
        return self.update(train, val_loss)

    def update(self, train_loss: float | None, val_loss: float) -> str | None:
        """Record an evaluation; returns a warning when validation loss rose while training
        loss fell since the previous evaluation (the model is fitting its training set)."""
        warning = None
        if self.last is not None and train_loss is not None:
            prev_train, prev_val = self.last
            if val_loss > prev_val and train_loss < prev_train:
                warning = (f"validation loss rose {prev_val:.4f} -> {val_loss:.4f} while "
                           f"mean training loss fell {prev_train:.4f} -> {train_loss:.4f}: "
                           "overfitting; best/ keeps the best checkpoint (more data, dropout, "
                           "weight decay or train.early_stop help)")
        self.last = (train_loss, val_loss) if train_loss is not None else self.last
        if val_loss < self.best:
            self.best, self.since_best, self.train_at_best = val_loss, 0, train_loss
        else:
            self.since_best += 1
        return warning

    @property
    def overfitting(self) -> bool:
        """Since the best evaluation, validation loss rose while training loss fell."""
        if self.last is None or self.train_at_best is None or self.last[0] is None:
            return False
        train, val = self.last
        return val > self.best and train < self.train_at_best

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.since_best >= self.patience
