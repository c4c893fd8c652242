"""`slms bench`: training and generation speed, time to first token, memory."""

from __future__ import annotations

import argparse
import json
import sys

from slms.commands import options

HELP = "training and generation speed, time to first token, memory"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("targets", nargs="+", metavar="TARGET",
                   help="run / checkpoint directories or configs (random weights); KEY=VALUE "
                   "items override the configs; two targets are printed side by side")
    p.add_argument("--new-tokens", type=int, default=256, help="batch-1 generation length")
    p.add_argument("--b8-new-tokens", type=int, default=64, help="batch-8 generation length")
    p.add_argument("--prompt-tokens", type=options.POSITIVE, default=16)
    p.add_argument("--train-batch", type=options.POSITIVE, default=8)
    p.add_argument("--train-block", type=options.POSITIVE, default=256)
    p.add_argument("--train-steps", type=options.POSITIVE, default=3)
    p.add_argument("--threads", type=options.THREADS, default=0,
                   help="torch CPU threads (0: torch's default)")
    options.add_device(p)
    options.add_precision(p)
    p.add_argument("--json", action="store_true")


def check_lengths(args: argparse.Namespace) -> None:
    """Bench generates greedily; its lengths are checked as any generation length is."""
    from slms.infer.generate import Sampling

    for flag, n in (("--new-tokens", args.new_tokens), ("--b8-new-tokens", args.b8_new_tokens)):
        try:
            Sampling(max_new_tokens=n, temperature=0)
        except ValueError as e:
            raise ValueError(f"{flag}: {e}") from None


def run(args: argparse.Namespace) -> int:
    import torch

    from slms.analysis.bench import BenchOptions, bench_model, describe, load_target
    from slms.memory import keep_freed_memory

    check_lengths(args)
    overrides = [t for t in args.targets if "=" in t]
    targets = [t for t in args.targets if "=" not in t]
    if not targets:
        raise ValueError("give at least one run, checkpoint or config to benchmark")
    if args.device == "cpu":
        keep_freed_memory()  # as `slms train` does on the CPU, so that training speeds compare
    if args.threads:
        torch.set_num_threads(args.threads)
    o = BenchOptions(args.new_tokens, args.b8_new_tokens, args.prompt_tokens, args.train_batch,
                     args.train_block, args.train_steps, args.device, args.precision)
    results = []
    for t in targets:
        name, model = load_target(t, overrides, options.resolve_config_path, args.device)
        r = bench_model(model, name, o, log=lambda m: print(m, file=sys.stderr, flush=True))
        results.append(r | {"threads": torch.get_num_threads()})
        del model
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    else:
        print(describe(results))
    return 0
