"""MoE layer on padded rows: pads skipped (the trainer's `real_BT`) against all positions computed.

One MoE layer (n_embd 256, 8 experts top-2, expert hidden 1024, train mode, forward+backward)
on 8 rows of 256 positions whose last `--pad-fraction` are pads, the two variants timed
interleaved in each repeat; medians.

    python benchmarks/moe_pads.py [--pad-fraction 0.8] [--threads 2] [--repeats 9] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from slms.config import MoEConfig
from slms.model.moe import MoE


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pad-fraction", type=float, default=0.8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    moe = MoE(256, MoEConfig(n_experts=8, top_k=2, router="topk"), 1024, "relu").train()
    x = torch.randn(8, 256, 256, requires_grad=True)
    grad_out = torch.randn(8, 256, 256)
    real = torch.zeros(8, 256, dtype=torch.bool)
    real[:, :round(256 * (1 - args.pad_fraction))] = True  # pads at the end of each row

    def step(mask: torch.Tensor | None) -> None:
        moe.zero_grad(set_to_none=True)
        x.grad = None
        y, aux = moe(x, mask)
        ((y * grad_out).sum() + aux).backward()

    variants = {"all_positions_s": None, "pads_skipped_s": real}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(args.repeats + 2):
        for name, mask in variants.items():
            t = time.perf_counter()
            step(mask)
            if i >= 2:  # warm-up
                times[name].append(time.perf_counter() - t)
    out = {k: statistics.median(v) for k, v in times.items()}
    out["speedup"] = out["all_positions_s"] / out["pads_skipped_s"]
    out["pad_fraction"] = args.pad_fraction
    if args.json:
        print(json.dumps(out))
        return
    print(f"MoE layer, 8x256 positions, {args.pad_fraction:.0%} pads, {args.threads} threads: "
          f"all positions {out['all_positions_s'] * 1e3:.1f} ms, pads skipped "
          f"{out['pads_skipped_s'] * 1e3:.1f} ms ({out['speedup']:.2f}x)")


if __name__ == "__main__":
    main()
