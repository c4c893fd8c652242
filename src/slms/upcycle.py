"""Sparse upcycling (Komatsuzaki et al. 2022): an MoE model whose experts start as copies of a
dense model's feed-forward layers; attention, embeddings and norms are copied as they are.

The new routers start as any new model's do (`GPT`'s initialisation, seeded by `seed`): the
router's choice and gate weights differ from token to token, but the chosen experts are
identical copies of the dense MLP and their renormalised top-k weights sum to one, so their
weighted sum is exactly the dense MLP's output: the upcycled model computes the dense function
at step 0, whatever the router. Different tokens reach different experts, so the experts get
different gradients from the first step and drift apart, and the router then learns. (A router
at zero, as this module once had, sent every token to the same K experts: a tie that top-k breaks
by index, so only those K experts were trained and the router's LM-loss gradient was exactly
zero.) `expert_noise` > 0 also perturbs each expert (the output is then close to the dense
one, not equal).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from slms.config import ROUTERS, MoEConfig
from slms.model import GPT


def upcycle(model: GPT, n_experts: int, top_k: int, router: str = "topk",
            expert_noise: float = 0.0, every: int = 1, seed: int = 0, bias: bool = True) -> GPT:
    """The MoE twin of a dense `model` (in the same train/eval mode, on the same device).

    Layers i with i % every == every - 1 become MoE layers with `n_experts` copies of the dense
    MLP (plus Gaussian noise of std expert_noise * the dense matrix's std on each expert's
    weight matrices; biases are copied exactly, zeros where the dense MLP has none); the
    others keep their dense MLP. bias=False: routers and experts without biases
    (model.moe.bias = false), for a dense model whose MLPs have none.
    """
    if not (math.isfinite(expert_noise) and expert_noise >= 0):  # inf or nan: non-finite weights
        raise ValueError(f"--expert-noise must be a finite number >= 0, got {expert_noise!r}")
    cfg = model.cfg
    if cfg.moe is not None:
        raise ValueError("the model is already a Mixture-of-Experts model; upcycle a dense one")
    if router not in ROUTERS:
        raise ValueError(f"--router must be one of {', '.join(ROUTERS)}, got {router!r}")
    if not bias and cfg.bias:
        raise ValueError("--no-bias needs a dense model without MLP biases (model.bias=false): "
                         "experts without biases would not compute the dense MLPs")
    moe = MoEConfig(n_experts=n_experts, top_k=top_k, router=router,
                    expert_hidden=cfg.mlp_ratio * cfg.n_embd, every=every, bias=bias)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the routers' initialisation, the same for the same seed
        out = GPT(dataclasses.replace(cfg, moe=moe))  # validates the MoE settings
    fresh = out.state_dict()
    state = dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    for i in range(cfg.n_layer):
        if not out.cfg.is_moe_layer(i):
            continue
        p = f"blocks.{i}.ffn."
        fc_w, proj_w = state.pop(p + "fc.weight"), state.pop(p + "proj.weight")  # (out, in)
        fc_b, proj_b = state.pop(p + "fc.bias", None), state.pop(p + "proj.bias", None)
        state[p + "experts.w1_EDH"] = _copies(fc_w.t(), n_experts, expert_noise, gen)
        state[p + "experts.w2_EHD"] = _copies(proj_w.t(), n_experts, expert_noise, gen)
        if bias:
            state[p + "experts.b1_EH"] = _copies(_bias(fc_b, fc_w.size(0), fc_w), n_experts, 0,
                                                 gen)
            state[p + "experts.b2_ED"] = _copies(_bias(proj_b, proj_w.size(0), proj_w),
                                                 n_experts, 0, gen)
        for name, t in fresh.items():
            if name.startswith(p + "router."):
                state[name] = t
    out.load_state_dict(state, strict=True)
    return out.to(model.device).train(model.training)


def _bias(b: torch.Tensor | None, n: int, like: torch.Tensor) -> torch.Tensor:
    return b if b is not None else like.new_zeros(n)


def _copies(t: torch.Tensor, n: int, noise: float, gen: torch.Generator) -> torch.Tensor:
    """n copies of t stacked on a new first dim, each plus noise * t.std() Gaussian noise."""
    out = t.detach().unsqueeze(0).repeat(n, *[1] * t.dim()).contiguous()
    if noise > 0:
        std = float(t.float().std())
        out += (torch.randn(out.shape, generator=gen) * (noise * std)).to(out)
    return out


def upcycle_checkpoint(src: str | Path, out: str | Path, n_experts: int, top_k: int,
                       router: str = "topk", expert_noise: float = 0.0, every: int = 1,
                       seed: int = 0, bias: bool = True) -> tuple[GPT, Path]:
    """Upcycle the dense checkpoint (or run directory's best/latest) `src` into a new
    checkpoint directory `out`, which must not exist or be empty."""
    from slms.checkpoint import load_checkpoint, save_checkpoint
    from slms.rundir import resolve

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} already exists and is not empty; choose another directory")
    path = resolve(src)
    model, tokenizer, _ = load_checkpoint(path)
    moe = upcycle(model, n_experts, top_k, router, expert_noise, every, seed, bias)
    info = {"upcycled_from": str(path),
            "upcycle": {"n_experts": n_experts, "top_k": top_k, "router": router,
                        "expert_noise": expert_noise, "every": every, "seed": seed,
                        "bias": bias}}
    return moe, save_checkpoint(out, moe, tokenizer, info)


def train_overrides(moe: MoEConfig, ckpt: str | Path) -> list[str]:
    """The `slms train` overrides that continue training from an upcycled checkpoint (after
    the dense run's own config and overrides)."""
    return [f"model.moe.n_experts={moe.n_experts}", f"model.moe.top_k={moe.top_k}",
            f"model.moe.router={moe.router}", f"model.moe.expert_hidden={moe.expert_hidden}",
            f"model.moe.every={moe.every}", *([] if moe.bias else ["model.moe.bias=false"]),
            f"train.init_from={ckpt}"]
