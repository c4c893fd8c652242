"""A study's report: its results (`slms.study.results`) written as study.json (`write_report`:
the keys of Result and Point, in their order), a markdown table and two plots."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from slms.precision import cpu_model
from slms.study.plan import Study
from slms.study.results import Result

CONVENTION = (
    "training FLOPs = tokens trained (batch_size x grad_accum x block_size per step) x FLOPs "
    "per token; FLOPs per token = 6 x the matmul weights a token passes through (for an MoE "
    "layer its top_k experts and the router) + 12 x n_layer x n_embd x block_size for attention "
    "(counted in full, non-causal, as PaLM and nanoGPT count MFU); slms.model.info."
    "flops_per_token, the figure `slms info` prints")


def write_report(study: Study) -> dict[str, Any]:
    """Write study.json (the results so far) into the output directory; returns its content."""
    opts = study.opts
    report = {
        "config": str(opts.config), "overrides": list(opts.overrides),
        "data": study.base.data.path, "budget": {
            "flops": study.flops or None, "minutes": opts.minutes or None,
            "dense_steps": opts.dense_steps or None, "convention": CONVENTION},
        "tokens_per_step": study.tokens_per_step, "router": opts.router,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "date": datetime.now().isoformat(timespec="seconds"),
        "variants": [r.to_dict() for r in study.results]}
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "study.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def table(results: list[Result]) -> str:
    """The results as a markdown table, best final validation bpb first."""
    rows = ["| variant | params (active) | FLOPs/token | steps | FLOPs (x budget) | final val "
            "bpb | train s | tokens/s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(results, key=lambda r: r.final_val_bpb):
        ratio = f" ({r.flops_vs_budget:.3f})" if r.flops_vs_budget else ""
        params = f"{r.params_total / 1e6:.2f}M ({r.params_active / 1e6:.2f}M)"
        rows.append(f"| {r.name} | {params} | {r.flops_per_token / 1e6:.2f}M | "
                    f"{r.steps:,} | "
                    f"{r.flops:.3g}{ratio} | {r.final_val_bpb:.4f} | "
                    f"{r.train_seconds:.1f} | {r.tokens_per_s:,.0f} |")
    return "\n".join(rows)


def plot_study(study: Study) -> list[Path]:
    """study_flops.png and study_time.png in the output directory: validation bpb against
    training FLOPs and against training seconds (evaluation excluded), one line per variant."""
    # matplotlib only here, its backend set before pyplot is imported
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    what = (f"{study.flops:.3g} training FLOPs" if study.flops else
            f"{study.opts.minutes:g} minutes") + f" each on {cpu_model()}"
    paths = []
    for key, label, name in (("flops", "training FLOPs", "study_flops.png"),
                             ("train_seconds", "training seconds (evaluation excluded)",
                              "study_time.png")):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for r in study.results:
            xs = [getattr(p, key) for p in r.curve]
            ys = [p.val_bpb for p in r.curve]
            ax.plot(xs, ys, **_style(r), label=f"{r.name} ({r.final_val_bpb:.3f})")
        ax.set_ylim(*_y_range(study.results))
        ax.set_xlabel(label)
        ax.set_ylabel("validation bits per byte")
        ax.set_title(f"dense vs MoE, {what}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(study.opts.out / name, dpi=110)
        plt.close(fig)
        paths.append(study.opts.out / name)
    return paths


def _style(r: Result) -> dict[str, Any]:
    if r.kind == "dense":
        return {"color": "black", "lw": 2.2, "marker": "o", "ms": 3}
    if r.kind == "upcycled":
        return {"color": "tab:red", "ls": "--", "lw": 1.8, "marker": "^", "ms": 3}
    colors = {4: "tab:blue", 8: "tab:green", 16: "tab:purple"}
    return {"color": colors.get(r.n_experts, None), "lw": 1.2, "ms": 3,
            "marker": "o" if r.top_k > 1 else "s", "ls": "-" if r.top_k > 1 else ":"}


def _y_range(results: list[Result]) -> tuple[float, float]:
    """Low end: the best value; high end: the worst value after the first two evaluations of
    each run, so that the early drop does not squash where the variants differ."""
    ys = [p.val_bpb for r in results for p in r.curve]
    later = [p.val_bpb for r in results for p in r.curve[2:]] or ys
    low, high = min(ys), max(later)
    pad = 0.05 * max(high - low, 1e-3)
    return low - pad, high + pad
