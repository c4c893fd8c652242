"""`slms info`: parameters (total, active), FLOPs per token, memory."""

from __future__ import annotations

import argparse
import json

from slms.commands import options

HELP = "parameters (total, active), FLOPs per token, memory"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="TOML config, preset name, run or checkpoint directory")
    options.add_overrides(p)
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from slms.analysis.info import describe, info_for

    info = info_for(args.target, args.overrides, options.resolve_config_path)
    print(json.dumps(info, indent=2) if args.json else describe(info))
    return 0
