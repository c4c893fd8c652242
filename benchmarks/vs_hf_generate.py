"""Batch-1 greedy generation speed of slms against transformers' GPT-2, side by side in one run.

Candidates (same dimensions, random weights, fp32, timed interleaved in each repeat so that
machine noise hits them alike):
  slms_dense      slms GPT.generate(temperature=0): its preallocated KV cache
  slms_moe        the same with every FFN an MoE layer of 8 experts, top-2, each expert half
                  the dense FFN's width (2*n_embd unless --expert-hidden): as many active
                  parameters per token as the dense model, so the ratio to dense is routing's cost
  slms_moe_wide   the seed's width, experts as wide as the dense FFN (4*n_embd): twice the
                  dense FFN work per token, and 8x its weights to keep in cache
  hf_gpt2         transformers GPT2LMHeadModel.generate(do_sample=False): DynamicCache
  slms_dense_hf   slms dense through SlmsForCausalLM.generate (transformers' loop and cache)

tokens/s = new tokens / wall time of one generate call (prompt prefill included, the same
16-token prompt for all). Why --threads: on a busy 2-core machine torch's 2-thread OpenMP makes
the small matmuls of decoding wait for the other core (see docs/benchmarks.md, Inference).

    python benchmarks/vs_hf_generate.py [--threads 1] [--repeats 7] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

from slms.config import ModelConfig, MoEConfig
from slms.hf import from_gpt
from slms.model import GPT


def build(args: argparse.Namespace) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """name -> generate(prompt_BT) returning (1, T + new_tokens)."""
    dims = dict(vocab_size=args.vocab, block_size=args.block, n_layer=args.n_layer,
                n_head=args.n_head, n_embd=args.n_embd, activation="gelu", dropout=0.0)
    torch.manual_seed(0)
    dense = GPT(ModelConfig(**dims)).eval()
    moe, wide = (GPT(ModelConfig(**dims, moe=MoEConfig(n_experts=8, top_k=2, router="topk",
                                                       expert_hidden=hidden))).eval()
                 for hidden in (args.expert_hidden or 2 * args.n_embd, 4 * args.n_embd))
    gpt2 = GPT2LMHeadModel(GPT2Config(
        vocab_size=args.vocab, n_positions=args.block, n_embd=args.n_embd, n_layer=args.n_layer,
        n_head=args.n_head, activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=None, pad_token_id=0)).eval()
    dense_hf = from_gpt(dense)
    n = args.new_tokens
    # min_new_tokens: no early stop, every candidate generates exactly n tokens.
    hf_kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                 pad_token_id=0, eos_token_id=None)
    return {
        "slms_dense": lambda p: dense.generate(p, n, temperature=0),
        "slms_moe": lambda p: moe.generate(p, n, temperature=0),
        "slms_moe_wide": lambda p: wide.generate(p, n, temperature=0),
        "hf_gpt2": lambda p: gpt2.generate(p, attention_mask=torch.ones_like(p), **hf_kw),
        "slms_dense_hf": lambda p: dense_hf.generate(p, attention_mask=torch.ones_like(p),
                                                     **hf_kw),
    }


def measure(cands: dict[str, Callable[[torch.Tensor], torch.Tensor]], args: argparse.Namespace
            ) -> dict[str, list[float]]:
    prompt = torch.randint(0, args.vocab, (1, args.prompt_tokens),
                           generator=torch.Generator().manual_seed(1))
    for f in cands.values():  # warm-up: allocator, OpenMP pool, lazy inits
        f(prompt)
    times: dict[str, list[float]] = {name: [] for name in cands}
    for r in range(args.repeats):
        # rotate the order each repeat so that no candidate always runs first
        names = list(cands)
        names = names[r % len(names):] + names[:r % len(names)]
        for name in names:
            t = time.perf_counter()
            out = cands[name](prompt)
            times[name].append(time.perf_counter() - t)
            assert out.shape[1] == args.prompt_tokens + args.new_tokens, (name, out.shape)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--block", type=int, default=1024)
    p.add_argument("--expert-hidden", type=int, default=None,
                   help="slms_moe's expert hidden size (default 2*n_embd: top-2 of them are "
                   "as wide as the dense FFN)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    times = measure(build(args), args)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    rows = {name: {"tokens_per_s": args.new_tokens / med[name], "median_s": med[name],
                   "min_s": min(times[name]), "max_s": max(times[name])} for name in med}
    ratios = {"slms_dense_vs_hf_gpt2": med["hf_gpt2"] / med["slms_dense"],
              "slms_moe_time_vs_slms_dense": med["slms_moe"] / med["slms_dense"],
              "slms_moe_wide_time_vs_slms_dense": med["slms_moe_wide"] / med["slms_dense"],
              "slms_dense_hf_vs_hf_gpt2": med["hf_gpt2"] / med["slms_dense_hf"]}
    meta = {"threads": args.threads, "repeats": args.repeats, "new_tokens": args.new_tokens,
            "prompt_tokens": args.prompt_tokens, "n_layer": args.n_layer, "n_embd": args.n_embd,
            "n_head": args.n_head, "vocab": args.vocab, "block": args.block,
            "expert_hidden": args.expert_hidden or 2 * args.n_embd,
            "expert_hidden_wide": 4 * args.n_embd,
            "torch": torch.__version__, "transformers": transformers.__version__}
    if args.json:
        print(json.dumps({"candidates": rows, "ratios": ratios, "meta": meta}))
        return
    print(f"batch-1 greedy, {args.new_tokens} new tokens after {args.prompt_tokens}, "
          f"{args.threads} thread(s), median of {args.repeats}")
    for name, r in rows.items():
        print(f"  {name:14s} {r['tokens_per_s']:8.1f} tokens/s  "
              f"({r['min_s']:.3f}-{r['max_s']:.3f} s per call)")
    print(f"  slms dense speed / transformers GPT-2: {ratios['slms_dense_vs_hf_gpt2']:.2f}x")
    print(f"  slms MoE time / slms dense time:       {ratios['slms_moe_time_vs_slms_dense']:.2f}x "
          "(same active parameters)")
    print(f"  slms wide MoE time / slms dense time:  "
          f"{ratios['slms_moe_wide_time_vs_slms_dense']:.2f}x (seed-width experts)")


if __name__ == "__main__":
    main()
