"""The short soak of `slms serve` (benchmarks/serve_soak.py, #28 item 4): a few dozen requests
from concurrent clients, streamed and whole, completions and chat, some hanging up mid-stream
and some reading slowly: no 5xx or other error, every request answered once and with its own
counts or hung up on purpose, no row left behind, memory within a loose bound of its level
after warm-up. The full soak's figures are in docs/benchmarks.md."""

import asyncio
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("uvicorn")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import serve_soak  # noqa: E402
from conftest import tiny_config  # noqa: E402
from slms.model import GPT  # noqa: E402
from slms.serve.app import create_app, running  # noqa: E402


def test_a_short_soak_loses_nothing_answers_once_and_frees_every_row(tokenizer):
    torch.manual_seed(0)
    model = GPT(tiny_config(block_size=64)).eval()
    count = serve_soak.prompt_counter(tokenizer)
    with running(create_app(model, tokenizer, "tiny", max_batch=8)) as url:
        warm = asyncio.run(serve_soak.soak(url, 16, 8, 120, 1, count, longest=6))
        serve_soak.settle(url)
        rss_warm = serve_soak.rss_mib(os.getpid())
        tally = asyncio.run(serve_soak.soak(url, 60, 12, 120, 0, count, longest=6))
        after = serve_soak.settle(url)
        out = serve_soak.report(tally, rss_warm, serve_soak.rss_mib(os.getpid()), 1.0, after, 12)
    assert warm.answered + warm.hung_up == warm.sent == 16
    assert out["requests"] == 60 and out["errors"] == {}, out
    assert (out["lost"], out["duplicated"], out["wrong"], out["rows_left"]) == (0, 0, 0, 0), out
    assert out["answered"] + out["hung_up"] == 60 and out["answered"] > 30
    assert set(out["kinds"]) >= {"stream", "whole", "chat", "hangup"}
    assert out["rss_mib_end"] < 1.25 * out["rss_mib_warm"] + 64, out
