"""The server's request bodies fuzzed with hypothesis (#28 item 2a): arbitrary JSON values for
every field of /v1/completions and /v1/chat/completions (types, sizes, unicode, nesting,
missing and extra keys), and bodies that are not JSON objects at all. Every answer is a 200
that parses as the API's response (or stream) or a 4xx with OpenAI's error object of one line;
never a 5xx; and a good request after each batch still succeeds.

The app runs in-process (starlette's TestClient) on a tiny model with a short context, so a
valid fuzzed request generates at most a few dozen tokens. Bounded for CI: 150 examples per
endpoint with a fixed seed (derandomize); SLMS_FUZZ_EXAMPLES=5000 runs more.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from conftest import tiny_config  # noqa: E402
from slms.model import GPT  # noqa: E402
from slms.serve.app import create_app  # noqa: E402
from slms.serve.protocol import FIELDS, ROLES, TYPES  # noqa: E402

CONTEXT = 64
EXAMPLES = int(os.environ.get("SLMS_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unknown|>"]

text = st.text(max_size=40) | st.sampled_from(["", "Once upon a time", *SPECIALS]) | \
    st.lists(st.sampled_from(["a", " ", "\n", "\ud800", "\U0001f600", *SPECIALS]),
             max_size=8).map("".join)  # lone surrogates: JSON can say "\ud800"
leaf = (st.none() | st.booleans() | st.integers() | st.integers(-2**70, 2**70)
        | st.floats() | text)
json_value = st.recursive(leaf, lambda kids: st.lists(kids, max_size=4)
                          | st.dictionaries(text, kids, max_size=4), max_leaves=10)
small_int = st.integers(-3, CONTEXT + 3)
clean = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)  # no lone surrogate
good_message = st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": clean | text})
message = good_message | st.fixed_dictionaries(
    {}, optional={"role": st.sampled_from([*ROLES, "robot"]) | json_value,
                  "content": text | st.lists(st.fixed_dictionaries(
                      {"type": st.sampled_from(["text", "image_url"]), "text": text}), max_size=3)
                  | json_value,
                  "name": json_value})
# per field: values it accepts (so that most bodies reach the model), and values at or past its
# edges; each field also gets arbitrary JSON
VALID = {
    "model": st.just("tiny"),
    "prompt": clean | st.lists(clean, min_size=1, max_size=1)
    | st.lists(st.integers(0, 299), max_size=10),
    "messages": st.lists(good_message, min_size=1, max_size=3),
    "max_tokens": st.integers(1, 6), "max_completion_tokens": st.integers(1, 6),
    "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(0, 400),
    "repetition_penalty": st.floats(0.5, 2), "seed": st.integers(-2**63, 2**64 - 1),
    "stop": clean.filter(bool) | st.lists(clean.filter(bool), max_size=4),
    "n": st.just(1), "best_of": st.just(1), "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "logprobs": st.sampled_from([False, 0]), "top_logprobs": st.just(0),
    "echo": st.just(False), "logit_bias": st.just({}), "presence_penalty": st.just(0),
    "frequency_penalty": st.just(0.0), "user": clean, "ignore_eos": st.booleans(),
    "routing": st.booleans(),
}
EDGE = {
    "model": st.sampled_from(["gpt-4", "", "tiny\ud800"]),
    "prompt": text | st.lists(text, max_size=2) | st.lists(st.integers(-2, 400), max_size=30),
    "messages": st.lists(message, max_size=3),
    "max_tokens": small_int, "max_completion_tokens": small_int,
    "temperature": st.floats(-1, 3) | st.sampled_from([1e-300, 1e308, float("nan"),
                                                      float("inf")]),
    "top_p": st.floats(-0.5, 1.5) | st.just(1e-300), "top_k": st.integers(-2, 2**70),
    "repetition_penalty": st.floats(-1, 3) | st.sampled_from([1e-300, 5e-324, 1e300]),
    "seed": st.integers(-2**64, 2**65),
    "stop": text | st.lists(text, max_size=6),
    "n": st.integers(0, 2), "best_of": st.integers(0, 2),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries(
        {}, optional={"include_usage": st.booleans() | json_value}),
    "logprobs": st.booleans() | st.integers(0, 2), "top_logprobs": st.integers(0, 2),
    "echo": st.booleans(), "logit_bias": json_value,
    "presence_penalty": st.floats(), "frequency_penalty": st.floats(),
    "user": text, "ignore_eos": st.booleans(), "routing": st.booleans(),
}
assert set(VALID) == set(EDGE) == set(TYPES)


def bodies(kind: str) -> st.SearchStrategy[bytes]:
    """A body of accepted values (most are served) with a few fields (known or not) set to
    edge values or arbitrary JSON and a few removed; or any JSON value; or bytes that are
    not JSON."""
    fields = sorted(FIELDS[kind])
    main = "messages" if kind == "chat" else "prompt"
    plausible = st.fixed_dictionaries(
        {main: VALID[main]}, optional={f: VALID[f] for f in fields if f != main})
    edge = st.sampled_from(fields).flatmap(
        lambda f: st.tuples(st.just(f), EDGE[f] | json_value))
    unknown = st.tuples(text, json_value)
    wild = st.lists(edge | unknown, max_size=2).map(dict)
    drop = st.sets(st.sampled_from([f for f in fields if f != main]), min_size=1, max_size=2)

    def mix(parts: tuple[dict, dict, set]) -> dict:
        body = parts[0] | parts[1]
        return {k: v for k, v in body.items() if k not in parts[2]}

    removed = st.just(set()) | drop | st.just({main})
    objects = st.tuples(plausible, st.just({}) | wild, removed).map(mix)
    other = json_value.map(lambda b: json.dumps(b).encode()) | st.binary(max_size=64) \
        | st.integers(1, 200_000).map(lambda n: b"[" * n) \
        | st.integers(1, 5000).map(lambda n: b'{"seed": ' + b"9" * n + b"}")
    as_json = objects.map(lambda b: json.dumps(b).encode())
    return st.one_of(as_json, as_json, as_json, other)  # objects 3 in 4


@pytest.fixture(scope="module")
def client(tokenizer):
    torch.manual_seed(0)
    model = GPT(tiny_config(moe=True, block_size=CONTEXT)).eval()
    with TestClient(create_app(model, tokenizer, "tiny"), raise_server_exceptions=False) as c:
        yield c


def check_answer(kind: str, status: int, headers, payload: bytes) -> None:
    assert status == 200 or 400 <= status < 500, (status, payload[:300])
    if status != 200:
        err = json.loads(payload)["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert isinstance(err["message"], str) and err["message"] and "\n" not in err["message"]
        assert isinstance(err["type"], str)
        return
    if headers["content-type"].startswith("text/event-stream"):
        events = [line.removeprefix("data: ") for line in payload.decode().split("\n\n") if line]
        assert events[-1] == "[DONE]", events[-3:]
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks and all("error" not in c for c in chunks)
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finishes[-1] in ("stop", "length")
        return
    reply = json.loads(payload)
    choice = reply["choices"][0]
    assert reply["object"] == ("chat.completion" if kind == "chat" else "text_completion")
    assert isinstance(choice["message"]["content"] if kind == "chat" else choice["text"], str)
    assert choice["finish_reason"] in ("stop", "length")
    assert 1 <= reply["usage"]["completion_tokens"] < CONTEXT


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_fuzzed_bodies_get_200_or_a_4xx_error_object_never_a_5xx(client, kind):
    @FUZZ
    @given(body=bodies(kind))
    def one(body: bytes) -> None:
        r = client.post(PATHS[kind], content=body, headers={"content-type": "application/json"})
        check_answer(kind, r.status_code, r.headers, r.content)

    one()
    good = ({"prompt": "Once upon a time", "max_tokens": 4} if kind == "completions" else
            {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    r = client.post(PATHS[kind], json=good)
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] >= 1


def test_a_deeply_nested_body_is_a_400(client):
    r = client.post("/v1/completions", content=b"[" * 100_000)
    assert r.status_code == 400
    assert "nested too deeply" in r.json()["error"]["message"]
