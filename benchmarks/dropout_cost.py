"""What dropout costs a training step on this machine, side by side in one process.

Variants, at the shape of a config (default configs/modern-cpu.toml: 4 x 192, batch 16 x 256)
under its precision (auto: bf16 autocast where bf16 matmuls are fast):
  none         model.dropout = 0
  torch        model.dropout = P the way torch does it: nn.Dropout's bernoulli_ masks, and
               attention-probability dropout inside scaled_dot_product_attention (slms before
               its CPU dropout)
  slms         model.dropout = P with slms's CPU masks (one random byte per element), attention
               probabilities too (model.attn_dropout unset)
  slms-resid   model.dropout = P, model.attn_dropout = 0: what the adaptive recipe uses
Each round times --steps optimizer steps (forward, backward, optimizer) of every variant in
turn; the report is each variant's median tokens/s over the rounds and its ratio to `none`.

    python benchmarks/dropout_cost.py [--config configs/modern-cpu.toml] [--p 0.2]
        [--rounds 5] [--steps 6] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from slms.config import load_config  # noqa: E402
from slms.model import GPT  # noqa: E402
from slms.model import dropout as slms_dropout  # noqa: E402
from slms.precision import cpu_model, resolve_precision  # noqa: E402
from slms.train.optim import build_optimizer  # noqa: E402

VARIANTS = ("none", "torch", "slms", "slms-resid")


@contextlib.contextmanager
def torch_masks(enabled: bool):
    """slms's Dropout modules drawing torch's bernoulli_ masks instead (the `torch` variant)."""
    if not enabled:
        yield
        return
    saved = slms_dropout.dropout
    slms_dropout.dropout = lambda x, p, training: torch.nn.functional.dropout(x, p, training)
    try:
        yield
    finally:
        slms_dropout.dropout = saved


def build(config: str, variant: str, p: float, overrides: list[str]):
    rate = [f"model.dropout={0.0 if variant == 'none' else p}"]
    if variant == "slms-resid":
        rate.append("model.attn_dropout=0.0")
    cfg = load_config(ROOT / config if not Path(config).is_absolute() else config,
                      ["model.vocab_size=2048", *rate, *overrides])
    model = GPT(cfg.model).train()
    return cfg, model, build_optimizer(model, cfg.train, torch.device("cpu"))


def time_steps(cfg, model, opt, steps: int, dtype: torch.dtype | None, torch_style: bool
               ) -> float:
    """Tokens per second over `steps` steps (after one untimed)."""
    tc = cfg.train
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.model.vocab_size, (tc.batch_size, cfg.model.block_size),
                      generator=gen)
    y = torch.roll(x, -1, 1)
    autocast = (torch.autocast("cpu", dtype=dtype) if dtype is not None
                else contextlib.nullcontext())
    with torch_masks(torch_style):
        for i in range(steps + 1):
            if i == 1:
                t0 = time.perf_counter()
            with autocast:
                loss = model(x, y).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return steps * x.numel() / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/modern-cpu.toml")
    p.add_argument("--p", type=float, default=0.2, help="the dropout rate")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE for the config")
    args = p.parse_args()
    runs = {v: build(args.config, v, args.p, args.overrides) for v in VARIANTS}
    precision = resolve_precision(next(iter(runs.values()))[0].train.precision,
                                  torch.device("cpu"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    speeds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for v, (cfg, model, opt) in runs.items():
            speeds[v].append(time_steps(cfg, model, opt, args.steps, dtype, v == "torch"))
    median = {v: statistics.median(s) for v, s in speeds.items()}
    report = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "precision": precision,
              "config": args.config, "p": args.p, "rounds": args.rounds, "steps": args.steps,
              "tokens_per_s": {v: round(m) for v, m in median.items()},
              "vs_none": {v: round(m / median["none"], 3) for v, m in median.items()}}
    print(json.dumps(report, indent=None if args.json else 1))


if __name__ == "__main__":
    main()
