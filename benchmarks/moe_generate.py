"""MoE generation speed with slms's C++ kernels against the Python paths, side by side.

A model of the given config with random weights generates greedily (`GPT.generate`, KV cache)
after a 16-token prompt, at batch 1 and batch 8; the two variants are timed interleaved in one
process, so that machine noise hits both alike:
  native  the default on CPU: decode steps run `experts_decode` (each chosen expert's weights
          streamed once for all its tokens), prefill the C++ experts loop
  python  the same model with the C++ kernels off (as with SLMS_NATIVE=0 or no compiler):
          batch 1 runs the token's experts one after another, batch 8 sorts by expert and runs
          a matmul per expert

    python benchmarks/moe_generate.py [configs/seed-moe.toml] [--threads 1] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from slms.config import load_config
from slms.model import GPT, native


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default="configs/seed-moe.toml")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if native.ops() is None:
        raise SystemExit("the C++ kernels cannot be built here: nothing to compare")
    torch.manual_seed(0)
    model = GPT(load_config(args.config).model).eval()
    real_ops = native.ops
    rows = []
    for batch in (1, 8):
        prompt = torch.randint(0, model.cfg.vocab_size, (batch, 16),
                               generator=torch.Generator().manual_seed(1))
        times: dict[str, list[float]] = {"native": [], "python": []}
        outs = {}
        for i in range(args.repeats + 1):  # the first round warms up
            for name in times:
                native.ops = real_ops if name == "native" else (lambda: None)
                try:
                    t0 = time.perf_counter()
                    outs[name] = model.generate(prompt, args.new_tokens, temperature=0)
                    dt = time.perf_counter() - t0
                finally:
                    native.ops = real_ops
                if i:
                    times[name].append(dt)
        tps = {k: batch * args.new_tokens / statistics.median(v) for k, v in times.items()}
        rows.append({"batch": batch, "native_tokens_per_s": tps["native"],
                     "python_tokens_per_s": tps["python"],
                     "speedup": tps["native"] / tps["python"],
                     "same_tokens": bool(torch.equal(outs["native"], outs["python"]))})
    meta = {"config": args.config, "threads": args.threads, "new_tokens": args.new_tokens,
            "repeats": args.repeats, "torch": torch.__version__}
    if args.json:
        print(json.dumps({"rows": rows, "meta": meta}))
        return
    print(f"{args.config}: greedy generation of {args.new_tokens} tokens after 16, "
          f"{args.threads} threads, median of {args.repeats}")
    for r in rows:
        print(f"batch {r['batch']}: C++ kernels {r['native_tokens_per_s']:.1f} tok/s, Python "
              f"paths {r['python_tokens_per_s']:.1f} tok/s ({r['speedup']:.2f}x); same tokens: "
              f"{r['same_tokens']}")


if __name__ == "__main__":
    main()
