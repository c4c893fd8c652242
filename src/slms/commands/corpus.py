"""`slms corpus`: write the embedded story corpus as train.txt / val.txt."""

from __future__ import annotations

import argparse

from slms.commands import options
from slms.config import MAX_SEED

HELP = "write the embedded story corpus as train.txt / val.txt"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--stories", type=options.POSITIVE, default=None,
                   help="number of stories (default 6000)")
    p.add_argument("--seed", type=options.number(int, 0, MAX_SEED), default=0)


def run(args: argparse.Namespace) -> int:
    from slms import corpus

    n = args.stories if args.stories is not None else corpus.DEFAULT_STORIES
    train, val = corpus.write_corpus(args.out, n_stories=n, seed=args.seed)
    print(f"wrote {train} and {val} ({n} stories, seed {args.seed})")
    return 0
