"""The Llama family's config and weights from an slms model with rotary positions and RMSNorm:
`LlamaForCausalLM` (SwiGLU), `ArceeForCausalLM` (up/down MLP), `Qwen3ForCausalLM` (SwiGLU +
per-head QK-norm) and `ApertusForCausalLM` (up/down MLP + per-head QK-norm).

The layouts agree: q, k, v are the three row blocks of slms's fused qkv; RoPE rotates the
pairs (x_i, x_{i + hs/2}) (rotate_half, slms's GPT-NeoX layout) with inv_freq = base^(-2i/hs);
QK-norm is per head, before RoPE; SwiGLU's first half is the gate. slms's RMSNorm(eps=None)
uses float32's eps, written as rms_norm_eps.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from slms.export.arches import Arch
from slms.model import GPT
from slms.model.activations import ffn_hidden
from slms.model.attention import FP32_EPS

HIDDEN_ACT = {"swiglu": "silu", "relu": "relu", "gelu": "gelu", "relu2": "relu2"}


def config(gpt: GPT, arch: Arch) -> dict[str, Any]:
    """The class's config fields for `gpt` (ids, dtype and architectures come from the caller)."""
    cfg = gpt.cfg
    theta = float(cfg.rope_base)
    d: dict[str, Any] = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd,
        "intermediate_size": ffn_hidden(cfg.activation, cfg.mlp_ratio * cfg.n_embd),
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_head, "head_dim": cfg.head_dim,
        "hidden_act": HIDDEN_ACT[cfg.activation], "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": FP32_EPS, "tie_word_embeddings": cfg.tie_weights,
        # 5.x reads rope_parameters, 4.x rope_theta (`native.build` sets it after the config
        # is made: 5.x configs drop it as an argument)
        "rope_parameters": {"rope_type": "default", "rope_theta": theta}, "rope_theta": theta,
        "attention_bias": cfg.bias, "attention_dropout": 0.0,
    }
    if arch.mlp_bias:
        d["mlp_bias"] = cfg.bias
    if arch.name == "qwen3":
        d["use_sliding_window"] = False
    return d


def state_dict(gpt: GPT, arch: Arch) -> dict[str, torch.Tensor]:
    """`gpt`'s weights under the class's module names (lm_head only when untied)."""
    cfg = gpt.cfg
    sd = outer_weights(gpt)
    ln1, ln2 = (("attention_layernorm", "feedforward_layernorm") if arch.name == "apertus"
                else ("input_layernorm", "post_attention_layernorm"))
    for i, block in enumerate(gpt.blocks):
        p = f"model.layers.{i}."
        sd[p + ln1 + ".weight"] = block.ln1.weight
        sd[p + ln2 + ".weight"] = block.ln2.weight
        sd |= {p + "self_attn." + k: v for k, v in _attention(block.attn, cfg).items()}
        sd |= {p + "mlp." + k: v for k, v in _mlp(block.ffn, cfg.activation).items()}
    return {k: v.detach().clone() for k, v in sd.items()}


def outer_weights(gpt: GPT) -> dict[str, torch.Tensor]:
    """The embedding, the final norm and (when untied) the head, under the Llama family's
    names (the MoE classes share them)."""
    sd = {"model.embed_tokens.weight": gpt.wte.weight, "model.norm.weight": gpt.ln_f.weight}
    if not gpt.cfg.tie_weights:
        sd["lm_head.weight"] = gpt.lm_head.weight
    return sd


def _attention(attn: torch.nn.Module, cfg: Any) -> dict[str, torch.Tensor]:
    """q/k/v/o projections (and q_norm/k_norm); attn_scale n_embd is folded into q: after
    QK-norm into q_norm's weight (the norm would undo it in q_proj), else into q_proj."""
    C = cfg.n_embd
    fold = math.sqrt(cfg.head_dim / C) if cfg.attn_scale == "n_embd" else 1.0
    w_q, w_k, w_v = attn.qkv.weight.split(C, dim=0)
    b = attn.qkv.bias if attn.qkv.bias is not None else attn.qkv.weight.new_zeros(3 * C)
    b_q, b_k, b_v = b.split(C)
    q_fold = 1.0 if cfg.qk_norm else fold
    out = {"q_proj.weight": w_q * q_fold, "k_proj.weight": w_k, "v_proj.weight": w_v,
           "o_proj.weight": attn.proj.weight}
    if cfg.bias:  # attention_bias covers q, k, v and o: a missing qkv bias is zeros
        out |= {"q_proj.bias": b_q * q_fold, "k_proj.bias": b_k, "v_proj.bias": b_v,
                "o_proj.bias": attn.proj.bias}
    if cfg.qk_norm:
        out |= {"q_norm.weight": attn.q_norm.weight * fold, "k_norm.weight": attn.k_norm.weight}
    return out


def _mlp(mlp: torch.nn.Module, activation: str) -> dict[str, torch.Tensor]:
    """gate/up/down (SwiGLU: fc's first half is the gate) or up/down."""
    out: dict[str, torch.Tensor] = {"down_proj.weight": mlp.proj.weight}
    if activation == "swiglu":
        gate, up = mlp.fc.weight.chunk(2, dim=0)
        out |= {"gate_proj.weight": gate, "up_proj.weight": up}
    else:
        out["up_proj.weight"] = mlp.fc.weight
    if mlp.fc.bias is not None:
        if activation == "swiglu":
            g, u = mlp.fc.bias.chunk(2)
            out |= {"gate_proj.bias": g, "up_proj.bias": u}
        else:
            out["up_proj.bias"] = mlp.fc.bias
        out["down_proj.bias"] = mlp.proj.bias
    return out
