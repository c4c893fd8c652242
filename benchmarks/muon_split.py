"""The cost of one Muon step with fused matrices split (`train.muon_split`) or whole.

    python benchmarks/muon_split.py configs/modern-cpu.toml [key=value ...]

Times `optimizer.step()` alone (random gradients, after 3 warm-up steps), the two variants
interleaved, best of 5 rounds of 20 steps each; prints milliseconds per step and the ratio.
"""
import dataclasses
import sys
import time

import torch

from slms.config import load_config
from slms.model.gpt import GPT
from slms.train.optim import build_optimizer


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cfg = load_config(sys.argv[1], ["model.vocab_size=2048"] + sys.argv[2:])
    torch.manual_seed(0)
    model = GPT(cfg.model)
    best: dict[bool, float] = {}
    for split in (False, True) * 5:
        train = dataclasses.replace(cfg.train, optimizer="muon", muon_split=split)
        opt = build_optimizer(model, train, torch.device("cpu"))
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        for _ in range(3):
            opt.step()
        start = time.perf_counter()
        for _ in range(20):
            opt.step()
        best[split] = min(best.get(split, float("inf")), (time.perf_counter() - start) / 20)
    print(f"{sys.argv[1]} ({torch.get_num_threads()} threads): whole {best[False] * 1e3:.1f} ms, "
          f"split {best[True] * 1e3:.1f} ms per step; split / whole {best[True] / best[False]:.3f}")


if __name__ == "__main__":
    main()
