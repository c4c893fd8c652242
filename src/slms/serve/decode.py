"""Batched decoding for the server: a prefill per request, then decode steps of every running
row, each at its own position, through the model's own forward.

A prefill runs one prompt with its own KVCache; its keys and values are copied into a row of
`SlotCache`, the model's KV caches sized to the server's batch. A decode step feeds one token
per row: `GPT.forward` writes each at its row's length and lets it attend to its row's keys
(and, with `model.document_mask`, those of its current document) only.

Shapes: B rows, V vocab.
"""

from __future__ import annotations

import torch

from slms.model import GPT
from slms.model.attention import KVCache


class SlotCache:
    """The KV caches (one per layer) of up to `rows` sequences, one row each; rows 0 .. n-1
    are the live ones (the scheduler keeps them packed)."""

    def __init__(self, model: GPT, rows: int, max_len: int):
        # torch.zeros of a large block maps pages lazily: memory grows with the rows used
        self.layers = model.new_caches(rows, max_len)

    @property
    def lengths(self) -> list[int]:
        """Tokens held per row."""
        return self.layers[0].lengths

    def load(self, row: int, caches: list[KVCache]) -> None:
        """Row `row` := one sequence's keys and values, from the KV caches of its prefill."""
        for mine, theirs in zip(self.layers, caches, strict=True):
            mine.copy_row(row, theirs)

    def move(self, src: int, dst: int) -> None:
        """Row `dst` := row `src` (to keep the live rows packed when one ends)."""
        for layer in self.layers:
            layer.copy_row(dst, layer, src)


@torch.no_grad()
def prefill(model: GPT, ids: list[int]) -> tuple[torch.Tensor, list[KVCache]]:
    """(logits_V of the last prompt position, its KV caches) of one prompt (for
    `SlotCache.load`)."""
    caches = model.new_caches(1, len(ids))
    out = model(torch.tensor([ids], device=model.device), caches=caches, last_only=True)
    return out.logits[0, -1], caches


@torch.no_grad()
def decode_step(model: GPT, cache: SlotCache, tokens_B: torch.Tensor) -> torch.Tensor:
    """logits_BV of the next token of rows 0 .. B-1, each fed its token at its own position;
    the rows' caches grow by one."""
    return model(tokens_B[:, None], caches=cache.layers).logits[:, 0]
