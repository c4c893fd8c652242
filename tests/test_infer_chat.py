"""`slms chat` driven through piped stdin: every command, bad input, EOF."""

import io
import subprocess
import sys

import pytest
import torch

from conftest import tiny_config
from slms.checkpoint import save_checkpoint
from slms.infer.chat import Chat, run_chat
from slms.infer.generate import Sampling
from slms.model import GPT


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    model = GPT(tiny_config(moe=True, block_size=64))
    return save_checkpoint(tmp_path_factory.mktemp("chat") / "ckpt", model, tokenizer)


SCRIPT = """:help
Once upon a time
:settings temperature=0.5 top_k=20 max_tokens=12 top_p=0.9 seed=3
:settings temperature=hot
:settings colour=blue
:examples
:benchmark
:analyze The dog
:nonsense

:quit
this line is never read
"""


@pytest.mark.slow
def test_chat_runs_every_command_through_piped_stdin(moe_ckpt):
    r = subprocess.run([sys.executable, "-m", "slms", "chat", str(moe_ckpt), "--seed", "1",
                        "--max-new-tokens", "10"], input=SCRIPT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert ":settings [key=value ...]" in out  # :help
    assert "Once upon a time" in out
    assert "max_new_tokens=12" in out and "temperature=0.5" in out and "top_k=20" in out
    assert "top_p=0.9" in out and "seed=3" in out
    assert "bad value for temperature: 'hot'" in out and "bad setting 'colour=blue'" in out
    assert out.count("--- ") == 3  # one story per example prompt
    assert "with KV cache:" in out and "without KV cache:" in out
    assert "L0" in out and "L1" in out and "layer 1: top-1 tokens per expert" in out
    assert "unknown command :nonsense" in out
    assert out.rstrip().endswith("bye") and "never read" not in out
    assert "Traceback" not in r.stderr


def test_chat_ends_cleanly_at_eof(tokenizer):
    torch.manual_seed(0)
    model = GPT(tiny_config(block_size=64)).eval()
    out = io.StringIO()
    s = Sampling(max_new_tokens=5, temperature=0)
    assert run_chat(model, tokenizer, s, stdin=io.StringIO("The cat\n:analyze\n"), out=out) == 0
    text = out.getvalue()
    assert "The cat" in text and "dense" in text and text.rstrip().endswith("bye")


def test_analyze_shows_experts_per_token_per_layer(tokenizer):
    torch.manual_seed(0)
    model = GPT(tiny_config(moe=True, block_size=64)).eval()
    out = io.StringIO()
    chat = Chat(model, tokenizer, Sampling(max_new_tokens=6, temperature=0), out)
    chat.analyze("The dog")
    lines = out.getvalue().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("token"))
    rows = lines[header + 1:header + 1 + 3]
    # each token row: the token, then "e1,e2" for each of the 2 MoE layers
    for row in rows:
        cells = row[17:].split()
        assert len(cells) == 2 and all(len(c.split(",")) == 2 for c in cells)
