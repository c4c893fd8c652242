"""`slms eval-instruct`: the share of held-out requests a model's answers honour, against its
base model's (slms.instruct.evaluate)."""

from __future__ import annotations

import argparse
import json

from slms.commands import options

HELP = "instruction following: the share of held-out requests whose answer has every element"


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_checkpoint(p, "the fine-tuned run or checkpoint directory")
    p.add_argument("--requests", type=int, default=200, help="held-out requests (default 200)")
    p.add_argument("--data", help="requests from another SOURCE: its validation conversations "
                   "with a 'Words:' line (default: the synthetic held-out requests)")
    p.add_argument("--base", help="baseline model (default: the checkpoint the fine-tune "
                   "started from)")
    p.add_argument("--no-base", action="store_true", help="score the model alone")
    p.add_argument("--out", help="per-request JSONL (default RUN/eval-instruct.jsonl)")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="longest answer (default 256, at most the room the context leaves)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top-k", type=int, default=40, help="0 = off (default 40)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    options.add_device(p)
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def run(args: argparse.Namespace) -> int:
    import sys

    from slms.infer.sampling import Sampling
    from slms.instruct.evaluate import eval_instruct, summary_lines

    s = Sampling(args.max_new_tokens, args.temperature, args.top_k or None, None, 1.0,
                 args.seed)
    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    r = eval_instruct(args.checkpoint, args.requests, args.data, args.base, s, args.out,
                      args.device, log=log, with_base=not args.no_base)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        for line in summary_lines(r):
            print(line)
    return 0
