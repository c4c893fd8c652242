"""Text generation from a prompt: the sampling options and the prompt and length checks (of the
CLI, chat and the server alike), seeding, streaming decoded text."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

import torch

from slms.infer.detokenize import TextStream
from slms.infer.sampling import LENGTH_RULE, Sampling, SamplingError
from slms.model import GPT
from slms.tokenizer import Tokenizer


def check_room(max_new_tokens: int, context: int) -> None:
    """The one check of a generation length against a model's context: the prompt needs at
    least one position (its start token)."""
    if max_new_tokens < 1:
        raise SamplingError("max_new_tokens", LENGTH_RULE, max_new_tokens)
    if max_new_tokens >= context:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for the prompt in the "
                         f"model's context of {context} tokens; use at most {context - 1}")


def check_prompt(ids: list[int]) -> list[int]:
    """A prompt's ids (with its prefix), refused when there are none: an empty prompt for a
    tokenizer without a start token."""
    if not ids:
        raise ValueError("the prompt is empty and this model's tokenizer has no start token "
                         "(an imported seed model): give a prompt")
    return ids


def prompt_ids(tokenizer: Tokenizer, prompt: str, context: int, max_new_tokens: int,
               truncate: str | None = None, warn: Callable[[str], None] | None = None
               ) -> list[int]:
    """The prompt's ids after the tokenizer's prompt prefix (slms: the end-of-text id, as stories
    start after one in training).

    A prompt that does not fit the context with `max_new_tokens` is an error, or with
    truncate='left' keeps its last tokens (with a warning).
    """
    check_room(max_new_tokens, context)
    prefix = tokenizer.prompt_prefix
    ids = check_prompt(tokenizer.encode_prompt(prompt))
    room = context - max_new_tokens
    if len(ids) > room:
        if truncate != "left":
            raise ValueError(f"the prompt is {len(ids) - len(prefix)} tokens; "
                             f"with --max-new-tokens "
                             f"{max_new_tokens} it does not fit the model's context of {context} "
                             "tokens: shorten it, lower --max-new-tokens, or pass --truncate left")
        keep = room - len(prefix)
        if keep < 1:
            raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for the prompt "
                             f"in the model's context of {context} tokens; lower it")
        (warn or (lambda m: print(m, file=sys.stderr)))(
            f"warning: prompt truncated to its last {keep} tokens")
        ids = [*prefix, *ids[len(ids) - keep:]]  # the start token stays
    return ids


def stream_text(model: GPT, tokenizer: Tokenizer, ids: list[int], s: Sampling,
                stop: set[int] | None = None) -> Iterator[str]:
    """Yield decoded text pieces as tokens are sampled; stops at end-of-text (or at any id of
    `stop`: a chat answer's <|im_end|>)."""
    stop = {tokenizer.eos_id} if stop is None else stop | {tokenizer.eos_id}
    device = model.device
    gen = None
    if s.seed is not None:
        gen = torch.Generator(device=device).manual_seed(s.seed)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    stream = TextStream(tokenizer)
    for tok in model.iter_tokens(idx, s.max_new_tokens, s.temperature, s.top_k, s.top_p,
                                 s.repetition_penalty, tokenizer.eos_id, gen):
        t = int(tok[0])
        if t in stop:
            break
        piece, _ = stream.push(t)
        if piece:
            yield piece
    piece, _ = stream.flush()
    if piece:
        yield piece


def generate_text(model: GPT, tokenizer: Tokenizer, prompt: str, s: Sampling,
                  truncate: str | None = None) -> str:
    ids = prompt_ids(tokenizer, prompt, model.cfg.block_size, s.max_new_tokens, truncate)
    return "".join(stream_text(model, tokenizer, ids, s))


def chat_prompt_ids(tokenizer: Tokenizer, messages: list[dict[str, str]], context: int,
                    max_new_tokens: int) -> list[int]:
    """The chat template's ids asking for the next assistant turn; the oldest turns are left
    out (a system message kept) until it fits the context with `max_new_tokens`."""
    from slms.instruct.template import prompt

    check_room(max_new_tokens, context)
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    while True:
        ids = prompt(tokenizer, system + turns)
        if len(ids) + max_new_tokens <= context:
            return ids
        if len(turns) <= 1:
            raise ValueError(f"the message is {len(ids)} tokens with the chat template; with "
                             f"{max_new_tokens} new tokens it does not fit the model's context "
                             f"of {context} tokens: shorten it or lower --max-new-tokens")
        turns = turns[1:]
