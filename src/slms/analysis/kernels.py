"""`slms tune`: measure the MoE kernels for a model's shapes ahead of time (slms.model.tune).

Runs what training, evaluation and generation run, on random tokens: a training step's forward
and backward at (batch, block), an evaluation forward, and cached generation at batch 1 and
`batch`; each MoE shape class met for the first time is timed and its fastest kernel cached.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from slms.config import ModelConfig
from slms.model import GPT, tune
from slms.precision import DTYPES, resolve_precision

DEFAULT_VOCAB = 2048


def tune_model(cfg: ModelConfig, precision: str = "auto", batch: int = 8,
               block: int | None = None, device: str = "cpu", again: bool = False
               ) -> dict[str, dict]:
    """Measure (or read) the kernel choices of `cfg`'s MoE layers; returns those of this
    machine, by shape class (`tune.machine_entries`). `again` measures anew."""
    dev = torch.device(device)
    if cfg.vocab_size is None:  # a config before its tokenizer: the vocabulary is no MoE shape
        cfg = dataclasses.replace(cfg, vocab_size=DEFAULT_VOCAB)
    if again:
        forget_machine()
    g = torch.Generator().manual_seed(0)
    model = GPT(cfg).to(dev)
    block = min(block or cfg.block_size, cfg.block_size)
    dtype = DTYPES[resolve_precision(precision, dev)]
    autocast = (torch.autocast(dev.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    x = torch.randint(0, cfg.vocab_size, (batch, block), generator=g).to(dev)
    with model.paused_stats():
        model.train()
        with autocast:
            model(x, x).loss.backward()
        model.eval()
        with torch.no_grad(), autocast:
            model(x, x)
        model.to(dtype)  # generation runs in the weights' dtype
        for rows in (1, batch):
            prompt = x[:rows, :min(16, block - 4)]
            model.generate(prompt, 4, temperature=0.0)
    return tune.machine_entries()


def forget_machine() -> None:
    """Drop this machine's cached choices (`slms tune --again`)."""
    from slms import machine

    path = machine.cache_file("kernels")
    cache = machine.read_cache(path)
    ours = {f"{machine.machine_key()}|{tune.build()}|{k}" for k in tune.machine_entries()}
    machine.write_cache(path, {k: v for k, v in cache.items() if k not in ours})
    tune.forget()


def describe(entries: dict[str, dict]) -> str:
    """One line per shape class: the kernel chosen and each candidate's time."""
    if not entries:
        return "no MoE layers: no kernel to choose"
    width = max(map(len, entries))
    lines = [f"{'shape class':<{width}}  {'kernel':<10}  ms per call"]
    for cls, e in sorted(entries.items()):
        times = ", ".join(f"{k} {ms:.3f}" for k, ms in sorted(e["ms"].items(), key=lambda i: i[1]))
        lines.append(f"{cls:<{width}}  {e['kernel']:<10}  {times}")
    return "\n".join(lines)
