"""A soak of `slms serve` (#28 item 4): thousands of requests from concurrent clients against
the real command in its own process, on loopback, bounded in count and in time.

The mix, drawn per request from a seeded generator: streamed completions, whole (non-streamed)
completions, chat completions of both kinds, clients that hang up mid-stream, and clients that
read slowly. Each request is greedy with `ignore_eos` and its own prompt length and max_tokens,
so its answer must say exactly those counts in its usage: an answer given to the wrong request
is caught, as is one given twice (ids are counted) or never (lost). Reported: the server's
resident memory (RSS) after warm-up and at the end, latency percentiles of the answered
requests (send to last byte), errors by status, lost and duplicated answers, and the server's
rows still running or waiting once all clients are gone (a dropped stream must free its row).

    python benchmarks/serve_soak.py                          # 3000 requests, 32 clients
    python benchmarks/serve_soak.py --json > soak.json       # machine-readable
    python benchmarks/serve_soak.py --requests 200 --max-seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import build_checkpoint, cpu_model, health, start_server  # noqa: E402

WORDS = "once upon a time there was a little dog who liked to run in the park with Tom".split()
KINDS = {"stream": 0.35, "whole": 0.25, "chat": 0.15, "chat_stream": 0.1, "hangup": 0.1,
         "slow": 0.05}


@dataclass
class Tally:
    """What the clients saw."""

    sent: int = 0
    answered: int = 0
    hung_up: int = 0  # on purpose, mid-stream
    errors: Counter = field(default_factory=Counter)  # status (or what failed) -> count
    wrong: list[str] = field(default_factory=list)  # answers that do not fit their request
    ids: Counter = field(default_factory=Counter)
    latency: list[float] = field(default_factory=list)  # seconds, answered requests
    kinds: Counter = field(default_factory=Counter)

    def lost(self) -> int:
        return self.sent - self.answered - self.hung_up - sum(self.errors.values())

    def duplicated(self) -> int:
        return sum(n - 1 for n in self.ids.values() if n > 1)


def pct(xs: list[float], q: int) -> float:
    if not xs:
        return float("nan")
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


def draw(rng: random.Random) -> str:
    return rng.choices(list(KINDS), weights=list(KINDS.values()))[0]


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status = int((await reader.readline()).split()[1])
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        k, _, v = line.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers


async def _chunks(reader: asyncio.StreamReader, slow: bool):
    """The body of a chunked response, chunk by chunk (a slow reader pauses between them)."""
    while size := int((await reader.readline()).strip(), 16):
        yield (await reader.readexactly(size + 2))[:-2]
        if slow:
            await asyncio.sleep(0.02)
    await reader.readline()


async def one(host: str, port: int, kind: str, rng: random.Random, tally: Tally,
              n_prompt: Callable[[str, bool], int], longest: int) -> None:
    """One request on its own connection; its answer checked against what was asked."""
    chat = kind.startswith("chat")
    stream = kind not in ("whole", "chat")
    text = " ".join(rng.choices(WORDS, k=rng.randint(1, 12)))
    max_tokens = rng.randint(1, longest)
    body = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    if stream:
        body["stream_options"] = {"include_usage": True}
    want = (n_prompt(text, chat), max_tokens)
    data = json.dumps(body).encode()
    path = b"/v1/chat/completions" if chat else b"/v1/completions"
    tally.sent += 1
    tally.kinds[kind] += 1
    t0 = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as e:
        tally.errors[f"connect: {type(e).__name__}"] += 1
        return
    try:
        writer.write(b"POST %s HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
                     % (path, len(data), data))
        status, headers = await _read_head(reader)
        if status != 200:
            await reader.read()
            tally.errors[str(status)] += 1
            return
        if not stream:
            reply = json.loads(await reader.readexactly(int(headers["content-length"])))
            _check(tally, reply["id"], reply["usage"], want, reply["choices"][0]["finish_reason"],
                   1)
            tally.latency.append(time.perf_counter() - t0)
            return
        ids, usage, finishes, done, buf, finish = set(), None, 0, 0, b"", None
        async for piece in _chunks(reader, slow=kind == "slow"):
            buf += piece
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                payload = event.removeprefix(b"data: ")
                if payload == b"[DONE]":
                    done += 1
                    continue
                msg = json.loads(payload)
                if "error" in msg:
                    tally.errors["stream error"] += 1
                    return
                ids.add(msg["id"])
                usage = msg.get("usage") or usage
                for c in msg["choices"]:
                    if c["finish_reason"] is not None:
                        finishes, finish = finishes + 1, c["finish_reason"]
            if kind == "hangup":  # the first chunk is in: hang up
                tally.hung_up += 1
                return
        if len(ids) != 1 or usage is None:
            tally.wrong.append(f"stream with ids {sorted(ids)} and usage {usage}")
            return
        _check(tally, ids.pop(), usage, want, finish, finishes * done)
        tally.latency.append(time.perf_counter() - t0)
    except (OSError, asyncio.IncompleteReadError, ValueError, KeyError) as e:
        tally.errors[f"client: {type(e).__name__}"] += 1
    finally:
        writer.close()


def _check(tally: Tally, rid: str, usage: dict, want: tuple[int, int], finish: str | None,
           once: int) -> None:
    """An answer fits its request: its prompt's token count, and max_tokens generated (a chat
    may stop sooner, at <|im_end|>, which ignore_eos does not ignore); one finish, one end."""
    tally.ids[rid] += 1
    got = (usage["prompt_tokens"], usage["completion_tokens"])
    fits = got == want if finish == "length" else (
        finish == "stop" and got[0] == want[0] and got[1] <= want[1])
    if not fits or once != 1:
        tally.wrong.append(f"{rid}: usage {got} ({finish}), asked {want}, finish x [DONE] = "
                           f"{once}")
        return
    tally.answered += 1


async def soak(url: str, requests: int, clients: int, max_seconds: float, seed: int,
               n_prompt: Callable[[str, bool], int], longest: int = 24) -> Tally:
    """`clients` concurrent clients sending requests one after another until `requests` are
    sent or `max_seconds` have passed; each asks for 1 to `longest` tokens."""
    host, port = url.removeprefix("http://").split(":")
    tally = Tally()
    rng = random.Random(seed)
    deadline = time.monotonic() + max_seconds
    left = [requests]

    async def client() -> None:
        while left[0] > 0 and time.monotonic() < deadline:
            left[0] -= 1
            await one(host, int(port), draw(rng), rng, tally, n_prompt, longest)

    await asyncio.gather(*(client() for _ in range(clients)))
    return tally


def rss_mib(pid: int) -> float:
    """The resident memory of process `pid` (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def settle(url: str, seconds: float = 10.0) -> dict:
    """/health once every row has left (hung-up streams leave at the scheduler's next step)."""
    end = time.monotonic() + seconds
    while True:
        h = health(url)
        if (h["running"] == 0 and h["waiting"] == 0) or time.monotonic() > end:
            return h
        time.sleep(0.05)


def prompt_counter(tok) -> Callable[[str, bool], int]:
    """The prompt tokens the server counts for a text (as a completion or one user message)."""
    from slms.serve.protocol import render_chat

    def n(text: str, chat: bool) -> int:
        rendered = render_chat([{"role": "user", "content": text}]) if chat else text
        return len(tok.encode_prompt(rendered))
    return n


def report(tally: Tally, rss_warm: float, rss_end: float, seconds: float, after: dict,
           clients: int) -> dict:
    lat = tally.latency
    return {"requests": tally.sent, "clients": clients, "seconds": round(seconds, 1),
            "answered": tally.answered, "hung_up": tally.hung_up,
            "errors": dict(tally.errors), "lost": tally.lost(),
            "duplicated": tally.duplicated(), "wrong": len(tally.wrong),
            "wrong_examples": tally.wrong[:3], "kinds": dict(tally.kinds),
            "rss_mib_warm": round(rss_warm, 1), "rss_mib_end": round(rss_end, 1),
            "rss_growth_pct": round(100 * (rss_end - rss_warm) / rss_warm, 1),
            "latency_ms_p50": round(1000 * pct(lat, 50), 1),
            "latency_ms_p95": round(1000 * pct(lat, 95), 1),
            "latency_ms_p99": round(1000 * pct(lat, 99), 1),
            "rows_left": after["running"] + after["waiting"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny",
                   help="a config preset (random weights in its shape) or a checkpoint dir")
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--warmup", type=int, default=200, help="requests before the first RSS")
    p.add_argument("--max-seconds", type=float, default=170, help="stop sending after this")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="server CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON instead of a summary")
    args = p.parse_args()
    from slms.checkpoint import load_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_checkpoint(args.model, Path(tmp))
        n_prompt = prompt_counter(load_checkpoint(ckpt)[1])
        proc, url = start_server(ckpt, args.max_batch, args.threads)
        try:
            t0 = time.monotonic()
            warm = asyncio.run(soak(url, args.warmup, args.clients, args.max_seconds / 4,
                                    args.seed + 1, n_prompt))  # at most a quarter of the time
            settle(url)
            rss_warm = rss_mib(proc.pid)
            t1 = time.monotonic()
            budget = max(1.0, args.max_seconds - (t1 - t0))
            tally = asyncio.run(soak(url, args.requests, args.clients, budget, args.seed,
                                     n_prompt))
            seconds = time.monotonic() - t1
            after = settle(url)
            out = report(tally, rss_warm, rss_mib(proc.pid), seconds, after, args.clients)
            out["warmup"] = {"requests": warm.sent, "answered": warm.answered,
                             "lost": warm.lost(), "wrong": len(warm.wrong)}
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    out = {"command": "python benchmarks/serve_soak.py " + " ".join(sys.argv[1:]),
           "cpu": cpu_model(), "date": datetime.date.today().isoformat(),
           "model": args.model, **out}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"{out['command']}  ({out['cpu']}, {out['date']})")
        print(f"{out['requests']} requests from {out['clients']} clients in {out['seconds']} s: "
              f"{out['answered']} answered, {out['hung_up']} hung up on purpose, errors "
              f"{out['errors'] or 0}, lost {out['lost']}, duplicated {out['duplicated']}, "
              f"wrong {out['wrong']}, rows left {out['rows_left']}")
        print(f"RSS {out['rss_mib_warm']} MiB after warm-up, {out['rss_mib_end']} MiB at the "
              f"end ({out['rss_growth_pct']:+}%); latency p50/p95/p99 "
              f"{out['latency_ms_p50']}/{out['latency_ms_p95']}/{out['latency_ms_p99']} ms")
    bad = out["lost"] or out["duplicated"] or out["wrong"] or out["rows_left"] or out["errors"]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
