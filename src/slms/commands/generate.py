"""`slms generate`: continue a prompt with a trained model, streaming the text."""

from __future__ import annotations

import argparse

from slms.commands import options

HELP = "continue a prompt with a trained model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_checkpoint(p)
    p.add_argument("--prompt", default="", help="text to continue (default: a new story)")
    options.add_generation(p)
    p.add_argument("--truncate", choices=["left"], help="keep the end of a too-long prompt")
    options.add_device(p)
    options.add_precision(p)


def run(args: argparse.Namespace) -> int:
    from slms.infer.generate import prompt_ids, stream_text

    s = options.sampling_of(args, args.max_new_tokens)  # bad values fail before the load
    model, tok = options.load_model(args)
    ids = prompt_ids(tok, args.prompt, model.cfg.block_size, s.max_new_tokens, args.truncate)
    print(args.prompt, end="", flush=True)
    for piece in stream_text(model, tok, ids, s):
        print(piece, end="", flush=True)
    print()
    return 0
