"""The recipe that adapts to the data and the budget (`train.adapt`).

A recipe tuned on one data size does not generalise to another: on 1M training tokens the
modern preset wins by 0.15 bits per byte, on 190,000 it memorises its text by step 300 and
ends worse than the GPT-2 recipe (issue 24; docs/quality.md "At three data sizes"). What
decides is how many times the budget lets a run pass over its training tokens. `choose` maps
that number to the regularisation measured best for it; the trainer applies the choice once
the number is known: at the start for a step budget; for a time budget at its fit after the
warm-up steps (`TimeBudget.settled_now`; dropout and weight decay change no parameter, so a live
model takes them as they are).

The rule is the sweep's result, written down in RULE (docs/quality.md has the sweep).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from slms.config import RunConfig
from slms.rundir import RunDir

# (most passes over the training tokens, dropout, weight decay), the first row that fits;
# docs/quality.md "At three data sizes" has the sweep these come from.
RULE: tuple[tuple[float, float, float], ...] = (
    (10.0, 0.0, 0.1),  # up to ~8 passes (1M tokens, 10 minutes) no dropout was best
    (20.0, 0.1, 0.1),
    (float("inf"), 0.2, 0.1),  # ~33 passes (190K tokens, 10 minutes): 0.2 scored 0.107 better
)


# A budget that allows more passes than this trains this many, its schedule annealed over them,
# and stops: past them the model only memorises its text (docs/quality.md "At three data
# sizes": on 55,000 tokens 11 annealed passes scored 0.04 bits per byte better than 45).
MOST_PASSES = 12.0


@dataclass(frozen=True)
class Choice:
    """What the rule chose, and from what."""

    train_tokens: int
    passes: float  # what the budget allows: planned training tokens / training tokens
    dropout: float
    weight_decay: float

    @property
    def capped(self) -> bool:
        """Whether the run trains fewer passes than its budget allows (MOST_PASSES)."""
        return self.passes > MOST_PASSES

    def steps(self, planned: int) -> int:
        """The steps to train of `planned`: all of them, or MOST_PASSES' worth."""
        return max(1, math.ceil(planned * MOST_PASSES / self.passes)) if self.capped \
            else planned

    def describe(self, budget: str, planned: int) -> str:
        """One line for the log: the inputs, then the choice."""
        line = (f"adapt: {self.train_tokens:,} training tokens, ~{passes_text(self.passes)} "
                f"passes in {budget}: dropout {self.dropout:g}, weight decay "
                f"{self.weight_decay:g}")
        if self.capped:
            line += (f"; training {MOST_PASSES:g} passes ({self.steps(planned):,} of the "
                     f"{planned:,} steps), as more would only memorise the text")
        return line + " (train.adapt=false keeps the config's)"


def passes_text(passes: float) -> str:
    """33, 8.3, 0.45: two significant digits, never an exponent."""
    return f"{passes:,.0f}" if passes >= 10 else f"{passes:.2g}"


def choose(train_tokens: int, planned_tokens: float) -> Choice:
    """The regularisation for a run that plans `planned_tokens` over `train_tokens`."""
    passes = planned_tokens / max(train_tokens, 1)
    _, dropout, wd = next(row for row in RULE if passes <= row[0])
    return Choice(train_tokens, passes, dropout, wd)


def set_weight_decay(opt: torch.optim.Optimizer, model: torch.nn.Module, weight_decay: float
                     ) -> None:
    """Set the decay of the groups of decayed parameters (`optim.decayed_parameters`: norms,
    biases and embeddings stay undecayed)."""
    from slms.train.optim import decayed_parameters

    decayed = decayed_parameters(model)
    for group in opt.param_groups:
        if id(group["params"][0]) in decayed:
            group["weight_decay"] = weight_decay


def at_start(cfg: RunConfig, train_tokens: int, tokens_per_step: int, resuming: Path | None,
             log) -> RunConfig:
    """train.adapt before the model is built: a resumed run keeps what it chose when it
    started (its run_config.json); a step budget chooses now, a time budget once it has settled
    (the trainer's `adapt_live`)."""
    tc = cfg.train
    if not tc.adapt:
        return cfg
    if resuming is not None:
        saved = RunDir(resuming).read_config()
        kept = {"weight_decay": saved["train"]["weight_decay"]}
        if tc.max_minutes <= 0:
            kept["max_steps"] = saved["train"]["max_steps"]
        return dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, dropout=saved["model"]["dropout"]),
            train=dataclasses.replace(tc, **kept))
    if tc.max_minutes > 0:
        return cfg
    return adapted(cfg, train_tokens, tokens_per_step, f"{tc.max_steps:,} steps", log)


def adapted(cfg: RunConfig, train_tokens: int, tokens_per_step: int, budget: str, log
            ) -> RunConfig:
    """cfg with the regularisation and the step count `choose` picks for its planned tokens."""
    tc = cfg.train
    choice = choose(train_tokens, tc.max_steps * tokens_per_step)
    log(choice.describe(budget, tc.max_steps))
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, dropout=choice.dropout),
        train=dataclasses.replace(tc, weight_decay=choice.weight_decay,
                                  max_steps=choice.steps(tc.max_steps)))
