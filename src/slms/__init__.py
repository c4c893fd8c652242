"""slms: train, run and analyse small GPT language models, dense and Mixture-of-Experts.

`import slms` loads none of the dependencies (torch, transformers) and changes no import
machinery; the Hugging Face classes are registered by `import slms.hf` (`slms.hf.register`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slms.model import GPT
    from slms.tokenizer import Tokenizer


def __getattr__(name: str) -> str:
    # `slms.__version__` is read from the package metadata on first use: importlib.metadata
    # costs tens of milliseconds, which `import slms` need not pay
    if name == "__version__":
        from slms.version import slms_version

        return slms_version()
    raise AttributeError(f"module 'slms' has no attribute {name!r}")


def load(path: str | Path, device: str = "cpu") -> tuple[GPT, Tokenizer]:
    """(model, tokenizer) from a run directory (its best/, else its latest checkpoint) or a
    checkpoint directory. The model is in eval mode."""
    from slms.checkpoint import load_checkpoint
    from slms.rundir import resolve

    model, tokenizer, _ = load_checkpoint(resolve(path), device)
    return model, tokenizer
