"""Do a model's stories keep their characters' names? Distinct character names per story.

The embedded corpus (slms.corpus) draws each story's names at random from fixed lists and keeps
them: a story names its hero and sometimes a friend. A model that has not learned to copy a name
from earlier in its context picks a new one at every mention. For each run this generates
--stories stories from "Once upon a time" (the demo's sampling: temperature 0.7, top-k 40, seeds
0 .. N-1) and counts the distinct corpus names in each; the corpus itself is counted the same way
over --stories of its own stories.

    python benchmarks/demo_names.py RUN_OR_CHECKPOINT [...] [--stories 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics

from slms.corpus import BOY_NAMES, GIRL_NAMES, PET_NAMES, generate_stories
from slms.infer.generate import Sampling, generate_text

NAMES = frozenset(GIRL_NAMES + BOY_NAMES + PET_NAMES)
PROMPT = "Once upon a time"


def distinct_names(text: str) -> int:
    return len({w for w in re.findall(r"[A-Z][a-z]+", text) if w in NAMES})


def summary(counts: list[int]) -> dict:
    return {"mean_names": round(statistics.mean(counts), 3), "max_names": max(counts),
            "share_at_most_2": round(sum(c <= 2 for c in counts) / len(counts), 3)}


def run_names(path: str, stories: int) -> dict:
    from slms.checkpoint import load_checkpoint
    from slms.rundir import resolve

    model, tok, _ = load_checkpoint(resolve(path))
    counts = [distinct_names(generate_text(model, tok, PROMPT, Sampling(
        max_new_tokens=220, temperature=0.7, top_k=40, seed=seed))) for seed in range(stories)]
    return summary(counts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", help="run or checkpoint directories")
    p.add_argument("--stories", type=int, default=20)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    report = {"corpus": summary([distinct_names(s) for s in
                                 generate_stories(500, seed=123)])}
    report |= {run: run_names(run, args.stories) for run in args.runs}
    if args.json:
        print(json.dumps(report))
        return
    for name, r in report.items():
        print(f"{name}: {r['mean_names']:.2f} names per story (max {r['max_names']}, "
              f"{100 * r['share_at_most_2']:.0f}% with at most 2)")


if __name__ == "__main__":
    main()
