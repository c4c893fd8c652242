"""`slms info`: computed parameter counts, FLOPs per token and weight memory of a model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from slms.config import ModelConfig, load_config, model_config_from_dict
from slms.model import GPT, model_info


def model_config_of(target: str, overrides: list[str], resolve: Callable[[str], Path]
                    ) -> tuple[str, ModelConfig]:
    """(name, model config) of a TOML config / preset name or a run / checkpoint directory."""
    path = Path(target)
    if path.is_dir():
        from slms.checkpoint import read_config
        from slms.rundir import resolve as resolve_ckpt

        return str(path), model_config_from_dict(read_config(resolve_ckpt(path))["model"])
    cfg = load_config(resolve(target), overrides)
    return cfg.name, cfg.model


def info_for(target: str, overrides: list[str], resolve: Callable[[str], Path]
             ) -> dict[str, Any]:
    name, mcfg = model_config_of(target, overrides, resolve)
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = GPT(mcfg)
    return {"name": name, **model_info(model)}


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def describe(info: dict[str, Any]) -> str:
    """The text of `slms info`. FLOPs follow `flops_per_token`'s convention (full, non-causal
    attention), which the text states: readers compare them with other papers' counts."""
    kind = f"dense, {info['n_layer']} layers"
    if info["moe_layers"]:
        kind = (f"MoE, {info['n_experts']} experts top-{info['top_k']} in {info['moe_layers']} "
                f"of {info['n_layer']} layers")
    lines = [
        f"{info['name']}: {kind}, n_embd {info['n_embd']}, block {info['block_size']}, "
        f"vocab {info['vocab_size']}",
        f"parameters         {info['params_total']:>14,}",
        f"active per token   {info['params_active']:>14,}",
        f"FLOPs per token    {info['flops_per_token']:>14,}  (forward + backward: 6 x active "
        "matmul weights",
        f"{'':35}+ non-causal attention at context {info['block_size']}, PaLM's convention)",
        f"weights            {_mib(info['weights_bytes_fp32']):>14}  fp32  "
        f"({_mib(info['weights_bytes_bf16'])} bf16)",
    ]
    return "\n".join(lines)
