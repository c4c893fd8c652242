"""Batched decoding with a position per row: the server's prefill and decode step.

The model's own KVCache keeps one position for the whole batch. A server decodes rows that
started at different times, so here each row has its own length. A prefill runs the model's
forward unchanged (one request, its own KVCache) and its keys and values are copied into a row
of `SlotCache`; a decode step then feeds one token per row through the model's own modules, at
each row's position, attending over that row's cached keys only (a mask hides the rest; with
`model.document_mask`, also the keys before the row's current document, as `GPT.forward` does).

Shapes: B rows, nh heads, S cached positions, hs head size, C n_embd, V vocab.
"""

from __future__ import annotations

import torch

from slms.model import GPT
from slms.model.attention import KVCache
from slms.model.gpt import DOCUMENT_START_ID


class SlotCache:
    """Keys and values of up to `rows` sequences, one row each, (rows, nh, max_len, hs) per
    layer; rows 0 .. n-1 are the live ones (the scheduler keeps them packed)."""

    def __init__(self, model: GPT, rows: int, max_len: int):
        cfg = model.cfg
        dtype = model.wte.weight.dtype
        device = model.wte.weight.device
        shape = (rows, cfg.n_head, max_len, cfg.head_dim)
        # torch.zeros of a large block maps pages lazily: memory grows with the rows used
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in model.blocks]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in model.blocks]
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        # where each row's current document began (document_mask models; else stays 0)
        self.doc_start = torch.zeros(rows, dtype=torch.long, device=device)

    def load(self, row: int, caches: list[KVCache]) -> None:
        """Row `row` := one sequence's keys and values, from the KV caches of its prefill."""
        n = caches[0].pos
        for layer, c in enumerate(caches):
            self.k[layer][row, :, :n] = c.k[0, :, :n]
            self.v[layer][row, :, :n] = c.v[0, :, :n]
        self.lengths[row] = n
        doc_start = caches[0].doc_start
        self.doc_start[row] = 0 if doc_start is None else doc_start[0]

    def move(self, src: int, dst: int) -> None:
        """Row `dst` := row `src` (to keep the live rows packed when one ends)."""
        n = int(self.lengths[src])
        for layer in range(len(self.k)):
            self.k[layer][dst, :, :n] = self.k[layer][src, :, :n]
            self.v[layer][dst, :, :n] = self.v[layer][src, :, :n]
        self.lengths[dst] = n
        self.doc_start[dst] = self.doc_start[src]


@torch.no_grad()
def prefill(model: GPT, ids: list[int]) -> tuple[torch.Tensor, list[KVCache]]:
    """(logits_V of the last prompt position, its KV caches) of one prompt, by the model's own
    forward and KV cache (for `SlotCache.load`)."""
    device = model.wte.weight.device
    caches = model.new_caches(1, len(ids))
    out = model(torch.tensor([ids], device=device), caches=caches, last_only=True)
    return out.logits[0, -1], caches


@torch.no_grad()
def decode_step(model: GPT, cache: SlotCache, tokens_B: torch.Tensor) -> torch.Tensor:
    """logits_BV of the next token of rows 0 .. B-1, each fed its token at its own position
    (cache.lengths); the rows' caches grow by one. What `GPT.forward` computes for a row with
    its KVCache, up to float rounding."""
    B = tokens_B.size(0)
    pos_B = cache.lengths[:B]
    S = int(pos_B.max()) + 1
    keys_S = torch.arange(S, device=pos_B.device)
    visible_BS = keys_S[None] <= pos_B[:, None]  # each row's own keys
    if model.cfg.document_mask:  # and only those of its current document (`document_starts`)
        start_B = torch.where(tokens_B == DOCUMENT_START_ID, pos_B, cache.doc_start[:B])
        cache.doc_start[:B] = start_B
        visible_BS &= keys_S[None] >= start_B[:, None]
    mask_B11S = visible_BS[:, None, None, :]
    x = model.wte(tokens_B[:, None])  # (B, 1, C)
    if model.wpe is not None:
        x = x + model.wpe(pos_B)[:, None]
    for i, block in enumerate(model.blocks):
        x = x + block.attn.step_rows(block.ln1(x), cache.k[i], cache.v[i], pos_B, mask_B11S)
        y, _ = block.ffn(block.ln2(x))
        x = x + y
    cache.lengths[:B] += 1
    # _logits: the model's head and its optional soft cap, the one place they are defined
    return model._logits(model.ln_f(x))[:, 0]

