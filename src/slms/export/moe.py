"""The mixture-of-experts classes' config and weights from an slms MoE model with rotary
positions, RMSNorm, SwiGLU and no biases: `MixtralForCausalLM` (every layer MoE),
`Qwen3MoeForCausalLM` (per-head QK-norm; dense layers between MoE ones) and
`Ernie4_5_MoeForCausalLM` (the bias router; dense layers between MoE ones).

Attention, norms and dense layers are the Llama family's (`slms.export.llama`). The routers
agree: slms takes the softmax over the top-k logits, these classes the top-k of the softmax
renormalised, the same numbers; Ernie chooses by softmax + e_score_correction_bias, as slms's
bias router does with expert_bias. transformers 5 stacks the experts as slms does:
gate_up_proj (E, 2H, D) is w1_EDH transposed (the gate half first), down_proj (E, D, H) is
w2_EHD transposed. Ernie's RoPE rotates the interleaved pairs (x_2i, x_2i+1), so its q and k
rows are slms's reordered within each head (row 2i from i, row 2i + 1 from i + hs/2).
"""

from __future__ import annotations

from typing import Any

import torch

from slms.export import llama
from slms.export.arches import Arch
from slms.model import GPT
from slms.model.activations import ffn_hidden

ERNIE = "ernie4_5_moe"


def expert_hidden(gpt: GPT) -> int:
    """Each expert's SwiGLU hidden width (as slms.model.gpt.Block sizes it)."""
    cfg = gpt.cfg
    assert cfg.moe is not None
    return ffn_hidden(cfg.activation, cfg.moe.expert_hidden or cfg.mlp_ratio * cfg.n_embd)


def grouped_mm_aligned(gpt: GPT) -> bool:
    """Whether transformers' default way to run the experts, torch's grouped_mm, takes these
    shapes: it needs rows of a multiple of 16 bytes (8 values in bf16). Elsewhere the export
    asks for its "eager" loop, or the model would not run."""
    return expert_hidden(gpt) % 8 == 0 and gpt.cfg.n_embd % 8 == 0


def config(gpt: GPT, arch: Arch) -> dict[str, Any]:
    """The class's config fields for `gpt` (ids, dtype and architectures come from the caller)."""
    moe = gpt.cfg.moe
    assert moe is not None
    d = llama.config(gpt, arch)  # intermediate_size: the dense layers' width
    E, K, H = moe.n_experts, moe.top_k, expert_hidden(gpt)
    if arch.name == "mixtral":
        return d | {"intermediate_size": H, "num_local_experts": E, "num_experts_per_tok": K,
                    "router_jitter_noise": 0.0, "sliding_window": None}
    if arch.name == "qwen3_moe":
        return d | {"moe_intermediate_size": H, "num_experts": E, "num_experts_per_tok": K,
                    "norm_topk_prob": moe.renormalize, "decoder_sparse_step": moe.every,
                    "mlp_only_layers": [], "use_sliding_window": False}
    assert arch.name == ERNIE
    d.pop("attention_bias")
    return d | {"use_bias": False, "moe_intermediate_size": H, "moe_num_experts": E,
                "moe_k": K, "moe_num_shared_experts": 0, "moe_layer_start_index": 0,
                "moe_layer_end_index": gpt.cfg.n_layer - 1, "moe_layer_interval": moe.every}


def state_dict(gpt: GPT, arch: Arch) -> dict[str, torch.Tensor]:
    """`gpt`'s weights under the class's module names (lm_head only when untied)."""
    cfg = gpt.cfg
    sd = llama.outer_weights(gpt)
    for i, block in enumerate(gpt.blocks):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = block.ln1.weight
        sd[p + "post_attention_layernorm.weight"] = block.ln2.weight
        attn = llama._attention(block.attn, cfg)
        if arch.name == ERNIE:
            for key in ("q_proj.weight", "k_proj.weight"):
                attn[key] = interleave_heads(attn[key], cfg.head_dim)
        sd |= {p + "self_attn." + k: v for k, v in attn.items()}
        mlp = (_experts(block.ffn, arch) if cfg.is_moe_layer(i)
               else llama._mlp(block.ffn, cfg.activation))
        sd |= {p + "mlp." + k: v for k, v in mlp.items()}
    return {k: v.detach().clone() for k, v in sd.items()}


def interleave_heads(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The rows of each head of w (n_head * head_dim, C) reordered from the rotate-half
    layout (pairs i, i + hs/2) to the interleaved one (pairs 2i, 2i + 1)."""
    half = head_dim // 2
    order = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()
    return w.view(-1, head_dim, w.size(-1))[:, order].reshape(w.shape)


def _experts(moe: torch.nn.Module, arch: Arch) -> dict[str, torch.Tensor]:
    """The router's weight (and Ernie's selection bias) and the stacked experts."""
    out = {"gate.weight": moe.router.gate.weight,
           "experts.gate_up_proj": moe.experts.w1_EDH.transpose(1, 2),
           "experts.down_proj": moe.experts.w2_EHD.transpose(1, 2)}
    if arch.name == ERNIE:
        E = moe.cfg.n_experts
        bias = (moe.router.expert_bias if moe.cfg.router == "bias"
                else moe.router.gate.weight.new_zeros(E))
        out["gate.moe_statics.e_score_correction_bias"] = bias.float().view(1, E)
    return out
