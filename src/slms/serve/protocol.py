"""The OpenAI API's request and response shapes: a request body checked field by field into a
`GenRequest`, and the response and stream-chunk objects built from generated text.

Status codes: 400 for malformed JSON and values the model cannot serve (a negative
temperature, a prompt longer than the context), 422 for a field of the wrong type or one this
server does not know, 404 for a model it does not serve. Every error is OpenAI's error object
with one line of message, so the official clients raise their usual exceptions.
Extensions beyond the OpenAI API (clients that do not know them ignore them): request fields
`top_k`, `repetition_penalty`, `ignore_eos`, `routing`; response field `slms`.
"""

from __future__ import annotations

import json
import numbers
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from slms.infer.generate import check_prompt
from slms.infer.sampling import Sampling, SamplingError, is_int
from slms.tokenizer import NotTextError, Tokenizer

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
DEFAULT_MAX_TOKENS = 16  # /v1/completions, as OpenAI's; chat's default is the room left
ROLES = ("system", "developer", "user", "assistant")


class ApiError(Exception):
    """A request the server refuses: HTTP `status` and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None):
        # a lone surrogate from the request (JSON allows "\\ud800") has no UTF-8 bytes
        message, param = (None if x is None else x.encode("utf-8", "backslashreplace").decode()
                          for x in (message, param))
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = (
            status, message, param, kind, code)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclass(frozen=True)
class GenRequest:
    """One generation, checked: the prompt's ids and how to sample after them."""

    ids: list[int]
    sampling: Sampling  # max_new_tokens is the request's max_tokens
    stop: tuple[str, ...] = ()
    stop_ids: frozenset[int] = frozenset()  # tokens that end generation, not part of the text
    stream: bool = False
    include_usage: bool = False
    routing: bool = False  # extension: experts and gate weights per generated token


def _is_num(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_str_list(x: object) -> bool:
    return isinstance(x, list) and all(isinstance(s, str) for s in x)


# field -> (check of its type, what it must be); None is always allowed (= the default)
TYPES: dict[str, tuple[Callable[[object], bool], str]] = {
    "model": (lambda x: isinstance(x, str), "a string"),
    "prompt": (lambda x: isinstance(x, str) or _is_str_list(x)
               or (isinstance(x, list) and all(is_int(i) for i in x)),
               "a string, a list of one string, or a list of token ids"),
    "messages": (lambda x: isinstance(x, list), "a list of messages"),
    "max_tokens": (is_int, "an integer"),
    "max_completion_tokens": (is_int, "an integer"),
    "temperature": (_is_num, "a number"),
    "top_p": (_is_num, "a number"),
    "top_k": (is_int, "an integer"),
    "repetition_penalty": (_is_num, "a number"),
    "seed": (is_int, "an integer"),
    "stop": (lambda x: isinstance(x, str) or _is_str_list(x), "a string or a list of strings"),
    "n": (is_int, "an integer"),
    "stream": (lambda x: isinstance(x, bool), "true or false"),
    "stream_options": (lambda x: isinstance(x, dict), "an object"),
    "logprobs": (lambda x: isinstance(x, bool) or is_int(x), "a boolean or an integer"),
    "top_logprobs": (is_int, "an integer"),
    "echo": (lambda x: isinstance(x, bool), "true or false"),
    "best_of": (is_int, "an integer"),
    "logit_bias": (lambda x: isinstance(x, dict), "an object"),
    "presence_penalty": (_is_num, "a number"),
    "frequency_penalty": (_is_num, "a number"),
    "user": (lambda x: isinstance(x, str), "a string"),
    "ignore_eos": (lambda x: isinstance(x, bool), "true or false"),
    "routing": (lambda x: isinstance(x, bool), "true or false"),
}
COMMON = ("model", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed",
          "stop", "n", "stream", "stream_options", "logprobs", "best_of", "logit_bias",
          "presence_penalty", "frequency_penalty", "user", "ignore_eos", "routing")
FIELDS = {"completions": {"prompt", "echo", *COMMON},
          "chat": {"messages", "max_completion_tokens", "top_logprobs", *COMMON}}
# accepted only at the value that means "off": (field, off values, why not)
UNSUPPORTED = [("n", (1,), "n must be 1: send one request per completion"),
               ("best_of", (1,), "best_of must be 1"),
               ("echo", (False,), "echo is not supported"),
               ("logprobs", (False, 0), "logprobs are not supported by this server"),
               ("top_logprobs", (0,), "top_logprobs are not supported by this server"),
               ("logit_bias", ({},), "logit_bias is not supported by this server"),
               ("presence_penalty", (0,), "presence_penalty is not supported; use the "
                "repetition_penalty extension (1 = off)"),
               ("frequency_penalty", (0,), "frequency_penalty is not supported; use the "
                "repetition_penalty extension (1 = off)")]


MAX_DEPTH = 32  # nesting of a request body; the API's deepest is 4 (messages[i].content[j])


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body (ApiError 400 when it is not one, or is nested
    deeper than MAX_DEPTH: checked before any code walks it recursively)."""
    too_deep = ApiError(400, f"the request body is nested too deeply (more than {MAX_DEPTH} "
                        "levels of arrays and objects)")
    try:
        body = json.loads(raw)
    except RecursionError:  # json's C parser refuses at the interpreter's recursion limit
        raise too_deep from None
    except (ValueError, UnicodeDecodeError) as e:  # ValueError: also an int of > 4300 digits
        first = (str(e).splitlines() or [""])[0]
        raise ApiError(400, f"the request body is not valid JSON ({first})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if _depth(body) > MAX_DEPTH:
        raise too_deep
    return body


def _depth(value: Any) -> int:
    """How deeply `value` nests lists and dicts (a scalar: 0), without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        kids = v.values() if isinstance(v, dict) else v if isinstance(v, list) else None
        if kids is not None:
            deepest = max(deepest, d)
            todo.extend((k, d + 1) for k in kids)
    return deepest


def check_fields(body: dict[str, Any], kind: str) -> None:
    """Unknown fields, fields of the wrong type (422) and unsupported options (400)."""
    for name, value in body.items():
        if name not in FIELDS[kind]:
            raise ApiError(422, f"unknown field {name!r}", name)
        check, what = TYPES[name]
        if value is not None and not check(value):
            raise ApiError(422, f"{name} must be {what}; got {json.dumps(value)[:60]}", name)
    for name, off, why in UNSUPPORTED:
        if body.get(name) is not None and body[name] not in off:
            raise ApiError(400, why, name)
    options = body.get("stream_options") or {}
    if set(options) - {"include_usage"} or not isinstance(options.get("include_usage", False),
                                                           bool):
        raise ApiError(422, "stream_options takes only include_usage (true or false)",
                       "stream_options")


def check_model(body: dict[str, Any], served: str) -> None:
    name = body.get("model")
    if name is not None and name != served:
        raise ApiError(404, f"model {name!r} not found; this server serves {served!r}",
                       "model", code="model_not_found")


def render_chat(messages: list[Any]) -> str:
    """The messages in the tokenizer's ChatML template, ending with the assistant's turn."""
    parts = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] must be an object with a role of "
                           f"{', '.join(ROLES)}", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text ones
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                               "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", "messages")
        parts.append(f"{IM_START}{m['role']}\n{content}{IM_END}\n")
    if not parts:
        raise ApiError(400, "messages is empty", "messages")
    return "".join(parts) + f"{IM_START}assistant\n"


def prompt_of(body: dict[str, Any], kind: str, tok: Tokenizer) -> list[int]:
    """The prompt's ids after the tokenizer's prompt prefix (never none)."""
    param = "messages" if kind == "chat" else "prompt"
    try:
        return check_prompt(_prompt_ids(body, kind, tok))
    except ValueError as e:  # no ids at all, or a lone surrogate in the text
        raise ApiError(400, f"{param}: {e}" if isinstance(e, NotTextError) else str(e),
                       param) from None


def _prompt_ids(body: dict[str, Any], kind: str, tok: Tokenizer) -> list[int]:
    if kind == "chat":
        if body.get("messages") is None:
            raise ApiError(400, "messages is required", "messages")
        if tok.hf.token_to_id(IM_START) is None or tok.hf.token_to_id(IM_END) is None:
            raise ApiError(400, "this model's tokenizer has no chat tokens; use /v1/completions")
        return tok.encode_prompt(render_chat(body["messages"]))
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(400, "prompt is required", "prompt")
    if isinstance(prompt, str):
        return tok.encode_prompt(prompt)
    if prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise ApiError(400, "send one prompt per request", "prompt")
        return tok.encode_prompt(prompt[0])
    bad = [i for i in prompt if not 0 <= i < tok.vocab_size]
    if bad:
        raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0 .. "
                       f"{tok.vocab_size - 1})", "prompt")
    return [*tok.prompt_prefix, *prompt]


def max_tokens_of(body: dict[str, Any], kind: str, n_prompt: int, context: int) -> int:
    """max_tokens, checked against the context (default: 16, or for chat the room left)."""
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    n = body.get(name)
    room = context - n_prompt
    if n is not None and n >= context:
        raise ApiError(400, f"{name} {n} is beyond the model's context of {context} tokens; "
                       f"use at most {context - 1} (less the prompt's tokens)", name)
    if room < 1:
        raise ApiError(400, f"the prompt is {n_prompt} tokens and does not fit the model's "
                       f"context of {context} tokens with any completion: shorten it",
                       "messages" if kind == "chat" else "prompt")
    if n is None:
        return min(DEFAULT_MAX_TOKENS, room) if kind == "completions" else room
    if n >= 1 and n > room:
        raise ApiError(400, f"the prompt is {n_prompt} tokens; with {name} {n} it does not fit "
                       f"the model's context of {context} tokens: shorten it or lower {name} "
                       f"to at most {room}", name)
    return n


def sampling_of(body: dict[str, Any], max_tokens: int) -> Sampling:
    """The request's sampling (OpenAI's defaults: temperature 1, no top-p, no top-k), its
    values checked by `Sampling` (400 naming the field)."""
    def get(name: str, default: Any) -> Any:
        return default if body.get(name) is None else body[name]
    try:
        return Sampling(max_new_tokens=max_tokens, temperature=get("temperature", 1.0),
                        top_k=get("top_k", 0) or None, top_p=get("top_p", None),
                        repetition_penalty=get("repetition_penalty", 1.0),
                        seed=get("seed", None))
    except SamplingError as e:
        name = "max_tokens" if e.field == "max_new_tokens" else e.field
        raise ApiError(400, e.message(name), name) from None


def stops_of(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > 4 or any(not s for s in stops):
        raise ApiError(400, "stop takes up to 4 non-empty strings", "stop")
    return stops


def gen_request(body: dict[str, Any], kind: str, tok: Tokenizer, context: int,
                served: str) -> GenRequest:
    """A checked request of `kind` ("completions" or "chat") for a model of `context`
    tokens served as `served` (ApiError for anything it cannot serve)."""
    check_fields(body, kind)
    check_model(body, served)
    ids = prompt_of(body, kind, tok)
    sampling = sampling_of(body, max_tokens_of(body, kind, len(ids), context))
    stop_ids = set() if body.get("ignore_eos") else {tok.eos_id}
    if kind == "chat":
        stop_ids.add(tok.hf.token_to_id(IM_END))
    return GenRequest(ids, sampling, stops_of(body), frozenset(stop_ids),
                      bool(body.get("stream")),
                      bool((body.get("stream_options") or {}).get("include_usage")),
                      bool(body.get("routing")))


# Responses. `tokens`: the extension's per-token records (id, text, experts, weights).

def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def response(kind: str, rid: str, model: str, text: str, finish: str | None,
             use: dict[str, int], tokens: list[dict] | None) -> dict[str, Any]:
    """A whole (non-streamed) completion or chat completion."""
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
    if kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    out = {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
           "created": int(time.time()), "model": model, "choices": [choice], "usage": use}
    if tokens is not None:
        out["slms"] = {"tokens": tokens}
    return out


def chunk(kind: str, rid: str, model: str, text: str | None, finish: str | None = None,
          tokens: list[dict] | None = None, first: bool = False) -> dict[str, Any]:
    """One streamed chunk: a text delta and/or the finish reason."""
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
    if kind == "chat":
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    out = {"id": rid, "object": "chat.completion.chunk" if kind == "chat"
           else "text_completion", "created": int(time.time()), "model": model,
           "choices": [choice]}
    if tokens:
        out["slms"] = {"tokens": tokens}
    return out


def usage_chunk(kind: str, rid: str, model: str, use: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk" if kind == "chat"
            else "text_completion", "created": int(time.time()), "model": model,
            "choices": [], "usage": use}
