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


class KVCache:
    """Preallocated keys and values for one layer, sized to the request (B, nh, max_len, hs)."""

    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        self.k = torch.zeros(batch, n_head, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.pos = 0  # number of positions filled
        # document_mask models: (B,) first position of each row's current document, kept by
        # GPT.forward in the first layer's cache (None: every row's starts at 0)
        self.doc_start: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.size(2)
        if self.pos + t > self.k.size(2):
            raise ValueError(f"KV cache holds {self.k.size(2)} positions; "
                             f"{self.pos + t} requested")
        self.k[:, :, self.pos:self.pos + t] = k
        self.v[:, :, self.pos:self.pos + t] = v
        self.pos += t
        return self.k[:, :, :self.pos], self.v[:, :, :self.pos]


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
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.dropout = cfg.dropout
        # The seed scales scores by n_embd^-0.5; kept expressible so imported models compute
        # what they computed before.
        width = cfg.head_dim if cfg.attn_scale == "head_dim" else cfg.n_embd
        self.scale = 1.0 / math.sqrt(width)

    def forward(self, x_BTC: torch.Tensor, cache: KVCache | None = None,
                mask_B1TS: torch.Tensor | None = None) -> torch.Tensor:
        """mask_B1TS (bool, (B, 1, T, S) or broadcastable, True = may attend): which of the S
        cached + new keys each new token sees, causality included; None: causal."""
        B, T, C = x_BTC.shape
        start = cache.pos if cache is not None else 0
        q, k, v = self._qkv(x_BTC, torch.arange(start, start + T, device=x_BTC.device))
        if cache is not None:
            k, v = cache.append(k, v)  # (B, nh, S, hs); cached keys are already rotated
        if mask_B1TS is None and start > 0:
            mask_B1TS = causal_mask(T, k.size(2), x_BTC.device)
        is_causal = mask_B1TS is None and start == 0
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask_B1TS, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0, scale=self.scale)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))

    def step_rows(self, x_B1C: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  pos_B: torch.Tensor, mask_B11S: torch.Tensor) -> torch.Tensor:
        """`forward` for one new token per row at its own position pos_B (rows that started
        at different times, as a server decodes them; no autograd): its key and value are
        written into row b of k_cache / v_cache (rows, nh, max_len, hs) at pos_B[b], and its
        query attends over the S = mask_B11S.size(-1) first keys of its row where the mask
        allows."""
        B, _, C = x_B1C.shape
        q, k, v = self._qkv(x_B1C, pos_B[:, None, None])  # positions (B, nh, T = 1)
        rows = torch.arange(B, device=pos_B.device)
        k_cache[rows, :, pos_B] = k[:, :, 0]
        v_cache[rows, :, pos_B] = v[:, :, 0]
        S = mask_B11S.size(-1)
        y = F.scaled_dot_product_attention(q, k_cache[:B, :, :S], v_cache[:B, :, :S],
                                           attn_mask=mask_B11S, scale=self.scale)
        return self.proj(y.transpose(1, 2).reshape(B, 1, C))

    def _qkv(self, x_BTC: torch.Tensor, pos: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (B, nh, T, hs) of x, with QK-norm, then rotary positions `pos` (broadcast
        to (B, nh, T)), each where configured."""
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
