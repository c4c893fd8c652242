"""Causal self-attention with fused qkv, `F.scaled_dot_product_attention`, and a KV cache;
optionally rotary positions (RoPE), RMSNorm of q and k (QK-norm), and a given mask (the
document mask, built once per forward by the GPT).

Shapes: B batch, T new tokens, S cached + new tokens, C n_embd, nh heads, hs head size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slms.config import ModelConfig
from slms.model.dropout import Dropout


class KVCache:
    """Preallocated keys and values for one layer, (rows, nh, max_len, hs), with a length per
    row. A forward of B <= rows rows appends to rows 0 .. B-1, each at its own length: one
    slice when they are in step (prefill, `GPT.generate`), else one scatter (a server's rows,
    which started at different times)."""

    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        self.k = torch.zeros(batch, n_head, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.lengths = [0] * batch  # positions filled per row (host ints: reading them is free)
        # document_mask models: where each row's current document began, kept by GPT.forward
        # in the first layer's cache
        self.doc_start = torch.zeros(batch, dtype=torch.long, device=device)

    def starts(self, rows: int) -> list[int]:
        """Where the next tokens of rows 0 .. rows-1 go."""
        return self.lengths[:rows]

    def append(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys and values (B, nh, T, hs) of rows 0 .. B-1 at positions `pos`
        ((T,) shared, or (B, T) per row, as `positions` gives them); returns every row's
        keys and values up to the longest row, (B, nh, S, hs)."""
        B, _, T, _ = k.shape
        lengths = self.lengths[:B]
        end = max(lengths) + T
        if end > self.k.size(2):
            raise ValueError(f"KV cache holds {self.k.size(2)} positions; {end} requested")
        if pos.dim() == 1:
            self.k[:B, :, lengths[0]:end] = k
            self.v[:B, :, lengths[0]:end] = v
        else:
            rows_B1 = torch.arange(B, device=k.device)[:, None]
            self.k[rows_B1, :, pos] = k.transpose(1, 2)  # indexed (B, T, nh, hs)
            self.v[rows_B1, :, pos] = v.transpose(1, 2)
        self.lengths[:B] = [n + T for n in lengths]
        return self.k[:B, :, :end], self.v[:B, :, :end]

    def copy_row(self, row: int, src: KVCache, src_row: int = 0) -> None:
        """Row `row` := row `src_row` of `src` (keys, values, length, document start)."""
        n = src.lengths[src_row]
        self.k[row, :, :n] = src.k[src_row, :, :n]
        self.v[row, :, :n] = src.v[src_row, :, :n]
        self.lengths[row] = n
        self.doc_start[row] = src.doc_start[src_row]


def positions(starts: list[int], T: int, device: torch.device) -> torch.Tensor:
    """The positions of T new tokens after rows that hold `starts` tokens: (T,) when every row
    holds the same number, else (B, T)."""
    first = starts[0]
    if all(n == first for n in starts):
        return torch.arange(first, first + T, device=device)
    return torch.tensor(starts, device=device)[:, None] + torch.arange(T, device=device)


def rope_tables(pos: torch.Tensor, head_dim: int, base: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each pos.shape + (hs / 2,), of the positions `pos` (any shape, fp32)."""
    inv_freq = base ** -(torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32)
                         / head_dim)
    angles = pos.to(torch.float32)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x_BnTh: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_i, x_{i + hs/2}) of every head by its position's angle (GPT-NeoX
    layout), in fp32, returned in x's dtype."""
    x1, x2 = x_BnTh.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x_BnTh.dtype)


FP32_EPS = torch.finfo(torch.float32).eps


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm whose weight takes the input's dtype. Under bf16 autocast q and k arrive in
    bf16 (autocast leaves rms_norm alone), and a float32 weight sends torch to its slower,
    unfused kernel with a warning at every call. eps=None means float32's eps whatever the
    input's dtype, passed explicitly: older torch releases inside our range took the input's
    (2**-7 for bf16 q/k), torch 2.13 takes float32's (checked: equal outputs), so checkpoints
    compute alike on every supported torch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w is not None and w.dtype != x.dtype:
            w = w.to(x.dtype)
        eps = FP32_EPS if self.eps is None else self.eps
        return F.rms_norm(x, self.normalized_shape, w, eps)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.rope_base = cfg.rope_base if cfg.positions == "rope" else None
        self.q_norm = RMSNorm(cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim) if cfg.qk_norm else None
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias and cfg.qkv_bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = Dropout(cfg.dropout)
        self.dropout = cfg.dropout if cfg.attn_dropout is None else cfg.attn_dropout
        # The seed scales scores by n_embd^-0.5; kept expressible so imported models compute
        # what they computed before.
        width = cfg.head_dim if cfg.attn_scale == "head_dim" else cfg.n_embd
        self.scale = 1.0 / math.sqrt(width)

    def forward(self, x_BTC: torch.Tensor, cache: KVCache | None = None,
                mask_B1TS: torch.Tensor | None = None, pos: torch.Tensor | None = None
                ) -> torch.Tensor:
        """pos: the new tokens' positions, (T,) or (B, T) (`positions`; None: 0 .. T-1).
        mask_B1TS (bool, (B, 1, T, S) or broadcastable, True = may attend): which of the S
        cached + new keys each new token sees, causality included; None: causal (rows in
        step)."""
        B, T, C = x_BTC.shape
        if pos is None:
            pos = torch.arange(T, device=x_BTC.device)
        q, k, v = self._qkv(x_BTC, pos if pos.dim() == 1 else pos[:, None])
        if cache is not None:
            k, v = cache.append(k, v, pos)  # (B, nh, S, hs); cached keys are already rotated
        S = k.size(2)
        if mask_B1TS is None and S > T:
            mask_B1TS = causal_mask(T, S, x_BTC.device)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask_B1TS, is_causal=mask_B1TS is None and S == T,
            dropout_p=self.dropout if self.training else 0.0, scale=self.scale)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))

    def _qkv(self, x_BTC: torch.Tensor, pos: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (B, nh, T, hs) of x, with QK-norm, then rotary positions `pos` (broadcast
        to (B, nh, T): (T,) or (B, 1, T)), each where configured."""
        B, T, C = x_BTC.shape
        q, k, v = self.qkv(x_BTC).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_base is not None:
            cos, sin = rope_tables(pos, q.size(-1), self.rope_base)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v


def causal_mask(T: int, S: int, device: torch.device) -> torch.Tensor | None:
    """(T, S) bool: new token i (at position S - T + i) sees every cached position and the
    new tokens <= i; None when T == 1 (it sees everything)."""
    if T == 1:
        return None
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)
