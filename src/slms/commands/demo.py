"""`slms demo`: the whole pipeline on the embedded corpus, on the CPU."""

from __future__ import annotations

import argparse

from slms.commands import options

HELP = "the whole pipeline on the embedded corpus, on the CPU"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default="tiny", help="config (default: tiny)")
    p.add_argument("--out", help="run directory (default runs/demo-<time>)")
    options.add_overrides(p)


def run(args: argparse.Namespace) -> int:
    from slms.demo import run_demo

    config, overrides = options.split_config(args.config, args.overrides)
    run_demo(options.config_file(config or "tiny"), overrides, args.out)
    return 0
