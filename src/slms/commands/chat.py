"""`slms chat`: the interactive story session (slms.infer.chat)."""

from __future__ import annotations

import argparse
import dataclasses

from slms.commands import options

HELP = "interactive story generation (:help lists the commands)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_checkpoint(p)
    options.add_generation(p, default_length=False)
    options.add_device(p)
    options.add_precision(p)
    p.add_argument("--chat", action="store_true",
                   help="a conversation: each line is a user message, answered with the chat "
                   "template until <|im_end|> (for a model from `slms finetune`)")


def run(args: argparse.Namespace) -> int:
    from slms.infer.chat import run_chat

    n = args.max_new_tokens
    s = options.sampling_of(args, 1 if n is None else n)  # bad values fail before the load
    model, tok = options.load_model(args)
    if n is None:  # the default depends on the model's context
        s = dataclasses.replace(s, max_new_tokens=min(200, model.cfg.block_size // 2))
    return run_chat(model, tok, s, chat=args.chat)  # checks the length against the context
