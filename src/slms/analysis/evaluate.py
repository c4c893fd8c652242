"""Evaluation over a whole split: loss in nats per token, perplexity, bits per byte."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from slms.data.loader import PackedData, eval_windows
from slms.model import GPT, IGNORE_INDEX


@torch.no_grad()
def evaluate_tokens(model: GPT, tokens: np.ndarray, batch_size: int, block_size: int,
                    device: torch.device, autocast: AbstractContextManager | None = None
                    ) -> tuple[float, int]:
    """(summed nats, number of targets) over every target of a token stream, in order."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for x, y in eval_windows(tokens, batch_size, block_size):
        x, y = x.to(device), y.to(device)
        with autocast or nullcontext():
            logits = model(x).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(),
                                 ignore_index=IGNORE_INDEX, reduction="sum").double()
        count += int((y != IGNORE_INDEX).sum())
    model.train(was_training)
    return float(total), count


def evaluate(model: GPT, data: PackedData, split: str = "val", batch_size: int = 16,
             block_size: int | None = None, device: torch.device | str = "cpu",
             autocast: AbstractContextManager | None = None) -> dict[str, Any]:
    """Loss (nats/token), perplexity and bits per byte over the whole split.

    Bits per byte divides the summed nats by ln 2 and by the UTF-8 bytes of the stories scored,
    so it compares models with different tokenizers.
    """
    block_size = block_size or model.cfg.block_size
    nats, n = evaluate_tokens(model, data.tokens(split), batch_size, block_size,
                              torch.device(device), autocast)
    loss = nats / max(n, 1)
    n_bytes = data.meta["splits"][split]["bytes"]
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": n,
            "bits_per_byte": nats / math.log(2) / n_bytes if n_bytes else float("nan")}


def unigram_loss(data: PackedData, split: str = "val") -> float:
    """Cross entropy (nats/token) of the training split's unigram distribution on `split`
    (targets only, add-one smoothing): the floor a model must clearly beat."""
    V = data.vocab_size
    counts = np.bincount(np.asarray(data.tokens("train")), minlength=V).astype(np.float64) + 1
    logp = np.log(counts / counts.sum())
    targets = np.asarray(data.tokens(split))[1:]
    return float(-logp[targets].mean())
