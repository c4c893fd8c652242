"""The optimizer (AdamW, or Muon on hidden matrices with AdamW on the rest), weight decay on
matmul and embedding weights only, and learning-rate schedules from the true step count."""

from __future__ import annotations

import math

import torch
from torch import nn

from slms.config import TrainConfig
from slms.model.gpt import Block
from slms.model.moe import Experts, Router
from slms.train.muon import Muon


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


def muon_parameters(model: nn.Module) -> set[int]:
    """ids of the hidden matrices Muon trains: the blocks' linear weights (attention, MLP) and
    stacked expert weights; not the routers, embeddings or head (AdamW trains those)."""
    routers = {id(p) for m in model.modules() if isinstance(m, Router) for p in m.parameters()}
    ids = set()
    for block in (m for m in model.modules() if isinstance(m, Block)):
        for m in block.modules():
            if isinstance(m, nn.Linear) and id(m.weight) not in routers:
                ids.add(id(m.weight))
            elif isinstance(m, Experts):
                ids.update((id(m.w1_EDH), id(m.w2_EHD)))
    return ids


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device
                    ) -> torch.optim.Optimizer:
    """AdamW, or with train.optimizer=muon `Muon` (Muon on `muon_parameters`, AdamW on the
    rest); weight decay on `decayed_parameters` only."""
    decay_ids = decayed_parameters(model)
    muon_ids = muon_parameters(model) if cfg.optimizer == "muon" else set()
    groups: dict[tuple[bool, bool], list[torch.Tensor]] = {}
    for p in model.parameters():  # parameters() yields a tied weight once
        if p.requires_grad:
            groups.setdefault((id(p) in muon_ids, id(p) in decay_ids), []).append(p)
    param_groups = [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0,
                     **({"muon": True, "lr": cfg.muon_lr or cfg.lr} if muon else {})}
                    for (muon, decay), ps in sorted(groups.items(), reverse=True)]
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "muon":
        return Muon(param_groups, lr=cfg.lr, betas=betas, momentum=cfg.muon_momentum)
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=betas, **extra)


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
