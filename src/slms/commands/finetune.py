"""`slms finetune`: instruction fine-tuning of a trained model (slms.instruct.finetune)."""

from __future__ import annotations

import argparse

from slms.commands import options

HELP = "fine-tune a trained model on conversations (the loss counts the assistant's tokens)"
DISK_FULL_NOTE = ("the last checkpoint saved is intact: a checkpoint is written to a temporary "
                  "directory and moved into place only when complete")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", nargs="?", help="the base model: a run or checkpoint directory")
    p.add_argument("--data", default="synthetic",
                   help="synthetic (the embedded instruction corpus, default), a chat .jsonl "
                   "file, a TinyStoriesInstruct-style .txt file, or roneneldan/TinyStoriesInstruct")
    p.add_argument("--conversations", type=int, default=None,
                   help="size of the synthetic corpus (default 6000)")
    p.add_argument("--out", help="run directory (default runs/<base name>-finetune-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a fine-tune from its last "
                   "checkpoint")
    options.add_overrides(p, "dotted overrides, e.g. train.max_steps=300 train.lr=1e-3")


def run(args: argparse.Namespace) -> int:
    from slms.commands.train import where_to_load
    from slms.instruct.corpus import DEFAULT_CONVERSATIONS
    from slms.instruct.finetune import finetune, resume_finetune

    overrides = list(args.overrides)
    if args.base and "=" in args.base:  # overrides only, with --resume
        overrides.insert(0, args.base)
        args.base = None
    if args.resume:
        run_dir = resume_finetune(args.resume, overrides)
    elif args.base is None:
        raise ValueError("give the base model to fine-tune (a run or checkpoint directory), or "
                         "--resume RUN_DIR")
    else:
        n = args.conversations if args.conversations is not None else DEFAULT_CONVERSATIONS
        run_dir = finetune(args.base, args.data, args.out, overrides, n)
    print(f"done: {run_dir} ({where_to_load(run_dir)}); score it with: slms eval-instruct "
          f"{run_dir}")
    return 0
