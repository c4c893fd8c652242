"""`slms prepare`: tokenize a source into packed train.bin / val.bin and meta.json."""

from __future__ import annotations

import argparse
from typing import Any

from slms.commands import options

HELP = "tokenize a source into packed train.bin / val.bin"
DISK_FULL_NOTE = "an existing output directory is intact: it is replaced only when complete"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default="synthetic",
                   help="synthetic | .txt/.jsonl/.parquet file or directory | hub dataset id")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--train-count", type=options.POSITIVE,
                   help="use a seeded sample of N training stories")
    p.add_argument("--val-count", type=options.POSITIVE,
                   help="use a seeded sample of N validation stories")
    p.add_argument("--num-proc", type=num_proc, default="auto", metavar="N|auto",
                   help="tokenizer processes; auto (default): one process whose tokenizer "
                   "encodes on every core, the fastest where measured (docs/benchmarks.md)")
    p.add_argument("--fix-text", action="store_true",
                   help="repair mojibake (e.g. \u00e2\u20ac\u2122) and normalise unicode")
    p.add_argument("--dedupe", action="store_true", help="drop duplicate stories")
    p.add_argument("--layout", choices=["packed", "padded"], default="packed",
                   help="packed streams (default) or the seed's one padded story per row")
    p.add_argument("--block-size", type=options.number(int, 2), default=1080,
                   help="row width of --layout padded")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an --out directory that holds data of another tokenizer")
    options.add_source(p)


def num_proc(text: str) -> int | str:
    """--num-proc: 'auto' or an integer >= 1."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is neither 'auto' nor an integer >= 1")
    return int(text)


def run(args: argparse.Namespace) -> int:
    from slms.data.prepare import PrepareOptions, prepare_source
    from slms.tokenizer import Tokenizer

    tok = Tokenizer.from_file(args.tokenizer)
    opts = PrepareOptions(layout=args.layout, block_size=args.block_size, fix_text=args.fix_text,
                          dedupe=args.dedupe, num_proc=args.num_proc,
                          train_count=args.train_count, val_count=args.val_count, seed=args.seed,
                          overwrite=args.overwrite)
    meta = prepare_source(options.source_of(args.source, args), tok, args.out, opts)
    print_summary(meta)
    print(f"wrote {args.out}/{{train,val}}.bin ({meta['format']}, {meta['dtype']}) and meta.json")
    return 0


def print_summary(meta: dict[str, Any]) -> None:
    for split, c in meta["splits"].items():
        print(f"{split}: {c['stories']:,} stories, {c['tokens']:,} tokens, {c['bytes']:,} bytes "
              f"({c['bytes_per_token']:.2f} bytes/token, "
              f"{c['tokens_per_story']['mean']:.0f} tokens/story)")
        dropped = {k: v for k, v in meta["hygiene"][split].items() if v}
        if dropped:
            print(f"  {split} hygiene: " + ", ".join(f"{k} {v:,}" for k, v in dropped.items()))
