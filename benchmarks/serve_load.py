"""`slms serve` under load: N concurrent streaming clients (1, 4, 16) against a model served by
the real command in its own process, side by side in one run.

For each model and client count: aggregate generated tokens/s (all completion tokens / wall
time), p50/p95 time to first token, and p50/p95 inter-token latency (per request: the time
from its first to its last token / (tokens - 1)); and the ratio of the aggregate rate to the
one-client rate. Requests are greedy with `ignore_eos`, so each generates exactly --max-tokens.

Models are randomly initialised in the shapes of configs/NAME.toml (or a checkpoint directory
is served as it is): speed does not depend on what the weights learned.

    python benchmarks/serve_load.py                      # tiny and seed-moe, 1/4/16 clients
    python benchmarks/serve_load.py --json > load.json   # machine-readable
    python benchmarks/serve_load.py --models runs/x --clients 1,8
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Once upon a time there was a little", "The dog ran to the park and",
           "Lily had a red ball. One day", "Tom and Sue went to the sea. They"]


def build_checkpoint(name: str, out: Path) -> Path:
    """A checkpoint directory: `name` itself when it is one, else a randomly initialised model
    in the shape of configs/NAME.toml with a tokenizer trained on the embedded corpus."""
    if (Path(name) / "config.json").is_file() or (Path(name) / "best").exists():
        return Path(name)
    from slms import corpus
    from slms.checkpoint import save_checkpoint
    from slms.commands.options import config_file
    from slms.config import load_config
    from slms.model import GPT
    from slms.tokenizer import train_tokenizer

    cfg = load_config(config_file(name)).model
    vocab = cfg.vocab_size or 2048
    tok = train_tokenizer(corpus.generate_stories(2000, seed=0), vocab_size=vocab)
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(cfg, vocab_size=tok.vocab_size))
    return save_checkpoint(out / Path(name).stem, model.eval(), tok)


def start_server(ckpt: Path, max_batch: int, threads: int | None
                 ) -> tuple[subprocess.Popen, str]:
    """`slms serve CKPT --port 0` in its own process; (process, base URL) once it answers."""
    extra = ["--threads", str(threads)] if threads else []
    proc = subprocess.Popen([sys.executable, "-m", "slms", "serve", str(ckpt), "--port", "0",
                             "--max-batch", str(max_batch), "--name", "bench", *extra],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    line = proc.stdout.readline()
    m = re.search(r"(http://[\w.]+:\d+)/v1", line)
    if not m:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    for _ in range(600):  # the first /health also waits for the scheduler to start
        try:
            health(m.group(1))
            return proc, m.group(1)
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not answer /health")


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        return json.loads(r.read())


async def stream_once(host: str, port: int, body: dict) -> tuple[float, float, int]:
    """One streamed completion over a raw HTTP/1.1 connection (no client library in the way):
    (seconds to the first token, seconds from first to last token, completion tokens)."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    data = json.dumps(body).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: "
                 b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
    status = (await reader.readline()).split()[1]
    if status != b"200":
        raise SystemExit(f"HTTP {status.decode()}: {await reader.read(500)!r}")
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    first = last = None
    tokens, buf = 0, b""
    while size := int((await reader.readline()).strip(), 16):  # chunked transfer encoding
        buf += (await reader.readexactly(size + 2))[:-2]
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            payload = event.removeprefix(b"data: ")
            if payload == b"[DONE]":
                continue
            msg = json.loads(payload)
            if msg.get("usage"):
                tokens = msg["usage"]["completion_tokens"]
            elif msg["choices"] and msg["choices"][0]["text"]:
                last = time.perf_counter()
                first = first or last
    await reader.readline()
    writer.close()
    return first - t0, last - first, tokens


async def load(url: str, clients: int, rounds: int, max_tokens: int) -> dict:
    """`clients` concurrent clients, each sending `rounds` requests one after another."""
    host, port = url.removeprefix("http://").split(":")
    results: list[tuple[float, float, int]] = []

    async def client(c: int) -> None:
        for r in range(rounds):
            body = {"prompt": PROMPTS[(c + r) % len(PROMPTS)] + " " * (c % 3),
                    "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "ignore_eos": True, "stream_options": {"include_usage": True}}
            results.append(await stream_once(host, int(port), body))

    before = health(url)
    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    after = health(url)
    ttft = [r[0] for r in results]
    itl = [r[1] / max(1, r[2] - 1) for r in results]
    steps = after["steps"] - before["steps"]
    return {"clients": clients, "requests": len(results),
            "tokens": sum(r[2] for r in results), "seconds": round(wall, 3),
            "tokens_per_s": round(sum(r[2] for r in results) / wall, 1),
            "ttft_ms_p50": _ms(_pct(ttft, 50)), "ttft_ms_p95": _ms(_pct(ttft, 95)),
            "itl_ms_p50": _ms(_pct(itl, 50)), "itl_ms_p95": _ms(_pct(itl, 95)),
            "mean_batch": round((after["rows"] - before["rows"]) / max(1, steps), 2)}


def _pct(xs: list[float], q: int) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


def _ms(x: float) -> float:
    return round(x * 1000, 1)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = re.search(r"Model name:\s*(.+)", out).group(1).strip()
        cpus = re.search(r"^CPU\(s\):\s*(\d+)", out, re.M).group(1)
        return f"{name}, {cpus} CPUs"
    except (OSError, AttributeError):
        return platform.processor() or "unknown CPU"


def run_model(name: str, tmp: Path, args: argparse.Namespace, threads: int | None
              ) -> list[dict]:
    ckpt = build_checkpoint(name, tmp)
    proc, url = start_server(ckpt, args.max_batch, threads)
    try:
        asyncio.run(load(url, 1, 1, 8))  # warm-up: first calls build kernels, fill caches
        rows = []
        for n in args.clients:
            row = {"model": name, "threads": threads or max(1, (os.cpu_count() or 2) - 1),
                   **asyncio.run(load(url, n, args.rounds, args.max_tokens))}
            rows.append(row)
            print(f"  {name}, {row['threads']} threads, {n} clients: {row['tokens_per_s']} "
                  "tokens/s", file=sys.stderr)
        base = rows[0]["tokens_per_s"]
        for row in rows:
            row["vs_one_client"] = round(row["tokens_per_s"] / base, 2)
        return rows
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def table(rows: list[dict]) -> str:
    head = ("| model | threads | clients | tokens/s | vs 1 client | mean batch | TTFT p50 / p95 "
            "(ms) | ITL p50 / p95 (ms) |\n|---|---|---|---|---|---|---|---|")
    lines = [f"| {r['model']} | {r['threads']} | {r['clients']} | {r['tokens_per_s']:,.1f} | "
             f"{r['vs_one_client']:.2f}x | {r['mean_batch']} | {r['ttft_ms_p50']} / "
             f"{r['ttft_ms_p95']} | {r['itl_ms_p50']} / {r['itl_ms_p95']} |" for r in rows]
    return "\n".join([head, *lines])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,seed-moe",
                   help="config presets (random weights in their shape) or checkpoint dirs")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--rounds", type=int, default=3, help="requests per client, one by one")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--threads", default="",
                   help="server CPU threads to compare, e.g. 1,2 (default: slms serve's)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for threads in [int(t) for t in args.threads.split(",") if t] or [None]:
                rows += run_model(name, Path(tmp), args, threads)
    meta = {"command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
            "cpu": cpu_model(), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "max_tokens": args.max_tokens,
            "rounds": args.rounds}
    if args.json:
        print(json.dumps({**meta, "results": rows}, indent=1))
    else:
        print(f"{meta['command']}  ({meta['cpu']}, torch {meta['torch']}, {meta['date']}; "
              f"{args.max_tokens} tokens per request, greedy, streamed)\n")
        print(table(rows))


if __name__ == "__main__":
    main()
