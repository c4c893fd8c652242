"""`slms study`: dense vs MoE for the same training compute (and the dense model upcycled)."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from slms.commands import options
from slms.data.sources import SEPARATORS
from slms.study import QUICK_DENSE_STEPS, QUICK_OVERRIDES, StudyOptions

HELP = "dense vs MoE trained to the same FLOPs (or minutes), and the dense model upcycled"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of StudyOptions' fields, their defaults its."""
    p.add_argument("config", nargs="?", default=None,
                   help="dense base config or preset name (default modern-cpu; tiny shapes "
                   "with --quick)")
    options.add_overrides(p, "dotted overrides of the base config, e.g. train.batch_size=8")
    budget = p.add_argument_group("budget per variant (give one)")

    def field(group: argparse._ActionsContainer, name: str, *flags: str, **kw: Any) -> None:
        options.add_field(group, StudyOptions, name, *flags, **kw)

    field(budget, "flops", help="training FLOPs (the convention of `slms info`), e.g. 2e13")
    field(budget, "dense_steps", help="the FLOPs of this many steps of the dense model")
    field(budget, "minutes", help="minutes of optimizer steps (evaluation excluded)")
    field(p, "experts", help="expert counts (default %(default)s)")
    field(p, "top_ks", "--top-k", help="experts per token (default %(default)s)")
    field(p, "router", help="router of the MoE variants (default %(default)s)")
    field(p, "upcycle", metavar="E,K", help="experts and top-k of the upcycled variant "
          "(default %(default)s; none: skip it)")
    field(p, "upcycle_noise",
          help="expert noise of the upcycled variant, relative to the weights' std "
          "(default %(default)s, as in the study of docs/dense_vs_moe.md; the new router "
          "separates exact copies too)")
    field(p, "data", help="a .txt file (its last --val-stories stories held out), a "
          "prepared data directory or any source `slms prepare` reads (default: the "
          "base config's data.path, else the embedded corpus)")
    field(p, "val_stories", help="stories of a --data .txt file held out for validation "
          "(default %(default)s)")
    field(p, "separator", choices=SEPARATORS,
          help="story separator of a --data .txt file (default %(default)s)")
    field(p, "evals", help="evaluations per run (default %(default)s)")
    field(p, "eval_every", help="steps between evaluations with --minutes (default "
          "%(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny model on a small embedded corpus, 30 dense steps unless a "
                   "budget is given: the whole study in well under a minute")
    p.add_argument("--out", help="output directory (default runs/study-<time>)")


def ints(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{option} takes comma-separated integers, got {text!r}") from None


def study_options(args: argparse.Namespace) -> StudyOptions:
    config, overrides = options.split_config(args.config, args.overrides)
    out = Path(args.out or f"runs/study-{datetime.now():%Y%m%d-%H%M%S}")
    if args.quick:
        overrides = [*QUICK_OVERRIDES, f"data.cache_dir={out / 'cache'}", *overrides]
    budget = (args.flops, args.dense_steps, args.minutes)
    dense_steps = QUICK_DENSE_STEPS if args.quick and not any(budget) else args.dense_steps
    upcycle = None if args.upcycle.lower() == "none" else ints(args.upcycle, "--upcycle")
    if upcycle is not None and len(upcycle) != 2:
        raise ValueError(f"--upcycle takes E,K (e.g. 8,2) or none, got {args.upcycle!r}")
    return StudyOptions(
        config=options.config_file(config or "modern-cpu"), out=out, overrides=tuple(overrides),
        flops=args.flops, dense_steps=dense_steps, minutes=args.minutes,
        experts=ints(args.experts, "--experts"), top_ks=ints(args.top_k, "--top-k"),
        router=args.router, upcycle=upcycle, upcycle_noise=args.upcycle_noise,
        evals=args.evals, eval_every=args.eval_every,
        data=args.data, val_stories=args.val_stories, separator=args.separator)


def run(args: argparse.Namespace) -> int:
    from slms.study.report import table
    from slms.study.run import run_study

    opts = study_options(args)
    study = run_study(opts, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(table(study.results))
    print(f"wrote {opts.out / 'study.json'}, {opts.out / 'study_flops.png'} and "
          f"{opts.out / 'study_time.png'}")
    return 0
