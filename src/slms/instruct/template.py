"""The ChatML template of slms's special tokens, as ids, with the targets a fine-tune scores.

A conversation renders as the tokenizer's prompt prefix (<|endoftext|>: it begins a document,
so the document mask keeps packed conversations apart), then for each message
``<|im_start|>{role}\\n{content}<|im_end|>\\n``. This is the string `slms serve` builds for
/v1/chat/completions and the chat template the HF export writes; a prompt ends with
``<|im_start|>assistant\\n``. Only an assistant's content and the <|im_end|> that closes it are
targets of the fine-tuning loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from slms.tokenizer import Tokenizer

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ROLES = ("system", "user", "assistant")


class ConversationError(ValueError):
    """A conversation that cannot be rendered (the message says which rule it breaks)."""


def check_messages(messages: Any) -> list[dict[str, str]]:
    """The messages of a training conversation, checked: a non-empty list of {"role",
    "content"} objects, roles from ROLES, string contents, at least one assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise ConversationError("'messages' must be a non-empty list of {\"role\", \"content\"}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ConversationError(f"messages[{i}] is not an object with role and content")
        if m.get("role") not in ROLES:
            raise ConversationError(f"messages[{i}] has role {m.get('role')!r}; use one of "
                                    f"{', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ConversationError(f"messages[{i}].content must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise ConversationError("the conversation has no assistant turn: nothing to learn from")
    return messages


def has_chat_tokens(tok: Tokenizer) -> bool:
    return tok.hf.token_to_id(IM_START) is not None and tok.hf.token_to_id(IM_END) is not None


def require_chat_tokens(tok: Tokenizer) -> None:
    if not has_chat_tokens(tok):
        raise ValueError(f"this tokenizer has no {IM_START} / {IM_END} tokens (a tokenizer not "
                         "trained by `slms tokenizer`): it cannot render chats")


def render_text(messages: Sequence[dict[str, str]], generation_prompt: bool = False) -> str:
    """The template's text after the prompt prefix (`generation_prompt`: then the assistant's
    header, for generation)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if generation_prompt else "")


def render(tok: Tokenizer, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """(ids, scored): the conversation's ids (prompt prefix first) and, per id, whether it is a
    target of the loss (an assistant's content or its closing <|im_end|>). Whole-text encoding,
    so the ids are those the server and the HF template give; a token that straddles the start
    of an assistant's content (none does with a byte-level slms tokenizer) is not scored."""
    require_chat_tokens(tok)
    spans, text = [], ""
    for m in messages:
        text += f"{IM_START}{m['role']}\n"
        start = len(text)
        text += m["content"] + IM_END
        if m["role"] == "assistant":
            spans.append((start, len(text)))
        text += "\n"
    enc = tok.hf.encode(text, add_special_tokens=False)
    scored = [any(a <= s and e <= b for a, b in spans) for s, e in enc.offsets]
    prefix = tok.prompt_prefix
    return [*prefix, *enc.ids], [False] * len(prefix) + scored


def prompt(tok: Tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    """The ids that ask for the next assistant turn: the prefix, the messages, the header."""
    require_chat_tokens(tok)
    return tok.encode_prompt(render_text(messages, generation_prompt=True))


def stop_ids(tok: Tokenizer) -> set[int]:
    """Where an assistant's answer ends: <|im_end|> (and <|endoftext|>, a base model's end)."""
    out = {tok.eos_id}
    if has_chat_tokens(tok):
        out.add(tok.hf.token_to_id(IM_END))
    return out
