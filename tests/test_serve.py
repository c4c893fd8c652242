"""`slms serve` over HTTP: the official openai client against a live server on a free local
port (completion, chat, streaming, errors), 16 concurrent clients, every bad input answered
with a 4xx while the server keeps serving, the API key, a client that goes away, the CLI."""

import json
import os
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import slms.serve.scheduler as scheduler_module  # noqa: E402
from conftest import tiny_config  # noqa: E402
from slms.checkpoint import save_checkpoint  # noqa: E402
from slms.cli import main  # noqa: E402
from slms.infer.generate import Sampling, generate_text  # noqa: E402
from slms.model import GPT  # noqa: E402
from slms.serve.app import create_app, running  # noqa: E402

CONTEXT = 128


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(tiny_config(moe=True, block_size=CONTEXT)).eval()


@pytest.fixture(scope="module")
def url(model, tokenizer):
    with running(create_app(model, tokenizer, "tiny")) as u:
        yield u


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def post(url: str, body: bytes | dict, path: str = "/v1/completions",
         headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_openai_client_completion_chat_and_streaming(client, model, tokenizer):
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12,
                                  temperature=0)
    want = generate_text(model, tokenizer, "Once upon a time",
                         Sampling(max_new_tokens=12, temperature=0))
    assert r.choices[0].text == want and r.object == "text_completion"
    n_prompt = len(tokenizer.encode_prompt("Once upon a time"))
    assert r.usage.prompt_tokens == n_prompt and r.usage.completion_tokens <= 12
    stream = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0]. \
        finish_reason
    messages = [{"role": "system", "content": "Be kind."},
                {"role": "user", "content": "A cat."}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                          temperature=0, seed=1)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens > 0
    deltas = list(client.chat.completions.create(model="tiny", messages=messages,
                                                 max_tokens=10, temperature=0, stream=True))
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == \
        chat.choices[0].message.content
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_routing_rides_along_as_an_extension(client, model):
    stream = client.completions.create(model="tiny", prompt="The dog", max_tokens=6,
                                       temperature=0, stream=True,
                                       extra_body={"routing": True, "ignore_eos": True})
    records = [t for c in stream for t in (c.model_extra.get("slms") or {}).get("tokens", [])]
    assert len(records) == 6
    n_moe, top_k = len(model.moe_layers()), model.cfg.moe.top_k
    for rec in records[:-1]:
        assert len(rec["experts"]) == n_moe and all(len(e) == top_k for e in rec["experts"])


def test_16_concurrent_clients_each_get_what_they_get_alone(client):
    def ask(i: int) -> str:
        kw = dict(temperature=0) if i % 2 else dict(temperature=0.9, seed=i)
        return client.completions.create(model="tiny", prompt=f"Story {i}: once",
                                         max_tokens=8 + i, **kw).choices[0].text

    alone = [ask(i) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, range(16)))
    assert together == alone


BAD = [  # (body or raw bytes, path, status, words in the message)
    (b"{not json", "/v1/completions", 400, "not valid JSON"),
    (b"[1, 2]", "/v1/completions", 400, "JSON object"),
    ({"prompt": "hi", "colour": "red"}, "/v1/completions", 422, "unknown field 'colour'"),
    ({"prompt": "hi", "max_tokens": "ten"}, "/v1/completions", 422, "max_tokens must be"),
    ({"prompt": 7}, "/v1/completions", 422, "prompt must be"),
    ({"prompt": "once " * 300}, "/v1/completions", 400, "does not fit the model's context"),
    ({"prompt": "hi", "max_tokens": CONTEXT}, "/v1/completions", 400, "beyond the model's"),
    ({"prompt": "hi", "max_tokens": 0}, "/v1/completions", 400, "max_tokens must be"),
    ({"prompt": "hi", "temperature": -1}, "/v1/completions", 400, "temperature must be"),
    ({"prompt": "hi", "top_p": 5}, "/v1/completions", 400, "top_p must be"),
    ({"prompt": "hi", "model": "gpt-4"}, "/v1/completions", 404, "model 'gpt-4' not found"),
    ({"prompt": "hi", "n": 3}, "/v1/completions", 400, "n must be 1"),
    ({"prompt": [1, 99999]}, "/v1/completions", 400, "outside the vocabulary"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "/v1/chat/completions", 400, "role"),
    ({"messages": "hello"}, "/v1/chat/completions", 422, "messages must be"),
    ({}, "/v1/chat/completions", 400, "messages is required"),
    ({"prompt": "hi"}, "/v1/nothing", 404, "no such endpoint"),
]


def test_every_bad_input_gets_a_4xx_and_the_server_keeps_serving(url, client):
    for body, path, status, words in BAD:
        got, reply = post(url, body, path)
        err = reply["error"]
        assert (got, words in err["message"]) == (status, True), (body, reply)
        assert "\n" not in err["message"] and err["type"]
    with pytest.raises(openai.BadRequestError, match="temperature must be"):
        client.completions.create(model="tiny", prompt="x", temperature=-0.5)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user",
                                                                 "content": "x"}])
    assert post(url, {"prompt": "hi", "max_tokens": 3})[0] == 200


def test_a_full_queue_answers_503(url, monkeypatch):
    def busy(*_a, **_k):
        raise scheduler_module.Busy("the server is busy: 64 requests are waiting")

    monkeypatch.setattr(scheduler_module.Scheduler, "submit", busy)
    status, reply = post(url, {"prompt": "hi"})
    assert status == 503 and "busy" in reply["error"]["message"]


def test_a_client_that_leaves_mid_stream_disturbs_no_one(url, client):
    want = client.completions.create(model="tiny", prompt="Tom", max_tokens=20,
                                     temperature=0).choices[0].text
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "Sam", "max_tokens": 50, "stream": True,
                       "ignore_eos": True}).encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        got = b""
        while b"data: " not in got:  # streaming has begun; then hang up
            got += s.recv(4096)
    assert client.completions.create(model="tiny", prompt="Tom", max_tokens=20,
                                     temperature=0).choices[0].text == want
    with urllib.request.urlopen(url + "/health") as r:
        assert json.loads(r.read())["status"] == "ok"


def test_api_key(model, tokenizer):
    with running(create_app(model, tokenizer, "tiny", api_key="s3cret")) as u:
        status, reply = post(u, {"prompt": "hi"})
        assert status == 401 and "API key" in reply["error"]["message"]
        c = openai.OpenAI(base_url=f"{u}/v1", api_key="s3cret", max_retries=0)
        assert c.completions.create(model="tiny", prompt="hi", max_tokens=2).choices
        with urllib.request.urlopen(u + "/") as r:  # the page loads; its calls need the key
            assert b"slms playground" in r.read()


def test_cli_serves_a_checkpoint(tmp_path, model, tokenizer, monkeypatch, capsys):
    import uvicorn

    ckpt = save_checkpoint(tmp_path / "my-model", model, tokenizer)
    served, threads = {}, []
    monkeypatch.setattr(uvicorn.Server, "run",
                        lambda self, sockets: served.update(app=self.config.app))
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    assert main(["serve", str(ckpt), "--host", "0.0.0.0", "--port", "0"]) == 0
    assert threads == [max(1, (os.cpu_count() or 2) - 1)]  # a core left for the HTTP side
    out, err = capsys.readouterr()
    assert "slms serve: my-model at http://" in out and "/v1" in out
    assert "warning: listening on 0.0.0.0" in err and "--api-key" in err
    assert served["app"] is not None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(ckpt), "--port", str(port)]) == 2
    assert f"slms: error: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["serve", str(ckpt), "--port", "70000"]) == 2
    assert "--port must be in 0 .. 65535" in capsys.readouterr().err


def test_serve_sets_its_threads_before_the_model_loads(monkeypatch):
    """precision=auto measures bf16 while the model loads: with the threads that will serve."""
    from slms.commands import options

    seen = []

    def load_model(args):
        seen.append(torch.get_num_threads())
        raise ValueError("stop here")
    monkeypatch.setattr(options, "load_model", load_model)
    threads = torch.get_num_threads()
    try:
        assert main(["serve", "no/such/ckpt", "--threads", "1"]) == 2
        assert torch.get_num_threads() == threads  # a model that fails changes nothing
    finally:
        torch.set_num_threads(threads)
    assert seen == [1]
