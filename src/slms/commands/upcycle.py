"""`slms upcycle`: an MoE checkpoint whose experts start as copies of a dense run's MLPs."""

from __future__ import annotations

import argparse

from slms.commands import options
from slms.config import MAX_EXPERTS, MAX_SEED, ROUTERS

HELP = "turn a dense checkpoint into an MoE one (experts copied from the MLPs)"
DISK_FULL_NOTE = "nothing is left at --out: the checkpoint appears only when complete"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="dense run directory or checkpoint directory")
    p.add_argument("--experts", type=options.number(int, 1, MAX_EXPERTS), default=8,
                   help="experts per MoE layer (default 8)")
    p.add_argument("--top-k", type=options.POSITIVE, default=2,
                   help="experts per token (default 2)")
    p.add_argument("--router", default="topk", choices=ROUTERS,
                   help="router of the MoE layers (default topk), initialised as in a new model")
    p.add_argument("--expert-noise", type=options.number(float, 0), default=0.0,
                   help="Gaussian noise on each expert's weights, relative to their std "
                        "(default 0: every expert an exact copy)")
    p.add_argument("--every", type=options.POSITIVE, default=1,
                   help="layer i becomes MoE when i %% every == every - 1 (default 1: all)")
    p.add_argument("--seed", type=options.number(int, 0, MAX_SEED), default=0,
                   help="seed of the expert noise")
    p.add_argument("--no-bias", dest="bias", action="store_false",
                   help="routers and experts without biases (model.moe.bias=false, as the "
                        "stock MoE classes of transformers and llama.cpp); the dense model "
                        "must have no MLP biases (model.bias=false)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")


def run(args: argparse.Namespace) -> int:
    from slms.model import count_params
    from slms.upcycle import train_overrides, upcycle_checkpoint

    model, path = upcycle_checkpoint(args.source, args.out, args.experts, args.top_k,
                                     args.router, args.expert_noise, args.every, args.seed,
                                     args.bias)
    n = count_params(model)
    print(f"wrote {path}: {n['params_total']:,} parameters ({n['params_active']:,} active)")
    assert model.cfg.moe is not None
    print("continue training with the dense run's config and overrides plus:\n  "
          + " ".join(train_overrides(model.cfg.moe, path)))
    return 0
