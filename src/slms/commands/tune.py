"""`slms tune`: time the MoE kernels for a model's shapes once, ahead of first use."""

from __future__ import annotations

import argparse
import json

from slms.commands import options

HELP = "time the MoE kernels for a model's shapes on this machine (cached; used automatically)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="TOML config, preset name, run or checkpoint directory")
    options.add_overrides(p)
    p.add_argument("--batch", type=options.POSITIVE, default=8,
                   help="training and generation batch")
    p.add_argument("--block", type=options.number(int, 8), default=None,
                   help="training length (default: the "
                   "model's block size)")
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="auto",
                   help="as training's train.precision (default auto)")
    options.add_device(p)
    p.add_argument("--threads", type=options.THREADS, default=None,
                   help="torch threads (default: torch's)")
    p.add_argument("--again", action="store_true", help="forget this machine's choices first")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    import torch

    from slms.analysis.info import model_config_of
    from slms.analysis.kernels import describe, tune_model

    if args.threads:
        torch.set_num_threads(args.threads)
    _, cfg = model_config_of(args.target, args.overrides, options.resolve_config_path)
    entries = tune_model(cfg, args.precision, args.batch, args.block, args.device, args.again)
    print(json.dumps(entries, indent=2) if args.json else describe(entries))
    return 0
