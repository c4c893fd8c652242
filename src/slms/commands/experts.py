"""`slms experts`: expert load, specialisation, a heatmap and an HTML map of an MoE model."""

from __future__ import annotations

import argparse

from slms.commands import options

HELP = "expert load, specialisation, heatmap and HTML map"


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_checkpoint(p, "run or checkpoint directory of an MoE model")
    p.add_argument("--data", help="prepared data directory or SOURCE (default: the run's data)")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--max-tokens", type=options.POSITIVE, default=50_000, help="tokens to route")
    p.add_argument("--text", help="text for the HTML page (default: the split's first story)")
    p.add_argument("--out", required=True, help="output directory")
    options.add_device(p)


def run(args: argparse.Namespace) -> int:
    import slms
    from slms.analysis.evaluate import eval_data_dir
    from slms.analysis.experts import analyse, describe, first_story
    from slms.data.loader import PackedData

    model, tok = slms.load(args.checkpoint, device=args.device)
    if not model.moe_layers():
        raise ValueError(f"{args.checkpoint} is a dense model: it has no experts to analyse")
    data = PackedData(eval_data_dir(args.checkpoint, tok, args.data))
    tokens = data.tokens(args.split)
    text = args.text or first_story(tokens, tok)
    report = analyse(model, tok, tokens, args.out, text, args.max_tokens,
                     title=f"experts of {args.checkpoint}")
    print(describe(report))
    print(f"wrote {args.out}/{{experts.json,expert_load.csv,specialisation.csv,heatmap.png,"
          "experts.html}")
    return 0
