"""`slms import-seed`: convert a checkpoint written by the seed project's code."""

from __future__ import annotations

import argparse

HELP = "convert a checkpoint written by the seed's code"
DISK_FULL_NOTE = "an existing checkpoint at --out is intact: it is replaced only when complete"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("seed", help="the seed's .pt checkpoint (loaded with weights_only=True)")
    p.add_argument("--tokenizer", required=True, help="the seed's tokenizer.json")
    p.add_argument("--out", required=True, help="checkpoint directory to write")


def run(args: argparse.Namespace) -> int:
    from slms.model import count_params
    from slms.seed_import import import_seed

    model, _, path = import_seed(args.seed, args.tokenizer, args.out)
    n = count_params(model)
    print(f"wrote {path}: {n['params_total']:,} parameters ({n['params_active']:,} active)")
    return 0
