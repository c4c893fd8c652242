"""`slms plot`: PNG loss curves (and MoE expert load) of a training run."""

from __future__ import annotations

import argparse

HELP = "PNG loss curves (and MoE expert load) of a training run"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory (holds metrics.jsonl)")


def run(args: argparse.Namespace) -> int:
    from slms.train.plot import plot_run

    for path in plot_run(args.run_dir):
        print(f"wrote {path}")
    return 0
