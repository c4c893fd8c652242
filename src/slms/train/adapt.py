"""The recipe that adapts to the data and the budget (`train.adapt`).

A recipe tuned on one data size does not generalise to another: on 1M training tokens the
modern preset wins by 0.15 bits per byte, on 190,000 it memorises its text by step 300 and
ends worse than the GPT-2 recipe (issue 24; docs/quality.md "At three data sizes"). What
decides is how many times the budget lets a run pass over its training tokens. `choose` maps
that number to the regularisation measured best for it; the trainer applies the choice once
the number is known: at the start for a step budget, at the time budget's first fit otherwise
(dropout and weight decay change no parameter, so a live model takes them as they are).

The rule is the sweep's result, written down in RULE (docs/quality.md has the sweep).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# (most passes over the training tokens, dropout, weight decay), the first row that fits;
# docs/quality.md "At three data sizes" has the sweep these come from.
RULE: tuple[tuple[float, float, float], ...] = (
    (10.0, 0.0, 0.1),  # up to ~8 passes (1M tokens, 10 minutes) no dropout was best
    (20.0, 0.1, 0.1),
    (float("inf"), 0.2, 0.1),  # ~33 passes (190K tokens, 10 minutes): 0.2 scored 0.107 better
)


@dataclass(frozen=True)
class Choice:
    """What the rule chose, and from what."""

    train_tokens: int
    passes: float  # planned training tokens / training tokens
    dropout: float
    weight_decay: float

    def describe(self, budget: str) -> str:
        """One line for the log: the inputs, then the choice."""
        return (f"adapt: {self.train_tokens:,} training tokens, ~{passes_text(self.passes)} "
                f"passes in "
                f"{budget}: dropout {self.dropout:g}, weight decay {self.weight_decay:g} "
                "(train.adapt=false keeps the config's)")


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
