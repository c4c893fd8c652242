"""Shared fixtures: a small tokenizer and prepared data built once per session from the
embedded corpus, and tiny model configs that build in milliseconds."""

from __future__ import annotations

import pytest
import torch

from slms import corpus
from slms.config import ModelConfig, MoEConfig
from slms.data.prepare import prepare
from slms.tokenizer import Tokenizer, train_tokenizer

torch.set_num_threads(2)


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


def tiny_config(moe: bool | MoEConfig = False, **kw) -> ModelConfig:
    moe_cfg = moe if isinstance(moe, MoEConfig) else (
        MoEConfig(n_experts=4, top_k=2, expert_hidden=64) if moe else None)
    base = dict(vocab_size=300, block_size=32, n_layer=2, n_head=4, n_embd=32, moe=moe_cfg)
    return ModelConfig(**(base | kw))
