"""`slms study`: dense vs MoE for the same training compute (and the dense model upcycled)."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

from slms.commands import options

HELP = "dense vs MoE trained to the same FLOPs (or minutes), and the dense model upcycled"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None,
                   help="dense base config or preset name (default modern-cpu; tiny shapes "
                   "with --quick)")
    options.add_overrides(p, "dotted overrides of the base config, e.g. train.batch_size=8")
    budget = p.add_argument_group("budget per variant (give one)")
    budget.add_argument("--flops", type=float, default=0.0,
                        help="training FLOPs (the convention of `slms info`), e.g. 2e13")
    budget.add_argument("--dense-steps", type=int, default=0,
                        help="the FLOPs of this many steps of the dense model")
    budget.add_argument("--minutes", type=float, default=0.0,
                        help="minutes of optimizer steps (evaluation excluded)")
    p.add_argument("--experts", default="4,8,16", help="expert counts (default 4,8,16)")
    p.add_argument("--top-k", default="1,2", help="experts per token (default 1,2)")
    p.add_argument("--router", default="bias", choices=["topk", "noisy_topk", "bias"],
                   help="router of the MoE variants (default bias)")
    p.add_argument("--upcycle", default="8,2", metavar="E,K",
                   help="experts and top-k of the upcycled variant (default 8,2; none: skip it)")
    p.add_argument("--upcycle-noise", type=float, default=0.01,
                   help="expert noise of the upcycled variant, relative to the weights' std "
                   "(default 0.01, as in the study of docs/dense_vs_moe.md; the new router "
                   "separates exact copies too)")
    p.add_argument("--data", help="a .txt file (its last --val-stories stories held out), a "
                   "prepared data directory or any source `slms prepare` reads (default: the "
                   "base config's data.path, else the embedded corpus)")
    p.add_argument("--val-stories", type=int, default=500)
    p.add_argument("--separator", choices=["eot", "blank-line", "newline"], default="newline",
                   help="story separator of a --data .txt file (default newline)")
    p.add_argument("--evals", type=int, default=10, help="evaluations per run (default 10)")
    p.add_argument("--eval-every", type=int, default=50,
                   help="steps between evaluations with --minutes (default 50)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny model on a small embedded corpus, 30 dense steps unless a "
                   "budget is given: the whole study in well under a minute")
    p.add_argument("--out", help="output directory (default runs/study-<time>)")


def ints(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{option} takes comma-separated integers, got {text!r}") from None


def study_options(args: argparse.Namespace):  # noqa: ANN201
    from slms.study import QUICK_DENSE_STEPS, QUICK_OVERRIDES, StudyOptions

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
    from slms.study import run_study, table

    opts = study_options(args)
    report = run_study(opts, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(table(report))
    print(f"wrote {opts.out / 'study.json'}, {opts.out / 'study_flops.png'} and "
          f"{opts.out / 'study_time.png'}")
    return 0
