"""AdamW with weight decay on matmul and embedding weights only; learning-rate schedules from
the true step count."""

from __future__ import annotations

import math

import torch
from torch import nn

from slms.config import TrainConfig
from slms.model.moe import Experts


def decayed_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters weight decay applies to, chosen by role: the weights of matmuls
    (linear layers, the experts' stacked w1/w2) and embeddings. Biases (the experts' stacked
    2-D ones too, so that MoE and dense models decay alike) and norms are not decayed."""
    ids = set()
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            ids.add(id(m.weight))
        elif isinstance(m, Experts):
            ids.update((id(m.w1_EDH), id(m.w2_EHD)))
    return ids


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device
                    ) -> torch.optim.AdamW:
    """AdamW; weight decay on `decayed_parameters` only."""
    decay_ids = decayed_parameters(model)
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied weight once
        if p.requires_grad:
            (decay if id(p) in decay_ids else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **extra)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based) of cfg.max_steps."""
    total = cfg.max_steps
    if cfg.schedule == "constant":
        return min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.schedule == "onecycle":
        # torch's OneCycleLR defaults (the seed's): 30% cosine warm-up from lr/25, then cosine
        # annealing to lr/(25 * 1e4).
        up = max(1, int(0.3 * total) - 1)
        start, end = 1 / 25, 1 / 25 / 1e4
        if step <= up:
            return _cos(start, 1.0, step / up)
        return _cos(1.0, end, min(1.0, (step - up) / max(1, total - 1 - up)))
    # cosine with linear warm-up, to min_lr_ratio at the last step
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return _cos(1.0, cfg.min_lr_ratio, min(1.0, progress))


def _cos(start: float, end: float, t: float) -> float:
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, cfg))
