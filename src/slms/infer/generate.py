"""Text generation from a prompt: the sampling options and the prompt and length checks (of the
CLI, chat and the server alike), seeding, streaming decoded text."""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from slms.infer.detokenize import TextStream
from slms.model import GPT
from slms.tokenizer import Tokenizer

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
    """How to sample. Checked when made (and by `dataclasses.replace`), so `slms generate`, chat's
    :settings, bench, the server and the Python API accept and refuse the same values, in the
    same words (a `SamplingError` naming the field)."""

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


def check_room(max_new_tokens: int, context: int) -> None:
    """The one check of a generation length against a model's context: the prompt needs at
    least one position (its start token)."""
    if max_new_tokens < 1:
        raise SamplingError("max_new_tokens", LENGTH_RULE, max_new_tokens)
    if max_new_tokens >= context:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for the prompt in the "
                         f"model's context of {context} tokens; use at most {context - 1}")


def check_prompt(ids: list[int]) -> list[int]:
    """A prompt's ids (with its prefix), refused when there are none: an empty prompt for a
    tokenizer without a start token."""
    if not ids:
        raise ValueError("the prompt is empty and this model's tokenizer has no start token "
                         "(an imported seed model): give a prompt")
    return ids


def prompt_ids(tokenizer: Tokenizer, prompt: str, context: int, max_new_tokens: int,
               truncate: str | None = None, warn: Callable[[str], None] | None = None
               ) -> list[int]:
    """The prompt's ids after the tokenizer's prompt prefix (slms: the end-of-text id, as stories
    start after one in training).

    A prompt that does not fit the context with `max_new_tokens` is an error, or with
    truncate='left' keeps its last tokens (with a warning).
    """
    check_room(max_new_tokens, context)
    prefix = tokenizer.prompt_prefix
    ids = check_prompt(tokenizer.encode_prompt(prompt))
    room = context - max_new_tokens
    if len(ids) > room:
        if truncate != "left":
            raise ValueError(f"the prompt is {len(ids) - len(prefix)} tokens; "
                             f"with --max-new-tokens "
                             f"{max_new_tokens} it does not fit the model's context of {context} "
                             "tokens: shorten it, lower --max-new-tokens, or pass --truncate left")
        keep = room - len(prefix)
        if keep < 1:
            raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for the prompt "
                             f"in the model's context of {context} tokens; lower it")
        (warn or (lambda m: print(m, file=sys.stderr)))(
            f"warning: prompt truncated to its last {keep} tokens")
        ids = [*prefix, *ids[len(ids) - keep:]]  # the start token stays
    return ids


def stream_text(model: GPT, tokenizer: Tokenizer, ids: list[int], s: Sampling
                ) -> Iterator[str]:
    """Yield decoded text pieces as tokens are sampled; stops at end-of-text."""
    device = next(model.parameters()).device
    gen = None
    if s.seed is not None:
        gen = torch.Generator(device=device).manual_seed(s.seed)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    stream = TextStream(tokenizer)
    for tok in model.iter_tokens(idx, s.max_new_tokens, s.temperature, s.top_k, s.top_p,
                                 s.repetition_penalty, tokenizer.eos_id, gen):
        t = int(tok[0])
        if t == tokenizer.eos_id:
            break
        piece, _ = stream.push(t)
        if piece:
            yield piece
    piece, _ = stream.flush()
    if piece:
        yield piece


def generate_text(model: GPT, tokenizer: Tokenizer, prompt: str, s: Sampling,
                  truncate: str | None = None) -> str:
    ids = prompt_ids(tokenizer, prompt, model.cfg.block_size, s.max_new_tokens, truncate)
    return "".join(stream_text(model, tokenizer, ids, s))
