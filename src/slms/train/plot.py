"""`slms plot RUN_DIR`: PNG figures from a run's metrics.jsonl (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slms.rundir import RunDir
from slms.train.metrics import read_metrics


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write loss.png (train and validation loss vs step and vs tokens, log-scale loss) and,
    for MoE runs, expert_load.png (max/mean expert load per layer vs step) into run_dir."""
    import matplotlib

    matplotlib.use("Agg")
    run = RunDir(run_dir)
    metrics = run.metrics_file
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} not found: give a run directory of `slms train`")
    records = read_metrics(metrics)
    train = [r for r in records if "tokens_per_s" in r]
    if not train:
        raise ValueError(f"{metrics} holds no training steps yet; nothing to plot")
    written = [_loss_figure(run, train, [r for r in records if "val_loss" in r])]
    if any(r.get("moe") for r in train):
        written.append(_load_figure(run, [r for r in train if r.get("moe")]))
    return written


def _loss_figure(run: RunDir, train: list[dict[str, Any]], val: list[dict[str, Any]]) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for ax, key, label in ((axes[0], "step", "optimizer step"),
                           (axes[1], "tokens", "training tokens")):
        ax.plot([r[key] for r in train], [r["loss"] for r in train], label="train loss",
                lw=1.2)
        if val:
            ax.plot([r[key] for r in val], [r["val_loss"] for r in val], "o-",
                    label="validation loss", lw=1.5, ms=4)
        ax.set_yscale("log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(FormatStrFormatter("%.2f"))
        ax.set_xlabel(label)
        ax.set_ylabel("cross entropy (nats/token, log scale)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    best = min(val, key=lambda r: r["val_loss"]) if val else None
    title = f"{run.path.name}: final train loss {train[-1]['loss']:.3f}"
    if best:
        title += f", best validation loss {best['val_loss']:.3f} at step {best['step']}"
    fig.suptitle(title)
    path = run.loss_plot
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _load_figure(run: RunDir, train: list[dict[str, Any]]) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
    steps = [r["step"] for r in train]
    for i in range(len(train[0]["moe"])):
        ax.plot(steps, [r["moe"][i]["max_over_mean"] for r in train], label=f"MoE layer {i}")
    ax.axhline(1.0, color="gray", ls="--", lw=1, label="perfect balance")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("expert load: max / mean tokens per expert")
    ax.set_title(f"{run.path.name}: expert load balance (1.0 = every expert equally loaded)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    path = run.expert_load_plot
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
