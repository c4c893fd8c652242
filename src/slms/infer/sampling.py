"""How to sample a generation: the `Sampling` settings, checked when made. Torch-free, so that
the command line builds its generation options from these fields (slms.commands.options)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

LENGTH_RULE = "an integer >= 1"  # what a generation length must be


class SamplingError(ValueError):
    """A `Sampling` value outside its rule; `field` names it (the server reports it under its
    own name for the field)."""

    def __init__(self, field: str, rule: str, value: object):
        self.field, self.rule, self.value = field, rule, value
        super().__init__(self.message(field))

    def message(self, name: str) -> str:
        """The error's line, the field called `name`."""
        return f"{name} must be {self.rule}; got {self.value!r}"


@dataclass
class Sampling:
    """How to sample. Checked when made (and by `dataclasses.replace`), so `slms generate`,
    chat's :settings, bench, the server and the Python API accept and refuse the same values, in
    the same words (a `SamplingError` naming the field)."""

    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: int | None = 50  # None or 0 = off
    top_p: float | None = None  # None or 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        n, t, k, p = self.max_new_tokens, self.temperature, self.top_k, self.top_p
        rp, seed = self.repetition_penalty, self.seed
        rules = [  # (field, holds, rule)
            ("max_new_tokens", is_int(n) and n >= 1, LENGTH_RULE),
            ("temperature", _is_real(t) and t >= 0, "a number >= 0 (0 is greedy)"),
            ("top_k", k is None or (is_int(k) and k >= 0), "an integer >= 0 (0 is off)"),
            ("top_p", p is None or (_is_real(p) and 0 < p <= 1), "in (0, 1] (1 is off)"),
            ("repetition_penalty", _is_real(rp) and rp > 0, "a number > 0 (1 is off)"),
            ("seed", seed is None or (is_int(seed) and -2**63 <= seed < 2**64),
             "an integer in [-2**63, 2**64)"),  # what torch.Generator.manual_seed takes
        ]
        for name, holds, rule in rules:
            if not holds:
                raise SamplingError(name, rule, getattr(self, name))


def is_int(x: object) -> bool:
    """An integer that is not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)
