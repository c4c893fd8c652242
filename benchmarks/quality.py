"""Quality per budget at several data sizes: candidates trained one after the other for the same
budget on the same real text, each scored once, on every byte of held-out stories, with the
checkpoint its own validation chose.

Protocol (fixed, deterministic): the stories of `train-lowercase-4mb.txt` (TinyStories, lower
case) are split in order: the last --val-stories stories are held out, the rest is training
text. For each --sizes entry (MB of story text) the first stories of the training text up to
that size are written to a file, and every candidate trains on that file as a user would
(`data.path=FILE`): slms trains its tokenizer on it and carves its own validation split out of
it, which drives best/ and early stopping. Only after every run is done are the held-out
stories read: each run's best/ checkpoint scores them (tokenized with the run's own tokenizer;
bits per byte do not depend on it). Nothing a run does can see them.

Budget: --minutes per candidate (`train.max_minutes`: evaluation excluded), or --steps (a fixed
step count, for comparisons that the machine's other work cannot move).

Candidates (--candidates, comma-separated):
  baseline      slms with nanoGPT's GPT-2 recipe: learned positions, LayerNorm, GELU, AdamW
                lr 1e-3 cosine, fp32, 4 layers x 128 (configs/nanogpt-cpu.toml)
  modern-fixed  configs/modern-cpu.toml with train.adapt=false: the recipe tuned at 1M tokens
  adaptive      configs/modern-cpu.toml: the recipe that adapts to the data and the budget
  adaptive-moe  configs/modern-moe-cpu.toml, its MoE twin
  modern-dense, modern-moe: aliases of adaptive, adaptive-moe

    python benchmarks/quality.py [--sizes 0.2,0.7,4] [--minutes 10 | --steps N] [--json]
        [--plot docs/quality.png] [KEY=VALUE ...]

Prints {"sizes": [{"megabytes", "stories", "bytes", "candidates": [{"name", "bpb",
"best_step", "steps", "minutes", "ended"}]}], "held_out": {"stories", "bytes"}}. Skips (exit 0)
when the text is absent.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from slms.checkpoint import read_config  # noqa: E402
from slms.config import load_config  # noqa: E402
from slms.data.heldout import read_stories, split_text, training_prefix  # noqa: E402
from slms.rundir import RunDir  # noqa: E402
from slms.train.metrics import read_metrics  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "tinystories" / "train-lowercase-4mb.txt"
CANDIDATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "baseline": ("configs/nanogpt-cpu.toml", ()),
    "modern-fixed": ("configs/modern-cpu.toml", ("train.adapt=false",)),
    "adaptive": ("configs/modern-cpu.toml", ()),
    "adaptive-moe": ("configs/modern-moe-cpu.toml", ()),
}
ALIASES = {"modern-dense": "adaptive", "modern-moe": "adaptive-moe"}


@dataclass
class Trained:
    """One candidate's run at one size, before held-out scoring."""

    name: str
    megabytes: float
    run_dir: Path
    steps: int
    best_step: int | None
    minutes: float
    ended: str | None  # the run's own account of why it stopped before its budget, if it did
    bpb: float | None = None  # held-out bits per byte of best/, set by `score`
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, validation bpb)


def run_candidate(name: str, train_file: Path, megabytes: float, out: Path, budget: list[str],
                  eval_every: int, extra: list[str], log=None) -> Trained:
    """Train one candidate on `train_file` (its validation split carved from it)."""
    from slms.train.trainer import train

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    config, fixed = CANDIDATES[ALIASES.get(name, name)]
    run = out / f"{megabytes:g}mb" / name
    overrides = [f"data.path={train_file}", f"data.cache_dir={out / 'cache'}", *budget,
                 f"train.eval_every={eval_every}", "train.checkpoint_every=100000", *fixed,
                 *extra]
    cfg = load_config(ROOT / config, overrides)
    log(f"== {name} at {megabytes:g} MB: {config} {' '.join([*budget, *fixed, *extra])}")
    ended: list[str] = []

    def record(message: str) -> None:
        if message.startswith(("early stop", "stopped")):
            ended.append(message)
        log(message)

    train(cfg, out_dir=run, log=record)
    rows = read_metrics(run)
    evals = [(r["step"], r["val_bits_per_byte"]) for r in rows if "val_bits_per_byte" in r]
    steps = max(r["step"] for r in rows if "loss" in r)
    best = RunDir(run).best
    best_step = read_config(best)["step"] if best.is_dir() else None
    minutes = max((r.get("train_minutes", 0.0) for r in rows), default=0.0)
    return Trained(name, megabytes, run, steps, best_step, minutes,
                   ended[-1] if ended else None, curve=evals)


def score(trained: list[Trained], held_out: Path, out: Path) -> None:
    """Held-out bits per byte of each run's best/ checkpoint (the held-out stories prepared
    once per tokenizer). Called after every run is done."""
    import slms
    from slms.analysis.evaluate import evaluate
    from slms.data.heldout import input_key
    from slms.data.loader import PackedData
    from slms.data.prepare import META, prepare

    stories = read_stories(held_out)
    for t in trained:
        model, tok = slms.load(RunDir(t.run_dir).best)
        data = out / "held-out" / input_key(tokenizer=tok.sha256, stories=len(stories))
        if not (data / META).is_file():
            # (prepare wants a training split: one story; only val is scored)
            prepare({"train": stories[:1], "val": stories}, tok, data, source=str(held_out))
        t.bpb = evaluate(model, PackedData(data), "val")["bits_per_byte"]


def plot(sizes: list[dict], path: Path, title: str) -> None:
    """Held-out bits per byte against training-text size, one line per candidate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    names = [c["name"] for c in sizes[0]["candidates"]]
    for name in names:
        xs = [s["bytes"] / 1e6 for s in sizes]
        ys = [next(c["bpb"] for c in s["candidates"] if c["name"] == name) for s in sizes]
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("training text (MB)")
    ax.set_ylabel("held-out bits per byte (best/ by own validation)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=10.0)
    budget.add_argument("--steps", type=int, help="a fixed step count instead of --minutes")
    p.add_argument("--sizes", default="0.2,0.7,4", help="MB of training text, comma-separated")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "quality")
    p.add_argument("--val-stories", type=int, default=500, help="held-out stories")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--candidates", default="baseline,modern-fixed,adaptive,adaptive-moe")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", type=Path, help="PNG of held-out bpb against data size")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE for every candidate")
    args = p.parse_args()
    if not args.data.is_file():
        print(json.dumps({"skipped": f"{args.data} not found"}))
        return
    names = args.candidates.split(",")
    unknown = [n for n in names if ALIASES.get(n, n) not in CANDIDATES]
    if unknown:
        p.error(f"unknown candidates {unknown}; choose from {[*CANDIDATES, *ALIASES]}")
    budget = ([f"train.max_steps={args.steps}", "train.max_minutes=0"] if args.steps
              else [f"train.max_minutes={args.minutes}"])
    text = split_text(args.data, args.out, args.val_stories)
    trained: list[Trained] = []
    prefixes = {}
    for mb in (float(s) for s in args.sizes.split(",")):
        prefixes[mb] = training_prefix(text / "train.txt", args.out, mb)
        trained += [run_candidate(n, prefixes[mb][0], mb, args.out, budget, args.eval_every,
                                  args.overrides) for n in names]
    score(trained, text / "valid.txt", args.out)  # the first read of the held-out stories
    sizes = [{"megabytes": mb, "stories": n, "bytes": path.stat().st_size,
              "candidates": [{"name": t.name, "bpb": t.bpb, "best_step": t.best_step,
                              "steps": t.steps, "minutes": t.minutes, "ended": t.ended}
                             for t in trained if t.megabytes == mb]}
             for mb, (path, n) in prefixes.items()]
    held = text / "valid.txt"
    report = {"sizes": sizes, "held_out": {"stories": args.val_stories,
                                           "bytes": held.stat().st_size}}
    if args.plot:
        from slms.precision import cpu_model

        what = f"{args.steps} steps" if args.steps else f"{args.minutes:g} minutes"
        plot(sizes, args.plot, f"{what} each on {cpu_model()}")
    (args.out / "quality.json").write_text(json.dumps(report | {"curves": {
        f"{t.megabytes:g}mb/{t.name}": t.curve for t in trained}}, indent=1))
    print(json.dumps(report, indent=None if args.json else 1))


if __name__ == "__main__":
    main()
