"""`GPT2LMHeadModel`'s config and weights from an slms model with learned positions and
LayerNorm (the seed's family).

GPT-2's Conv1D holds its weight as (in, out), nn.Linear's transposed; its c_attn is q, k, v
side by side, as slms's qkv. Every GPT-2 linear layer has a bias: a missing one is zeros. Its
MLP activation is ACT2FN's name: "gelu" is the exact (erf) GELU of slms, not "gelu_new".
"""

from __future__ import annotations

import math
from typing import Any

import torch

from slms.model import GPT

ACTIVATION = {"relu": "relu", "gelu": "gelu", "relu2": "relu2"}


def config(gpt: GPT) -> dict[str, Any]:
    """GPT2Config's fields for `gpt`; its dropouts are slms's (the same three places)."""
    cfg = gpt.cfg
    return {
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.mlp_ratio * cfg.n_embd,
        "activation_function": ACTIVATION[cfg.activation], "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "tie_word_embeddings": cfg.tie_weights,
    }


def _linear(layer: torch.nn.Linear, scale_first: float = 1.0, parts: int = 1
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Conv1D weight (in, out), bias) of `layer`, the first of its `parts` output blocks
    scaled by `scale_first` (attn_scale n_embd folded into q)."""
    w, b = layer.weight, layer.bias
    if b is None:
        b = w.new_zeros(w.size(0))
    if scale_first != 1.0:
        n = w.size(0) // parts
        w = torch.cat([w[:n] * scale_first, w[n:]])
        b = torch.cat([b[:n] * scale_first, b[n:]])
    return w.t().contiguous(), b


def state_dict(gpt: GPT) -> dict[str, torch.Tensor]:
    """`gpt`'s weights under GPT2LMHeadModel's module names (lm_head only when untied)."""
    cfg = gpt.cfg
    fold = math.sqrt(cfg.head_dim / cfg.n_embd) if cfg.attn_scale == "n_embd" else 1.0
    sd: dict[str, torch.Tensor] = {"transformer.wte.weight": gpt.wte.weight,
                                   "transformer.wpe.weight": gpt.wpe.weight,
                                   "transformer.ln_f.weight": gpt.ln_f.weight,
                                   "transformer.ln_f.bias": gpt.ln_f.bias}
    if not cfg.tie_weights:
        sd["lm_head.weight"] = gpt.lm_head.weight
    for i, block in enumerate(gpt.blocks):
        p = f"transformer.h.{i}."
        layers = {"attn.c_attn": _linear(block.attn.qkv, fold, parts=3),
                  "attn.c_proj": _linear(block.attn.proj),
                  "mlp.c_fc": _linear(block.ffn.fc), "mlp.c_proj": _linear(block.ffn.proj)}
        for name, (w, b) in layers.items():
            sd[f"{p}{name}.weight"], sd[f"{p}{name}.bias"] = w, b
        for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
            norm = getattr(block, ours)
            sd[f"{p}{theirs}.weight"], sd[f"{p}{theirs}.bias"] = norm.weight, norm.bias
    return {k: v.detach().clone() for k, v in sd.items()}
