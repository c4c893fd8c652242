"""`slms train`: train a model from a TOML config (or continue a run)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from slms.commands import options

HELP = "train a model from a TOML config"
DISK_FULL_NOTE = ("the last checkpoint saved is intact: a checkpoint is written to a temporary "
                  "directory and moved into place only when complete")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="TOML config or preset name (configs/NAME.toml)")
    options.add_overrides(p, "dotted overrides, e.g. train.max_steps=50 model.n_layer=2")
    p.add_argument("--out", help="run directory (default runs/<config>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")


def where_to_load(run_dir: Path) -> str:
    """What `slms generate RUN_DIR` will load: best/, or before any evaluation the latest."""
    from slms.rundir import RunDir

    run = RunDir(run_dir)
    if run.best.is_dir():
        return f"best checkpoint in {run.best}"
    latest = run.checkpoints()
    return (f"no evaluation yet, so no best/; latest checkpoint in {latest[-1]}" if latest
            else "no checkpoint written")


def run(args: argparse.Namespace) -> int:
    from slms.config import load_config, run_config_from_dict
    from slms.train.trainer import train

    config, overrides = options.split_config(args.config, args.overrides)
    if args.resume:
        from slms.rundir import RunDir

        cfg = run_config_from_dict(RunDir(args.resume).read_config(), overrides)
    else:
        cfg = load_config(options.config_file(config) if config else None, overrides)
    run_dir = train(cfg, out_dir=args.out, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 prints
        print(f"done: {run_dir} ({where_to_load(run_dir)})")
    return 0
