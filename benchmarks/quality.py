"""Quality per minute: candidates trained one after the other for the same wall-clock budget on
the same real text, scored on every byte of held-out text.

Protocol (fixed, deterministic): the stories of `train-lowercase-4mb.txt` (TinyStories, lower
case, one story per line group) are split in order: the last --val-stories stories are held out,
the rest is training text. A 2048-token byte-level BPE is trained on the training text. Each
candidate trains for --minutes of optimizer steps (`train.max_minutes`: evaluation excluded)
and is evaluated every --eval-every steps on the whole held-out split; its score is the best
validation bits per byte (the checkpoint a run keeps in best/).

Candidates:
  baseline      slms with nanoGPT's GPT-2 recipe: learned positions, LayerNorm, GELU, AdamW
                lr 1e-3 cosine, fp32, 4 layers x 128 (configs/nanogpt-cpu.toml)
  modern-dense  configs/modern-cpu.toml
  modern-moe    configs/modern-moe-cpu.toml

    python benchmarks/quality.py [--minutes 10] [--json] [--plot docs/quality.png]

Prints {"candidates": [{"name", "bpb", "steps", "minutes"}], "time_to_baseline": {name:
fraction}}: the fraction of the budget each candidate needed to reach the baseline's final bpb
(linear between evaluations; null if it never did). Skips (exit 0) when the text is absent.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from slms.config import load_config  # noqa: E402
from slms.data.heldout import prepare_held_out  # noqa: E402
from slms.train.metrics import read_metrics  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "tinystories" / "train-lowercase-4mb.txt"
CANDIDATES = {
    "baseline": "configs/nanogpt-cpu.toml",
    "modern-dense": "configs/modern-cpu.toml",
    "modern-moe": "configs/modern-moe-cpu.toml",
}


def run_candidate(name: str, config: str, data: Path, out: Path, minutes: float,
                  eval_every: int, extra: list[str]) -> dict:
    from slms.train.trainer import train

    run = out / name
    overrides = [f"data.path={data}", f"train.max_minutes={minutes}",
                 f"train.eval_every={eval_every}", "train.checkpoint_every=100000", *extra]
    cfg = load_config(ROOT / config, overrides)
    print(f"== {name}: {config} for {minutes:g} minutes", file=sys.stderr, flush=True)
    train(cfg, out_dir=run, log=lambda m: print(m, file=sys.stderr, flush=True))
    evals = [r for r in read_metrics(run) if "val_bits_per_byte" in r]
    steps = max(r["step"] for r in read_metrics(run) if "loss" in r)
    return {"name": name, "config": config, "bpb": min(r["val_bits_per_byte"] for r in evals),
            "steps": steps, "minutes": evals[-1]["train_minutes"],
            "curve": [(r["train_minutes"], r["val_bits_per_byte"]) for r in evals]}


def time_to(curve: list[tuple[float, float]], target: float, minutes: float) -> float | None:
    """Fraction of the budget at which the (minutes, bpb) curve first reaches target."""
    prev = (0.0, float("inf"))
    for t, bpb in curve:
        if bpb <= target:
            if prev[1] == float("inf"):
                return t / minutes
            frac = (prev[1] - target) / (prev[1] - bpb)
            return (prev[0] + frac * (t - prev[0])) / minutes
        prev = (t, bpb)
    return None


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in results:
        xs, ys = zip(*r["curve"], strict=True)
        ax.plot(xs, ys, marker="o", ms=3, label=f"{r['name']} ({r['bpb']:.3f})")
    ax.set_xlabel("training minutes (evaluation excluded)")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "quality")
    p.add_argument("--val-stories", type=int, default=500)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--candidates", default=",".join(CANDIDATES))
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", type=Path, help="PNG of bpb against minutes")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE for every candidate")
    args = p.parse_args()
    if not args.data.is_file():
        print(json.dumps({"skipped": f"{args.data} not found"}))
        return
    data = prepare_held_out(args.data, args.out, args.val_stories, args.vocab_size)
    results = [run_candidate(n, CANDIDATES[n], data, args.out, args.minutes, args.eval_every,
                             args.overrides) for n in args.candidates.split(",")]
    base = next((r for r in results if r["name"] == "baseline"), None)
    ttb = {r["name"]: time_to(r["curve"], base["bpb"], args.minutes) for r in results} if base \
        else {}
    report = {"candidates": [{k: r[k] for k in ("name", "bpb", "steps", "minutes")}
                             for r in results], "time_to_baseline": ttb}
    if args.plot:
        from slms.precision import cpu_model

        plot(results, args.plot, f"{args.minutes:g} minutes each on {cpu_model()}")
    (args.out / "quality.json").write_text(json.dumps(report | {"curves": {
        r["name"]: r["curve"] for r in results}}, indent=1))
    print(json.dumps(report, indent=None if args.json else 1))


if __name__ == "__main__":
    main()
