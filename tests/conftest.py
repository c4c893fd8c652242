"""Shared fixtures: a small tokenizer and prepared data built once per session from the
embedded corpus, and tiny model configs that build in milliseconds."""

from __future__ import annotations

import os

import pytest
import torch

from slms import corpus
from slms.config import ModelConfig, MoEConfig
from slms.data.prepare import prepare
from slms.tokenizer import Tokenizer, train_tokenizer

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def machine_cache(tmp_path_factory):
    """Measured machine facts (slms.machine: bf16 speed, kernel choices) go to a cache of this
    session's, not the user's ~/.cache/slms; subprocesses inherit it."""
    old = os.environ.get("SLMS_CACHE_DIR")
    os.environ["SLMS_CACHE_DIR"] = str(tmp_path_factory.mktemp("slms-cache"))
    yield
    if old is None:
        os.environ.pop("SLMS_CACHE_DIR", None)
    else:
        os.environ["SLMS_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def stories() -> list[str]:
    return corpus.generate_stories(300, seed=7)


@pytest.fixture(scope="session")
def tokenizer(stories) -> Tokenizer:
    return train_tokenizer(stories, vocab_size=300)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, stories, tokenizer):
    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare({"train": stories[20:], "val": stories[:20]}, tokenizer, out, source="test")
    return out


@pytest.fixture
def run_dir(tmp_path, data_dir, tokenizer):
    """A run directory with one checkpoint of configs/tiny.toml, as `slms train` writes it
    (without training; its trainer state is never read by the tests that use it)."""
    from slms.checkpoint import save_checkpoint
    from slms.config import load_config
    from slms.model import GPT
    from slms.rundir import RunDir
    from train_helpers import TINY

    cfg = load_config("configs/tiny.toml", [*TINY, f"data.path={data_dir}",
                                            "model.vocab_size=300"])
    run = tmp_path / "run"
    torch.manual_seed(0)
    save_checkpoint(run / "checkpoints" / "step-3", GPT(cfg.model), tokenizer,
                    {"step": 3, "run": cfg.to_dict()}, {"step": 3})
    RunDir(run).write_config(cfg.to_dict(), data_dir)
    RunDir(run).point_latest(3)
    return run


def tiny_config(moe: bool | MoEConfig = False, **kw) -> ModelConfig:
    moe_cfg = moe if isinstance(moe, MoEConfig) else (
        MoEConfig(n_experts=4, top_k=2, expert_hidden=64) if moe else None)
    base = dict(vocab_size=300, block_size=32, n_layer=2, n_head=4, n_embd=32, moe=moe_cfg)
    return ModelConfig(**(base | kw))


def assert_cached_decoding_equals_full_forward(model, seq: torch.Tensor, prefix: int) -> None:
    """The logits of a prompt of `prefix` tokens then one token per cached step equal those of
    one full forward, and cached greedy generation equals uncached."""
    B, T = seq.shape
    with torch.no_grad():
        whole = model(seq).logits
        caches = model.new_caches(B, T)
        steps = [model(seq[:, :prefix], caches=caches).logits]
        steps += [model(seq[:, t:t + 1], caches=caches).logits for t in range(prefix, T)]
    torch.testing.assert_close(torch.cat(steps, 1), whole, rtol=1e-4, atol=1e-5)
    prompt = seq[:, :prefix]
    assert torch.equal(model.generate(prompt, 8, temperature=0),
                       model.generate(prompt, 8, temperature=0, use_cache=False))


def assert_rows_decode_as_each_alone(model, vocab: int, max_len: int = 24) -> None:
    """The server's path (`slms.serve.decode`: a prefill per prompt, copied into a row of the
    batch's caches, then `GPT.forward` on one token per row, each row at its own position)
    gives each row the logits of that row's full forward, also after a row moved; documents
    (which begin at <|endoftext|>, id 0) start inside a prompt and while decoding."""
    from slms.serve.decode import SlotCache, decode_step, prefill

    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (5, 11, 2)]
    seqs[1][6] = 0  # a second document in a prompt
    nxt = torch.randint(1, vocab, (3, 4), generator=g)
    nxt[0, 1] = 0  # one begins while decoding
    cache = SlotCache(model, 4, max_len)
    with torch.no_grad(), model.paused_stats():
        for row, s in enumerate(seqs):
            logits, caches = prefill(model, s)
            torch.testing.assert_close(logits, model(torch.tensor([s])).logits[0, -1])
            cache.load(row, caches)
        steps = [decode_step(model, cache, nxt[:, t]) for t in range(4)]
        cache.move(2, 0)  # a row moved into a gap decodes on as before
        moved = decode_step(model, cache, torch.tensor([7]))
        for row, s in enumerate(seqs):
            ref = model(torch.tensor([s + nxt[row].tolist()])).logits[0, len(s):]
            got = torch.stack([step[row] for step in steps])
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
        ref = model(torch.tensor([seqs[2] + nxt[2].tolist() + [7]])).logits[0, -1]
    torch.testing.assert_close(moved[0], ref, rtol=1e-4, atol=1e-5)
    assert cache.lengths[:3] == [len(seqs[2]) + 5, 15, 6]
