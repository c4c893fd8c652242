"""Next-token sampling: temperature, top-k, top-p (nucleus), repetition penalty.

Shapes: B batch, V vocab, T tokens so far.
"""

from __future__ import annotations

import torch


def sample_next(logits_BV: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, repetition_penalty: float = 1.0,
                history_BT: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row. temperature 0 is greedy (argmax after the repetition penalty).

    Any finite temperature > 0 and repetition penalty > 0 samples (1e-300 included): the
    maths is in float64, logits are kept finite, and the best is moved to 0 before dividing by
    the temperature, so no setting turns the distribution into inf or nan."""
    logits_BV = logits_BV.double()  # a copy
    if repetition_penalty != 1.0 and history_BT is not None:
        # CTRL-style: seen tokens' positive logits are divided, negative ones multiplied.
        seen = torch.gather(logits_BV, 1, history_BT)
        seen = torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty)
        logits_BV.scatter_(1, history_BT, seen)
    big = torch.finfo(logits_BV.dtype).max
    logits_BV = logits_BV.clamp(-big, big)  # +-inf to the largest finite (nan stays nan)
    if temperature <= 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = (logits_BV - logits_BV.amax(-1, keepdim=True)) / temperature
    if top_k is not None and 0 < top_k < logits_BV.size(-1):
        kth = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, sorted_idx = logits_BV.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already cover top_p; the best always stays.
        drop = (cum - sorted_logits.softmax(-1)) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits_BV = torch.full_like(logits_BV, float("-inf")).scatter(1, sorted_idx,
                                                                       sorted_logits)
    probs = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
