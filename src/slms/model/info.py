"""Computed model figures: parameters (total and active per token), FLOPs per token, memory.

Counted from the built module, never typed in.
"""

from __future__ import annotations

from typing import Any

from slms.config import ModelConfig
from slms.model.activations import ffn_hidden
from slms.model.gpt import GPT


def count_params(model: GPT) -> dict[str, int]:
    """Total parameters (tied weights once) and parameters active for one token.

    A token passes through top_k of each MoE layer's n_experts experts, so the other experts'
    weights are inactive for it; everything else (embeddings included) is active.
    """
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for moe in model.moe_layers():
        per_expert = sum(p[0].numel() for p in moe.experts.parameters())
        inactive += (moe.cfg.n_experts - moe.cfg.top_k) * per_expert
    return {"params_total": total, "params_active": total - inactive}


def matmul_params_per_token(cfg: ModelConfig) -> int:
    """Weights in the matrix multiplies one token goes through (biases, norms and the
    embedding lookups excluded; the lm_head included)."""
    C = cfg.n_embd
    n = cfg.vocab_size * C  # lm_head
    for i in range(cfg.n_layer):
        n += 4 * C * C  # qkv + proj
        if cfg.is_moe_layer(i):
            assert cfg.moe is not None
            H = cfg.moe.expert_hidden or cfg.mlp_ratio * C
            routers = 2 if cfg.moe.router == "noisy_topk" else 1
            n += cfg.moe.top_k * ffn_matmul_params(cfg.activation, C, H)
            n += routers * C * cfg.moe.n_experts
        else:
            n += ffn_matmul_params(cfg.activation, C, cfg.mlp_ratio * C)
    return n


def ffn_matmul_params(activation: str, C: int, H: int) -> int:
    """Weights of one feed-forward network of width H (SwiGLU: three matrices of 2H/3)."""
    h = ffn_hidden(activation, H)
    return (3 if activation == "swiglu" else 2) * C * h


def flops_per_token(cfg: ModelConfig, context: int | None = None) -> int:
    """Training FLOPs (forward + backward) per token: 6 * matmul weights + 12 * L * C * T
    for attention scores and values at context T (T defaults to block_size).

    Attention is counted in full, non-causal: every token against all T positions, as PaLM
    (appendix B) and nanoGPT's MFU count it, so MFUs compare with theirs. A causal kernel that
    skips the masked half does about half of the attention term. A MoE token counts its top_k
    experts (dropless routing) and the router's matmuls (two for noisy_topk: gate and noise).
    """
    T = context or cfg.block_size
    return 6 * matmul_params_per_token(cfg) + 12 * cfg.n_layer * cfg.n_embd * T


def model_info(model: GPT) -> dict[str, Any]:
    cfg = model.cfg
    counts = count_params(model)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return {
        **counts,
        "flops_per_token": flops_per_token(cfg),
        "forward_flops_per_token": flops_per_token(cfg) // 3,
        "weights_bytes_fp32": counts["params_total"] * 4,
        "weights_bytes_bf16": counts["params_total"] * 2,
        "buffers_bytes": buffers,
        "n_layer": cfg.n_layer,
        "n_embd": cfg.n_embd,
        "block_size": cfg.block_size,
        "vocab_size": cfg.vocab_size,
        "moe_layers": sum(1 for _ in model.moe_layers()),
        "n_experts": cfg.moe.n_experts if cfg.moe else 0,
        "top_k": cfg.moe.top_k if cfg.moe else 0,
    }
