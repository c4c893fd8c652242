"""One optimizer step: gradient accumulation, autocast, loss scaling, clipping, and the
non-finite guard (a NaN/inf loss or gradient norm skips the update and leaves the weights as
they were)."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from slms.config import TrainConfig
from slms.constants import IGNORE_INDEX
from slms.data.loader import PackedData
from slms.train import distributed
from slms.train.distributed import Dist, unwrap


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
    lr: float  # train.lr as scheduled for this step (Muon's groups: muon_lr, same schedule)


def micro_index(d: Dist, grad_accum: int, micro: int) -> int:
    """Global micro-batch index: rank r takes r*grad_accum .. (r+1)*grad_accum-1. The global
    batch of a step is thus the same on 1 process x 2 accumulation steps as on 2 processes."""
    return d.rank * grad_accum + micro


def train_step(model: nn.Module, opt: torch.optim.Optimizer, sched: LRScheduler,
               data: PackedData, tc: TrainConfig, block_size: int, step: int, env: Env
               ) -> StepResult:
    """One optimizer step over tc.grad_accum micro-batches on each rank."""
    model.train()
    batches = micro_batches(data, tc, block_size, step, env.dist)
    total = global_targets(batches, data.padded, env)
    lm_sum, aux_sum = forward_backward(model, batches, total, env)
    lm, aux = env.dist.mean([float(lm_sum), float(aux_sum)], env.device)
    # this step's point of the schedule (optimizer_step moves it on to the next step's)
    lr = tc.lr * sched.get_last_lr()[0] / sched.base_lrs[0]
    grad_norm, skipped = optimizer_step(model, opt, sched, tc.grad_clip, lm, env)
    return StepResult(lm, aux, grad_norm, skipped, round(total), lr)


@dataclass
class MicroBatch:
    x: torch.Tensor  # (B, T) inputs, on the host
    y: torch.Tensor  # (B, T) targets; IGNORE_INDEX at pads
    real: torch.Tensor | None  # (B, T) bool: real inputs, then pads (padded layout only)
    n: int  # scored targets


def micro_batches(data: PackedData, tc: TrainConfig, block_size: int, step: int, d: Dist
                  ) -> list[MicroBatch]:
    """This rank's tc.grad_accum micro-batches of optimizer step `step`, with the number of
    targets each scores."""
    out = []
    for micro in range(tc.grad_accum):
        index = micro_index(d, tc.grad_accum, micro)
        # Packed data has no pads; the padded layout's pad targets are IGNORE_INDEX, and so
        # are a fine-tune's targets outside the assistant's turns (real inputs all the same:
        # they run through the experts).
        if data.padded:
            x, y, real = data.train_rows(tc.batch_size, block_size, tc.seed, step, micro=index,
                                         micro_per_step=tc.grad_accum * d.world)
            n = int((y != IGNORE_INDEX).sum())
        else:
            x, y = data.train_batch(tc.batch_size, block_size, tc.seed, step, micro=index,
                                    micro_per_step=tc.grad_accum * d.world)
            real, n = None, y.numel()
        out.append(MicroBatch(x, y, real, n))
    return out


def global_targets(batches: list[MicroBatch], padded: bool, env: Env) -> float:
    """Scored targets in the global batch (every rank's micro-batches)."""
    local = sum(b.n for b in batches)
    # The step's LM loss is the mean over every real target of the global batch, however the
    # pads fall between micro-batches and ranks: micro-batch i's mean is weighted by its share
    # n_i / total (times world: DDP and FSDP average gradients over ranks). Packed micro-batches
    # are all full, so the weights are 1/grad_accum and no count needs exchanging.
    return env.dist.sum([float(local)], env.device)[0] if padded else local * env.dist.world


def forward_backward(model: nn.Module, batches: list[MicroBatch], total: float, env: Env
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over the micro-batches, gradients accumulated (synchronised across
    ranks on the last only). Returns this rank's (weighted LM loss, router loss) sums, on the
    device: their mean over ranks is the step's loss."""
    lm_total = torch.zeros((), device=env.device)
    aux_total = torch.zeros((), device=env.device)
    accum = len(batches)
    for micro, b in enumerate(batches):
        x, y = b.x.to(env.device, non_blocking=True), b.y.to(env.device, non_blocking=True)
        real = None if b.real is None else b.real.to(env.device, non_blocking=True)
        with distributed.grad_sync(model, sync=micro == accum - 1):
            with env.autocast:
                # padded rows: the pads (no target) skip the MoE experts and router losses
                out = model(x, y, real_BT=real)
                # a micro-batch of pads only has no LM loss (its mean would be 0/0); zero times
                # the logits keeps every parameter in the graph, as DDP needs (multiplied before
                # the sum: an fp16 sum can overflow, and inf * 0 is NaN)
                lm_loss = (out.loss * (b.n * env.dist.world / total) if b.n
                           else (out.logits * 0).sum())
                loss = lm_loss + out.aux_loss / accum
            (env.scaler.scale(loss) if env.scaler else loss).backward()
        lm_total += lm_loss.detach()
        aux_total += out.aux_loss.detach() / accum
    return lm_total, aux_total


def optimizer_step(model: nn.Module, opt: torch.optim.Optimizer, sched: LRScheduler,
                   grad_clip: float, loss: float, env: Env) -> tuple[float, bool]:
    """Clip, step (unless non-finite), zero the gradients, advance the schedule and update the
    MoE routers. `loss` is the step's (global) loss; grad_clip <= 0: no clipping.

    Returns (gradient norm before clipping, skipped): skipped when the loss, or without loss
    scaling the gradient norm, is not finite; the weights and optimizer state are then as
    they were (the scheduler still advances: the step counts).
    """
    grad_norm = clipped_norm(model, opt, grad_clip, env.scaler)
    # With fp16 loss scaling an inf gradient norm is routine (the scaler skips and lowers its
    # scale); a non-finite loss is not.
    skipped = not math.isfinite(loss) or (env.scaler is None and not math.isfinite(grad_norm))
    scaler_skipped = False
    if env.scaler:
        scale = env.scaler.get_scale()
        env.scaler.step(opt)  # skips by itself when a gradient is inf/NaN
        env.scaler.update()
        scaler_skipped = env.scaler.get_scale() < scale  # the scale drops only on a skip
    elif not skipped:
        opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    # no bias-router update from a step whose weights did not move
    unwrap(model).after_optimizer_step(skipped or scaler_skipped)
    return grad_norm, skipped


def clipped_norm(model: nn.Module, opt: torch.optim.Optimizer, grad_clip: float,
                 scaler: torch.amp.GradScaler | None) -> float:
    """Unscale the gradients (loss scaling), clip them to grad_clip (<= 0: no clipping) and
    return their total norm before clipping, over every rank's shard (FSDP)."""
    if scaler:
        scaler.unscale_(opt)
    clip = grad_clip if grad_clip > 0 else float("inf")
    return float(distributed.full_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
