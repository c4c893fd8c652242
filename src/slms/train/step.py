"""One optimizer step: gradient accumulation, autocast, loss scaling, clipping, and the
non-finite guard (a NaN/inf loss or gradient norm skips the update and leaves the weights as
they were)."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from slms.checkpoint import unwrap
from slms.config import RunConfig
from slms.constants import IGNORE_INDEX
from slms.data.loader import PackedData
from slms.train import distributed
from slms.train.distributed import Dist


@dataclass
class Env:
    """Where and how the computation runs."""

    device: torch.device
    autocast: AbstractContextManager
    scaler: torch.amp.GradScaler | None
    dist: Dist


@dataclass
class StepResult:
    loss: float  # LM loss, mean over the global batch
    aux: float  # MoE router losses (weighted)
    grad_norm: float  # before clipping
    skipped: bool  # non-finite: the optimizer step was not taken
    tokens: int  # real (scored) target tokens in the global batch: pads excluded


def micro_index(d: Dist, grad_accum: int, micro: int) -> int:
    """Global micro-batch index: rank r takes r*grad_accum .. (r+1)*grad_accum-1. The global
    batch of a step is thus the same on 1 process x 2 accumulation steps as on 2 processes."""
    return d.rank * grad_accum + micro


def train_step(model: nn.Module, opt: torch.optim.Optimizer, sched, data: PackedData,
               cfg: RunConfig, step: int, env: Env) -> StepResult:
    """One optimizer step over grad_accum micro-batches on each rank."""
    tc = cfg.train
    model.train()
    lm_total = torch.zeros((), device=env.device)
    aux_total = torch.zeros((), device=env.device)
    batches = []
    for micro in range(tc.grad_accum):
        index = micro_index(env.dist, tc.grad_accum, micro)
        x, y = data.train_batch(tc.batch_size, cfg.model.block_size, tc.seed, step, micro=index,
                                micro_per_step=tc.grad_accum * env.dist.world)
        # Packed data has no pads; the padded layout's pad targets are IGNORE_INDEX.
        real = (y != IGNORE_INDEX) if data.padded else None
        batches.append((x, y, real, y.numel() if real is None else int(real.sum())))
    local = sum(n for *_, n in batches)
    # The step's LM loss is the mean over every real target of the global batch, however the
    # pads fall between micro-batches and ranks: micro-batch i's mean is weighted by its share
    # n_i / total (times world: DDP and FSDP average gradients over ranks). Packed micro-batches
    # are all full, so the weights are 1/grad_accum and no count needs exchanging.
    total = env.dist.sum([float(local)], env.device)[0] if data.padded else local * env.dist.world
    for micro, (x, y, real, n) in enumerate(batches):
        x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
        if real is not None:
            real = real.to(env.device, non_blocking=True)
        with distributed.grad_sync(model, sync=micro == tc.grad_accum - 1):
            with env.autocast:
                # padded rows: the pads (no target) skip the MoE experts and router losses
                out = model(x, y, real_BT=real)
                # a micro-batch of pads only has no LM loss (its mean would be 0/0); zero times
                # the logits keeps every parameter in the graph, as DDP needs (multiplied before
                # the sum: an fp16 sum can overflow, and inf * 0 is NaN)
                lm_loss = (out.loss * (n * env.dist.world / total) if n
                           else (out.logits * 0).sum())
                loss = lm_loss + out.aux_loss / tc.grad_accum
            (env.scaler.scale(loss) if env.scaler else loss).backward()
        lm_total += lm_loss.detach()
        aux_total += out.aux_loss.detach() / tc.grad_accum
    lm, aux = env.dist.mean([float(lm_total), float(aux_total)], env.device)
    if env.scaler:
        env.scaler.unscale_(opt)
    clip = tc.grad_clip if tc.grad_clip > 0 else float("inf")
    grad_norm = float(distributed.full_norm(
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
    # With fp16 loss scaling an inf gradient norm is routine (the scaler skips and lowers its
    # scale); a non-finite loss is not.
    bad = not math.isfinite(lm) or (env.scaler is None and not math.isfinite(grad_norm))
    if env.scaler:
        env.scaler.step(opt)  # skips by itself when a gradient is inf/NaN
        env.scaler.update()
    elif not bad:
        opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    for moe in unwrap(model).moe_layers():
        if bad and hasattr(moe.router, "load_E"):
            moe.router.load_E.zero_()  # no bias update from a diverged step
        else:
            moe.router.update_bias()
    return StepResult(lm, aux, grad_norm, bad, round(total))
