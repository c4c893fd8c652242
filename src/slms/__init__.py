"""slms: train, run and analyse small GPT language models, dense and Mixture-of-Experts."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from slms.model import GPT
    from slms.tokenizer import Tokenizer


def load(path: str | Path, device: str = "cpu") -> tuple[GPT, Tokenizer]:
    """(model, tokenizer) from a run directory (its best/, else its latest checkpoint) or a
    checkpoint directory. The model is in eval mode."""
    from slms.train.checkpoint import load_checkpoint, resolve

    model, tokenizer, _ = load_checkpoint(resolve(path), device)
    return model, tokenizer
