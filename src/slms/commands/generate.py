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
    p.add_argument("--chat", action="store_true",
                   help="the prompt is a user message, rendered with the chat template; the "
                   "answer ends at <|im_end|> (for a model from `slms finetune`)")
    options.add_device(p)
    options.add_precision(p)


def run(args: argparse.Namespace) -> int:
    from slms.infer.generate import chat_prompt_ids, prompt_ids, stream_text
    from slms.instruct.template import stop_ids

    s = options.sampling_of(args, args.max_new_tokens)  # bad values fail before the load
    model, tok = options.load_model(args)
    if args.chat:
        ids = chat_prompt_ids(tok, [{"role": "user", "content": args.prompt}],
                              model.cfg.block_size, s.max_new_tokens)
        stop = stop_ids(tok)
    else:
        ids = prompt_ids(tok, args.prompt, model.cfg.block_size, s.max_new_tokens,
                         args.truncate)
        stop = None
        print(args.prompt, end="", flush=True)
    for piece in stream_text(model, tok, ids, s, stop):
        print(piece, end="", flush=True)
    print()
    return 0
