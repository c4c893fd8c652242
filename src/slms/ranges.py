"""The range of a numeric setting, written once as field metadata (`num(default, lo, hi)`):
the config loader checks each config field against it (slms.config.check_numbers) and the
command line makes each option's argparse type from it (slms.commands.options), so that a value
is finite and in range everywhere or refused in the same words. Torch-free."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Range:
    """The values a numeric config field may hold (its field metadata, `num(...)`): finite, at
    least `lo` (more than it when `lo_open`) and at most `hi` (less when `hi_open`); `note` says
    what a special value means ("0 = off")."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""

    def holds(self, x: float) -> bool:
        if isinstance(x, float) and not math.isfinite(x):
            return False
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return False
        return self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)

    def rule(self, integer: bool) -> str:
        """The rule in words: "an integer between 1 and 4,096", "a number in [0, 1)"."""
        kind = "an integer" if integer else "a finite number"
        lo, hi = (None if b is None else f"{int(b):,}" if integer or b == int(b) else f"{b:g}"
                  for b in (self.lo, self.hi))
        if lo is not None and hi is not None:
            if integer and not (self.lo_open or self.hi_open):
                text = f"{kind} between {lo} and {hi}"
            else:
                left, right = "([" [not self.lo_open], ")]"[not self.hi_open]
                text = f"{kind} in {left}{lo}, {hi}{right}"
        elif lo is not None:
            text = f"{kind} {'>' if self.lo_open else '>='} {lo}"
        elif hi is not None:
            text = f"{kind} {'<' if self.hi_open else '<='} {hi}"
        else:
            text = kind
        return f"{text} ({self.note})" if self.note else text


def num(default: Any, lo: float | None = None, hi: float | None = None, *,
        lo_open: bool = False, hi_open: bool = False, note: str = "") -> Any:
    """A numeric dataclass field with its Range, checked by validate() (`check_numbers`) and by
    the command-line options made from the field (slms.commands.options.add_field)."""
    return field(default=default, metadata={"range": Range(lo, hi, lo_open, hi_open, note)})


def range_of(cls: type, name: str) -> Range | None:
    """The Range of field `name` of dataclass `cls`, or None for a field that is not a number."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.metadata.get("range")


def numeric_type(tp: Any) -> type | None:
    """int or float for an annotation `int`, `float`, `int | None`, ...; None for others."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else None
    return tp if tp in (int, float) else None


def refusal(value: Any, rng: Range, integer: bool) -> str | None:
    """None when `value` is a number of the kind (an int for `integer`) in `rng`, else what is
    wrong ("must be an integer >= 1, got 0")."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        isinstance(value, int) or not integer)
    return None if ok and rng.holds(value) else f"must be {rng.rule(integer)}, got {shown(value)}"


def shown(value: Any, most: int = 60) -> str:
    """repr(value), cut to about `most` characters (an error line stays short)."""
    text = repr(value)
    return text if len(text) <= most else text[:most - 3] + "..."
