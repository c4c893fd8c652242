"""The optimizer (AdamW, or Muon on hidden matrices with AdamW on the rest), weight decay on
matmul and embedding weights only, and learning-rate schedules from the true step count."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from slms.config import TrainConfig
from slms.model.attention import CausalSelfAttention
from slms.model.gpt import MLP, Block
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


def fused_blocks(model: nn.Module) -> dict[int, tuple[int, int]]:
    """ids of the fused matrices, each with its (dim, n): n equal blocks along dim, each a
    matrix of its own. The attention's qkv weight is Q, K and V stacked along its rows (3, -2);
    SwiGLU's first weight is gate and up side by side, along the rows of an MLP's fc (2, -2)
    and along the columns of the experts' w1 (2, -1)."""
    blocks = {}
    for m in model.modules():
        if isinstance(m, CausalSelfAttention):
            blocks[id(m.qkv.weight)] = (-2, 3)
        elif isinstance(m, MLP) and m.activation == "swiglu":
            blocks[id(m.fc.weight)] = (-2, 2)
        elif isinstance(m, Experts) and m.activation == "swiglu":
            blocks[id(m.w1_EDH)] = (-1, 2)
    return blocks


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device
                    ) -> torch.optim.Optimizer:
    """AdamW, or with train.optimizer=muon `Muon` (Muon on `muon_parameters`, AdamW on the
    rest; with train.muon_split each of the `fused_blocks` orthogonalised per block); weight
    decay on `decayed_parameters` only."""
    decay_ids = decayed_parameters(model)
    muon_ids = muon_parameters(model) if cfg.optimizer == "muon" else set()
    splits = fused_blocks(model) if cfg.muon_split else {}
    groups: dict[tuple[bool, bool, tuple[int, int] | None], list[torch.Tensor]] = {}
    for p in model.parameters():  # parameters() yields a tied weight once
        if p.requires_grad:
            muon = id(p) in muon_ids
            key = (muon, id(p) in decay_ids, splits.get(id(p)) if muon else None)
            groups.setdefault(key, []).append(p)
    param_groups = [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0,
                     **({"muon": True, "lr": cfg.muon_lr or cfg.lr, "split": split}
                        if muon else {})}
                    for (muon, decay, split), ps in sorted(groups.items(), key=_group_order)]
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "muon":
        return Muon(param_groups, lr=cfg.lr, betas=betas, momentum=cfg.muon_momentum)
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=betas, **extra)


def _group_order(item: tuple) -> tuple:
    """Muon groups first, decayed first, unsplit first: a stable order for the state dict."""
    muon, decay, split = item[0]
    return (not muon, not decay, split is not None, split or ())


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based) of cfg.max_steps."""
    return Schedule(cfg)(step)


class Schedule:
    """The learning-rate multiplier by optimizer step (0-based): `constant` (linear warm-up),
    `cosine` (linear warm-up over train.warmup_steps, then cosine to min_lr_ratio at the last
    step) or `onecycle` (torch's OneCycleLR defaults, the seed's: 30% cosine warm-up from
    lr/25, then cosine annealing to lr/(25 * 1e4)).

    The decay runs on a progress p in [0, 1] that `refit` can stretch or shrink to a new total
    (the time budget's refits, a resumed run given another train.max_steps): from the refit
    step s_f on, p(s) = p_f + (1 - p_f) (s - s_f) / (T_new - s_f), so the learning rate is
    continuous at every refit. The knots (step, progress, total) are the whole state: a
    LambdaLR saves a callable object's attributes, so a checkpoint keeps them.
    """

    def __init__(self, cfg: TrainConfig):
        self.kind = cfg.schedule
        self.warmup = cfg.warmup_steps if cfg.schedule != "onecycle" else 0
        self.min_lr_ratio = cfg.min_lr_ratio
        total = cfg.max_steps
        # onecycle's warm-up ends at step int(0.3 T) - 1 of the last step T - 1, as torch's
        self.up = max(1, int(0.3 * total) - 1) / max(1, total - 1)
        self.knots: list[tuple[int, float, int]] = [(0, 0.0, total)]

    @property
    def total(self) -> int:
        return self.knots[-1][2]

    def progress(self, step: int) -> float:
        """Where `step` is in the decay: 0 before it starts, 1 at the last step."""
        s_k, p_k, total = next(k for k in reversed(self.knots) if k[0] <= step)
        begin = max(s_k, self.warmup)
        if step < begin:
            return p_k
        end = total - 1 if self.kind == "onecycle" else total
        return min(1.0, p_k + (1 - p_k) * (step - begin) / max(1, end - begin))

    def refit(self, step: int, total: int) -> None:
        """From `step` on, the remaining progress spreads over the steps up to `total`."""
        if total != self.total:
            self.knots = [k for k in self.knots if k[0] < step]
            self.knots.append((step, self.progress(step) if self.knots else 0.0, total))

    def __call__(self, step: int) -> float:
        if self.kind == "onecycle":
            p, up = self.progress(step), self.up
            if p <= up:
                return _cos(1 / 25, 1.0, p / up)
            return _cos(1.0, 1 / 25 / 1e4, (p - up) / (1 - up))
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        return _cos(1.0, self.min_lr_ratio, self.progress(step))


def _cos(start: float, end: float, t: float) -> float:
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule from step 0; or, continuing another run at train.init_step, its schedule
    (planned over train.init_total steps) refitted there to train.max_steps, at that step."""
    if not cfg.init_step:
        return torch.optim.lr_scheduler.LambdaLR(opt, Schedule(cfg))
    schedule = Schedule(dataclasses.replace(cfg, max_steps=cfg.init_total or cfg.max_steps))
    schedule.refit(cfg.init_step, cfg.max_steps)
    for group in opt.param_groups:
        group.setdefault("initial_lr", group["lr"])
    # last_epoch = the step before: the constructor's first step lands on init_step
    return torch.optim.lr_scheduler.LambdaLR(opt, schedule, last_epoch=cfg.init_step - 1)


def schedule_of(sched: torch.optim.lr_scheduler.LambdaLR) -> Schedule:
    """The `Schedule` of a `build_scheduler` scheduler. Refitting it at the next step to run
    (sched.last_epoch) leaves that step's factor, and so the optimizer's lr, exactly as it is."""
    return sched.lr_lambdas[0]
