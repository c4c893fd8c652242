"""Router study: the tiny MoE trained with each router, with and without the balancing loss.

Every run trains configs/tiny.toml on the embedded corpus for the same steps and seed (smaller
model and shorter run via overrides so that all six fit in minutes on 2 cores). Reports final
validation loss and the expert load (max/mean tokens per expert, 1.00 = perfect balance) per
layer over the last log interval, and plots the load over steps.

    python benchmarks/router_study.py [--steps 300] [--out runs/router_study]
        [--doc docs/router_study.md] [--png docs/router_study_load.png]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from slms.config import load_config  # noqa: E402
from slms.train.metrics import read_metrics  # noqa: E402
from slms.train.trainer import train  # noqa: E402

VARIANTS = [  # (name, overrides)
    ("noisy_topk", ["model.moe.router=noisy_topk"]),
    ("noisy_topk, no bal. loss", ["model.moe.router=noisy_topk", "model.moe.aux_loss_coef=0"]),
    ("topk", ["model.moe.router=topk"]),
    ("topk, no bal. loss", ["model.moe.router=topk", "model.moe.aux_loss_coef=0"]),
    # the bias router has no balancing loss by default; the first row adds it
    ("bias", ["model.moe.router=bias", "model.moe.bias_update_rate=0.01",
              "model.moe.aux_loss_coef=0.01"]),
    ("bias, no bal. loss", ["model.moe.router=bias", "model.moe.bias_update_rate=0.01"]),
]


def common_overrides(steps: int) -> list[str]:
    return ["model.block_size=128", "train.batch_size=16",
            f"train.max_steps={steps}", "train.warmup_steps=15", "train.log_every=10",
            f"train.eval_every={steps}", f"train.checkpoint_every={steps}", "train.threads=2",
            "train.seed=0"]


def run_variant(name: str, overrides: list[str], steps: int, out: Path) -> dict:
    cfg = load_config("configs/tiny.toml", common_overrides(steps) + overrides)
    slug = name.replace(", ", "_").replace(" ", "_").replace(".", "")
    t0 = time.perf_counter()
    run_dir = train(cfg, out_dir=out / slug, log=lambda *a, **k: None)
    seconds = time.perf_counter() - t0
    records = read_metrics(run_dir)
    val = [r["val_loss"] for r in records if "val_loss" in r]
    logs = [r for r in records if "moe" in r]
    return {"name": name, "overrides": overrides, "seconds": seconds, "val_loss": val[-1],
            "final_load": [layer["max_over_mean"] for layer in logs[-1]["moe"]],
            "steps": [r["step"] for r in logs],
            "load": [[layer["max_over_mean"] for layer in r["moe"]] for r in logs],
            "aux": [sum(lay["aux_loss"] for lay in r["moe"]) / len(r["moe"]) for r in logs]}


def plot(results: list[dict], png: Path) -> None:
    n_layers = len(results[0]["final_load"])
    fig, axes = plt.subplots(1, n_layers, figsize=(5.5 * n_layers, 4), sharey=True, squeeze=False)
    for i, ax in enumerate(axes[0]):
        for r in results:
            style = "--" if "no bal" in r["name"] else "-"
            ax.plot(r["steps"], [load[i] for load in r["load"]], style, label=r["name"])
        ax.set_title(f"MoE layer {i}")
        ax.set_xlabel("training step")
        ax.axhline(1.0, color="grey", lw=0.5)
    axes[0][0].set_ylabel("expert load, max / mean (1 = balanced)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def write_doc(results: list[dict], doc: Path, png: Path, command: str, steps: int) -> None:
    lines = ["# Router study", "",
             "The tiny MoE (`configs/tiny.toml`: 4 experts, top-2, expert hidden 256) trained on",
             "the embedded corpus with each router, with and without the Switch balancing loss;",
             f"same seed and data, {steps} steps each, with overrides "
             f"`{' '.join(common_overrides(steps))}`.",
             "Load is max/mean tokens per expert over the last log interval (10 steps):",
             "1.00 is perfect balance; with top-2 of 4 experts the worst case (two experts take",
             "every token) is 2.00. Validation loss is the LM loss only (no router losses).", "",
             "Measured on 2 CPU cores (torch CPU, fp32) with:", "", "```", command, "```", "",
             "| router | val loss | load max/mean per layer (final) | seconds |",
             "| --- | --- | --- | --- |"]
    for r in results:
        loads = " / ".join(f"{x:.2f}" for x in r["final_load"])
        lines.append(f"| {r['name']} | {r['val_loss']:.4f} | {loads} | {r['seconds']:.0f} |")
    lines += ["", f"![expert load over steps]({png.name})", ""]
    doc.write_text("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", type=Path, default=Path("runs/router_study"))
    p.add_argument("--doc", type=Path, default=Path("docs/router_study.md"))
    p.add_argument("--png", type=Path, default=Path("docs/router_study_load.png"))
    p.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    args = p.parse_args()
    wanted = [v for v in VARIANTS if not args.only or v[0] in args.only.split(",")]
    results = []
    for name, overrides in wanted:
        r = run_variant(name, overrides, args.steps, args.out)
        print(f"{name:28s} val {r['val_loss']:.4f}  load "
              f"{' '.join(f'{x:.2f}' for x in r['final_load'])}  ({r['seconds']:.0f} s)",
              flush=True)
        results.append(r)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, args.png)
    command = "python benchmarks/router_study.py " + " ".join(
        f"--{k} {v}" for k, v in (("steps", args.steps), ("out", args.out), ("doc", args.doc),
                                  ("png", args.png)))
    write_doc(results, args.doc, args.png, command, args.steps)
    print(f"wrote {args.doc} and {args.png}")


if __name__ == "__main__":
    main()
