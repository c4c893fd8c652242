"""`slms bench`: measured speed and memory of a model (a checkpoint, or random weights for a
config): training tokens/s, generation tokens/s with and without the KV cache at batch 1 and 8,
time to first token, peak memory, parameters total / active.

Every figure is measured in this process; the machines are noisy, so compare targets side by
side in one run rather than across runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from slms.memory import peak_memory, reset_peak_memory
from slms.model import GPT, count_params
from slms.precision import inference_dtype


@dataclass
class BenchOptions:
    new_tokens: int = 256  # batch-1 generation length
    b8_new_tokens: int = 64  # batch-8 generation length (recomputation at batch 8 is slow)
    prompt_tokens: int = 16
    train_batch: int = 8
    train_block: int = 256  # capped at the model's block_size
    train_steps: int = 3
    device: str = "cpu"
    precision: str = "fp32"  # generation: the weights' dtype; training: autocast's


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# measurements


def train_speed(model: GPT, o: BenchOptions, device: torch.device) -> dict[str, float]:
    """Tokens/s of forward + backward + AdamW step on random tokens (one warm-up step)."""
    T = min(o.train_block, model.cfg.block_size)
    V = model.cfg.vocab_size
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, V, (2, o.train_batch, T), generator=g).to(device)

    dtype = inference_dtype(o.precision, device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step() -> None:
        with autocast:
            out = model(x, y)
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak_memory(device)
    step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(o.train_steps):
        step()
    _sync(device)
    dt = time.perf_counter() - t0
    peak = peak_memory(device)[0] / 2**20
    model.eval()
    return {"train_tokens_per_s": o.train_steps * o.train_batch * T / dt,
            "train_tokens_per_step": o.train_batch * T, "train_peak_mib": peak}


def gen_speed(model: GPT, batch: int, new_tokens: int, prompt_tokens: int, use_cache: bool,
              device: torch.device) -> tuple[float, float]:
    """(new tokens per second over the batch, seconds to the first token) for greedy decoding
    of exactly `new_tokens` tokens after a random prompt."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, model.cfg.vocab_size, (batch, prompt_tokens), generator=g).to(device)
    list(model.iter_tokens(x, 2, temperature=0, use_cache=use_cache))  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    first = None
    n = 0
    for _ in model.iter_tokens(x, new_tokens, temperature=0, use_cache=use_cache):
        n += 1
        if first is None:
            _sync(device)
            first = time.perf_counter() - t0
    _sync(device)
    dt = time.perf_counter() - t0
    return batch * n / dt, first or dt


def bench_model(model: GPT, name: str, o: BenchOptions,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    device = torch.device(o.device)
    dtype = inference_dtype(o.precision, device)
    model = model.to(device, dtype)
    say = log or (lambda m: None)
    r: dict[str, Any] = {"name": name, **count_params(model), "precision": str(dtype)[6:]}
    room = model.cfg.block_size - o.prompt_tokens
    if room < 1:
        raise ValueError(f"--prompt-tokens {o.prompt_tokens} leaves no room to generate in the "
                         f"context of {model.cfg.block_size}")
    n1, n8 = min(o.new_tokens, room), min(o.b8_new_tokens, room)
    r["gen_new_tokens"], r["gen_new_tokens_b8"] = n1, n8
    reset_peak_memory(device)
    for batch, n, suffix in ((1, n1, ""), (8, n8, "_b8")):
        for cached in (True, False):
            say(f"{name}: generating {n} tokens, batch {batch}, "
                f"{'with' if cached else 'without'} KV cache ...")
            tps, ttft = gen_speed(model, batch, n, o.prompt_tokens, cached, device)
            kind = "cached" if cached else "uncached"
            r[f"gen_tokens_per_s_{kind}{suffix}"] = tps
            if batch == 1 and cached:
                r["time_to_first_token_s"] = ttft
    r["gen_peak_mib"] = peak_memory(device)[0] / 2**20
    r["cache_speedup"] = r["gen_tokens_per_s_cached"] / r["gen_tokens_per_s_uncached"]
    r["cache_speedup_b8"] = r["gen_tokens_per_s_cached_b8"] / r["gen_tokens_per_s_uncached_b8"]
    # Training last: its optimizer steps change the weights (a loaded checkpoint stays as it
    # is on disk; only this in-memory copy is touched).
    say(f"{name}: training ...")
    r.update(train_speed(model.float(), o, device))  # fp32 weights, autocast in o.precision
    r["options"] = asdict(o)
    return r


def load_target(target: str, overrides: list[str], resolve: Callable[[str], Path],
                device: str = "cpu") -> tuple[str, GPT]:
    """A checkpoint (its weights) or a config (random weights, seeded)."""
    path = Path(target)
    if path.is_dir():
        import slms

        model, _ = slms.load(path, device=device)
        return str(path), model
    from slms.analysis.info import model_config_of

    name, mcfg = model_config_of(target, overrides, resolve)
    torch.manual_seed(0)
    return name, GPT(mcfg).to(device)


ROWS = [  # (key, label, format)
    ("params_total", "parameters", "{:,.0f}"),
    ("params_active", "active per token", "{:,.0f}"),
    ("train_tokens_per_s", "train tokens/s", "{:,.0f}"),
    ("train_peak_mib", "train peak MiB", "{:,.0f}"),
    ("gen_tokens_per_s_cached", "gen tok/s b1 cached", "{:,.1f}"),
    ("gen_tokens_per_s_uncached", "gen tok/s b1 no cache", "{:,.1f}"),
    ("cache_speedup", "KV cache speed-up b1", "{:.1f}x"),
    ("gen_tokens_per_s_cached_b8", "gen tok/s b8 cached", "{:,.1f}"),
    ("gen_tokens_per_s_uncached_b8", "gen tok/s b8 no cache", "{:,.1f}"),
    ("cache_speedup_b8", "KV cache speed-up b8", "{:.1f}x"),
    ("time_to_first_token_s", "time to first token", "{:.3f} s"),
    ("gen_peak_mib", "gen peak MiB", "{:,.0f}"),
]


def describe(results: list[dict[str, Any]]) -> str:
    """One column per target, one row per figure."""
    width = max(14, *(len(r["name"]) + 2 for r in results))
    lines = ["".ljust(24) + "".join(r["name"][-width + 2:].rjust(width) for r in results)]
    for key, label, fmt in ROWS:
        cells = ["-" if r.get(key) is None else fmt.format(r[key]) for r in results]
        lines.append(label.ljust(24) + "".join(c.rjust(width) for c in cells))
    r0 = results[0]
    lines.append(f"(generation: greedy, {r0['options']['prompt_tokens']}-token prompt, "
                 f"{r0['gen_new_tokens']} new tokens at batch 1, {r0['gen_new_tokens_b8']} at "
                 f"batch 8; training: batch {r0['options']['train_batch']} x "
                 f"{r0['train_tokens_per_step'] // r0['options']['train_batch']}; peak memory: "
                 "process peak RSS on CPU)")
    return "\n".join(lines)
