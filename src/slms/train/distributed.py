"""Data parallelism under torchrun: process group, DDP / FSDP2 wrapping (and `unwrap`, the model
inside), cross-rank agreement.

`slms train` reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK). Without it, or with
WORLD_SIZE=1, every helper here is a no-op and the model is not wrapped.
"""

from __future__ import annotations

import inspect
import os
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from slms.dist import Dist
from slms.model import GPT


def init(device_name: str) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    owns = not dist.is_initialized()
    if owns:
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, local_rank, owns)


def shutdown(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        # Every rank leaves together: a rank tearing its group down while another still has
        # collectives (FSDP2's) in flight aborted the process ("terminate called without an
        # active exception") in about one full-suite run in four.
        dist.barrier()
        dist.destroy_process_group()


def device_for(d: Dist, device: torch.device) -> torch.device:
    """One GPU per process: cuda:LOCAL_RANK."""
    if d.enabled and device.type == "cuda":
        return torch.device("cuda", d.local_rank)
    return device


def wrap(model: GPT, parallel: str, d: Dist, device: torch.device, compile: bool) -> nn.Module:
    """DDP (compiled inside) or FSDP2 fully_shard per block (compiled outside); build the
    optimizer from the returned module's parameters."""
    if not d.enabled:
        return torch.compile(model) if compile else model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return torch.compile(model) if compile else model
    from torch.nn.parallel import DistributedDataParallel as DDP

    inner = torch.compile(model) if compile else model
    # The bias router keeps expert_bias equal on all ranks itself (its load is all-reduced);
    # syncing buffers in every forward would overwrite each rank's own load counts.
    no_sync = ({"forward_sync_buffers": False}
               if "forward_sync_buffers" in inspect.signature(DDP).parameters
               else {"broadcast_buffers": False})
    return DDP(inner, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)


def unwrap(model: nn.Module) -> GPT:
    """The GPT inside DDP / torch.compile wrappers (so saved keys have no `_orig_mod.`)."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model  # type: ignore[return-value]


def is_fsdp(model: nn.Module) -> bool:
    inner = getattr(model, "_orig_mod", model)
    return type(inner).__name__.startswith("FSDP")


def grad_sync(model: nn.Module, sync: bool) -> AbstractContextManager:
    """Skip the gradient all-reduce on accumulation micro-steps (DDP no_sync; FSDP2 flag)."""
    inner = getattr(model, "_orig_mod", model)
    if hasattr(inner, "set_requires_gradient_sync"):
        inner.set_requires_gradient_sync(sync)
        return nullcontext()
    if hasattr(model, "no_sync") and not sync:
        return model.no_sync()
    return nullcontext()


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_ returns a DTensor for FSDP2 parameters; the full value is the norm."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict | None, dict]:
    """(full model state dict or None when plain, optimizer state dict): a collective under FSDP,
    the full tensors land on CPU on rank 0."""
    if not is_fsdp(model):
        return None, opt.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    inner = getattr(model, "_orig_mod", model)
    return (get_model_state_dict(inner, options=opts),
            {"fsdp_full": get_optimizer_state_dict(inner, opt, options=opts)})


def load_full_state(model: nn.Module, opt: torch.optim.Optimizer, weights: dict[str, Any],
                    optim: dict[str, Any]) -> None:
    """Load full (unsharded) state dicts into a possibly FSDP-sharded model and its optimizer."""
    inner = getattr(model, "_orig_mod", model)
    if not is_fsdp(model):
        getattr(inner, "module", inner).load_state_dict(weights)
        if "fsdp_full" in optim:
            raise ValueError("this checkpoint was written by an FSDP run; resume it with "
                             "train.parallel=fsdp under torchrun")
        opt.load_state_dict(optim)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(inner, weights, options=opts)
    if "fsdp_full" not in optim:
        raise ValueError("this checkpoint was not written by an FSDP run; resume it with "
                         "train.parallel=ddp")
    set_optimizer_state_dict(inner, opt, optim["fsdp_full"], options=opts)
