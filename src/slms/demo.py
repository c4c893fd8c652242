"""`slms demo` (what `make demo` runs): corpus -> tokenizer -> data -> train a tiny MoE on the
CPU -> report honest numbers -> tell a story -> show which experts the tokens used."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from slms.analysis.evaluate import evaluate, unigram_loss
from slms.checkpoint import load_checkpoint
from slms.config import load_config
from slms.data.loader import PackedData
from slms.infer.generate import Sampling, generate_text
from slms.model import count_params
from slms.rundir import RunDir, resolve
from slms.train.metrics import expert_usage_line
from slms.train.plot import plot_run
from slms.train.trainer import train


def run_demo(config: str | Path, overrides: list[str], out: str | None = None) -> Path:
    t0 = time.perf_counter()
    cfg = load_config(config, overrides)
    print(f"== slms demo: {cfg.name} ({'MoE' if cfg.model.moe else 'dense'}) on "
          f"{torch.get_num_threads()} CPU threads")
    run_dir = train(cfg, out_dir=out)
    model, tok, meta = load_checkpoint(resolve(run_dir))
    data = PackedData(RunDir(run_dir).read_config()["data_dir"])
    counts = count_params(model)
    model.reset_moe_stats()  # count the routing of the evaluation below
    val = evaluate(model, data, "val", cfg.train.batch_size, device="cpu")
    shares = [layer["share"] for layer in model.pop_moe_stats()]
    uni = unigram_loss(data, "val")

    print(f"\n== results (best checkpoint, step {meta['step']})")
    print(f"parameters: {counts['params_total']:,} total, {counts['params_active']:,} active "
          "per token")
    print(f"validation loss: {val['loss']:.3f} nats/token ({val['bits_per_byte']:.3f} bits/byte) "
          f"vs {uni:.3f} for a unigram model of the same data")

    prompt = "Once upon a time"
    story = generate_text(model, tok, prompt, Sampling(max_new_tokens=220, temperature=0.7,
                                                        top_k=40, seed=0))
    print("\n== a story (prompt: \"Once upon a time\", temperature 0.7, seed 0)\n")
    print(prompt + story)

    if model.moe_layers():
        print("\n== expert usage on the validation split (share of routed tokens per expert)")
        for i, layer in enumerate(shares):
            print(f"layer {i}: {expert_usage_line(layer)}")
    plots = plot_run(run_dir)
    print(f"\n== done in {time.perf_counter() - t0:.0f} s. Run directory: {run_dir}")
    print(f"   metrics: {RunDir(run_dir).metrics_file}")
    print(f"   plots:   {', '.join(str(p) for p in plots)}")
    print(f"   more stories: .venv/bin/slms generate {run_dir} --prompt \"One day, a little\"")
    return run_dir
