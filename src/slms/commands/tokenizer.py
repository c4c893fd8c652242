"""`slms tokenizer`: train a byte-level BPE tokenizer on a text source."""

from __future__ import annotations

import argparse

from slms.commands import options

HELP = "train a byte-level BPE tokenizer on a text source"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="synthetic", help="SOURCE (default: the embedded corpus)")
    p.add_argument("--vocab-size", type=options.POSITIVE, default=2048)
    p.add_argument("--out", required=True, help="tokenizer.json to write")
    p.add_argument("--max-train-bytes", type=options.number(float, 1, 2**62),
                   default=None,
                   help="train on a seeded sample of about this many bytes (e.g. 2e8)")
    options.add_source(p)


def run(args: argparse.Namespace) -> int:
    from slms.data.pipeline import train_tokenizer_on

    max_bytes = int(args.max_train_bytes) if args.max_train_bytes else None
    source = options.source_of(args.data, args)
    tok, report = train_tokenizer_on(source, args.vocab_size, max_bytes)
    tok.save(args.out)
    held_out = report["held_out_stories"]
    measured = (f"{report['bytes_per_token']:.2f} bytes per token on {held_out} held-out stories"
                if held_out else "no held-out stories to measure bytes per token on")
    print(f"wrote {args.out}: {tok.vocab_size} tokens; {measured}")
    return 0
