"""Muon (momentum orthogonalised by Newton-Schulz) for hidden matrices, AdamW for the rest, as
one optimizer: one state dict, one learning-rate schedule, one loss scaler.

A parameter group with `"muon": True` holds matrices (2-D weights, or stacked experts (E, D, H)
orthogonalised per expert); its update is the Nesterov momentum of the gradient, orthogonalised
by five Newton-Schulz steps (Jordan et al., the nanoGPT speedrun) and scaled by
0.2 * sqrt(max(rows, cols)) so that its RMS matches AdamW's (Liu et al., "Muon is scalable",
2025): one learning rate then suits both kinds of group. A group's `"split": (dim, n)` cuts
each of its matrices into n equal blocks along dim, orthogonalised and scaled each on its own:
the fused qkv's Q, K and V, SwiGLU's gate and up (as the nanoGPT speedrun does, with separate
matrices). Other groups take AdamW's update.
Weight decay is decoupled in both. Under FSDP2 a sharded matrix is gathered, orthogonalised
whole and sharded again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """An approximately orthogonal matrix with g's singular vectors (U V^T, singular values
    ~1), for each matrix in g's last two dimensions. bf16 on GPUs, fp32 elsewhere."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    wide = x.size(-2) > x.size(-1)
    if wide:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if wide else x).to(g.dtype)


def orthogonalise(g: torch.Tensor, steps: int, split: tuple[int, int] | None = None
                  ) -> torch.Tensor:
    """newton_schulz of g, or of each of its n blocks along dim for split = (dim, n) (in one
    batched call); on the whole matrix when g is an FSDP2 shard (DTensor)."""
    full = g.full_tensor() if hasattr(g, "full_tensor") else g
    if split is None:
        u = newton_schulz(full, steps)
    else:
        dim, n = split
        u = torch.cat(newton_schulz(torch.stack(full.chunk(n, dim)), steps).unbind(0), dim)
    if not hasattr(g, "full_tensor"):
        return u
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(u, g.device_mesh, g.placements)


def block_shape(shape: torch.Size, split: tuple[int, int] | None) -> list[int]:
    """The shape of one block of a matrix of `shape` under `split` (the whole one for None)."""
    out = list(shape)
    if split is not None:
        out[split[0]] //= split[1]
    return out


class Muon(torch.optim.Optimizer):
    """Muon on the groups marked `"muon": True`, AdamW on the others (see the module doc)."""

    def __init__(self, groups: Iterable[dict[str, Any]], lr: float, betas: tuple[float, float],
                 momentum: float = 0.95, ns_steps: int = 5, eps: float = 1e-8):
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0, "muon": False,
                    "momentum": momentum, "ns_steps": ns_steps, "split": None}
        super().__init__(list(groups), defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.dim() < 2 for p in group["params"]):
                raise ValueError("Muon groups hold matrices only (2-D or stacked 3-D)")
            if group["split"] is not None:
                dim, n = group["split"]
                if any(p.shape[dim] % n for p in group["params"]):
                    raise ValueError(f"split {group['split']} does not divide every matrix")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            update = self._muon if group["muon"] else self._adamw
            for p in group["params"]:
                if p.grad is not None:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    update(p, group)
        return loss

    def _muon(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf, m = state["momentum_buffer"], group["momentum"]
        buf.lerp_(p.grad, 1 - m)
        u = orthogonalise(p.grad.lerp(buf, m), group["ns_steps"], group["split"])  # Nesterov
        rows, cols = block_shape(p.shape, group["split"])[-2:]
        scale = 0.2 * math.sqrt(max(rows, cols))
        p.add_(u, alpha=-group["lr"] * scale)

    def _adamw(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        (b1, b2), g = group["betas"], p.grad
        state["step"] += 1
        t = float(state["step"])
        state["exp_avg"].lerp_(g, 1 - b1)
        state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - b2 ** t)).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - b1 ** t))
