"""`slms eval`: loss, perplexity and bits per byte over a whole split."""

from __future__ import annotations

import argparse
import json

from slms.commands import options

HELP = "loss, perplexity and bits per byte over a whole split"


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_checkpoint(p)
    p.add_argument("--data", help="prepared data directory or SOURCE (default: the run's data)")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--batch-size", type=options.POSITIVE, default=8)
    options.add_device(p)
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from slms.analysis.evaluate import eval_checkpoint

    r = eval_checkpoint(args.checkpoint, args.data, args.split, args.batch_size, args.device)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"{r['split']} of {r['data']}: {r['tokens']:,} tokens, {r['bytes']:,} bytes")
        print(f"loss {r['loss']:.4f} nats/token  perplexity {r['perplexity']:.3f}  "
              f"bits/byte {r['bits_per_byte']:.4f}")
    return 0
