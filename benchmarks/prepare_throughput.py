"""Throughput and memory of `slms prepare` on real TinyStories text.

Measures, in one run: MB/s with 1 and 2 tokenizer processes and with `--num-proc auto` (the
default) on the 4 MB sample, each the best of --repeats runs taken in turn (so that a busy
neighbour slows every setting alike); then the default and 2 processes on 4x that input, with the
peak resident memory of 1x and 4x (it must not grow with the input: preparation streams).
Projects the time for the full 1.9 GB train split from the default's rate on 4x the input.

    python benchmarks/prepare_throughput.py [--json] [--sample PATH] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FULL_BYTES = 1.9e9  # TinyStories train split, about 1.9 GB of text
DEFAULT_SAMPLE = (Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories"
                  / "train-lowercase-4mb.txt")

CHILD = """
import resource, sys, time
from slms.data.encode import resolve_num_proc
from slms.data.prepare import PrepareOptions, prepare_source
from slms.data.sources import Source, SourceOptions
from slms.tokenizer import Tokenizer
src, tok, out, procs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
procs = procs if procs == "auto" else int(procs)
t0 = time.perf_counter()
meta = prepare_source(Source(src, SourceOptions(separator="newline")), Tokenizer.from_file(tok),
                      out, PrepareOptions(num_proc=procs))
dt = time.perf_counter() - t0
rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
          resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
nbytes = sum(s["bytes"] for s in meta["splits"].values())
print(dt, nbytes, rss / 1024, resolve_num_proc(procs))
"""


def run(src: Path, tok: Path, out: Path, procs: int | str) -> dict[str, float]:
    """One preparation in a fresh process; peak RSS is its own or its largest worker's."""
    res = subprocess.run([sys.executable, "-c", CHILD, str(src), str(tok), str(out), str(procs)],
                         capture_output=True, text=True, check=True)
    dt, nbytes, rss_mb, resolved = map(float, res.stdout.split())
    return {"seconds": dt, "mb_per_s": nbytes / 1e6 / dt, "peak_rss_mb": rss_mb,
            "num_proc": int(resolved)}


def best_of(repeats: int, src: Path, tok: Path, d: Path, settings: list[int | str]
            ) -> dict[int | str, dict[str, float]]:
    """The fastest of `repeats` runs per setting, the settings taken in turn."""
    best: dict[int | str, dict[str, float]] = {}
    for r in range(repeats):
        for procs in settings:
            got = run(src, tok, d / f"p{procs}-{r}", procs)
            if procs not in best or got["mb_per_s"] > best[procs]["mb_per_s"]:
                best[procs] = got
    return best


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def measure(sample: Path, repeats: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        tok = d / "tok.json"
        subprocess.run([sys.executable, "-m", "slms", "tokenizer", "--data", str(sample),
                        "--separator", "newline", "--vocab-size", "2048", "--out", str(tok)],
                       check=True, capture_output=True)
        big = d / "x4.txt"
        big.write_text(sample.read_text() * 4)
        t0 = time.perf_counter()
        one = best_of(repeats, sample, tok, d, [1, 2, "auto"])
        four = best_of(1, big, tok, d / "x4", ["auto", 2])
        total = time.perf_counter() - t0
    return {
        "cpu_model": cpu_model(), "cores": len(os.sched_getaffinity(0)), "repeats": repeats,
        "sample_mb": sample.stat().st_size / 1e6,
        "mb_per_s_1proc": one[1]["mb_per_s"], "mb_per_s_2proc": one[2]["mb_per_s"],
        "mb_per_s_auto": one["auto"]["mb_per_s"], "auto_num_proc": one["auto"]["num_proc"],
        "mb_per_s_auto_4x": four["auto"]["mb_per_s"], "mb_per_s_2proc_4x": four[2]["mb_per_s"],
        "peak_rss_mb_1x": one["auto"]["peak_rss_mb"], "peak_rss_mb_4x": four["auto"]["peak_rss_mb"],
        "peak_rss_mb_2proc_1x": one[2]["peak_rss_mb"],
        "peak_rss_mb_2proc_4x": four[2]["peak_rss_mb"],
        "projected_minutes_1_9gb": FULL_BYTES / 1e6 / four["auto"]["mb_per_s"] / 60,
        "benchmark_seconds": total,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE)
    p.add_argument("--repeats", type=int, default=3, help="runs per setting on the sample")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if not args.sample.is_file():
        sys.exit(f"{args.sample} not found: pass --sample with a TinyStories text file")
    r = measure(args.sample, max(1, args.repeats))
    if args.json:
        print(json.dumps(r, indent=2))
        return
    print(f"{r['cpu_model']}, {r['cores']} cores; sample {r['sample_mb']:.1f} MB, "
          f"best of {r['repeats']}")
    print(f"1 process  : {r['mb_per_s_1proc']:6.2f} MB/s")
    print(f"2 processes: {r['mb_per_s_2proc']:6.2f} MB/s")
    print(f"auto ({r['auto_num_proc']}) : {r['mb_per_s_auto']:6.2f} MB/s  "
          f"peak RSS {r['peak_rss_mb_1x']:6.0f} MB")
    print(f"4x input, auto: {r['mb_per_s_auto_4x']:6.2f} MB/s  peak RSS "
          f"{r['peak_rss_mb_4x']:6.0f} MB; 2 processes: {r['mb_per_s_2proc_4x']:6.2f} MB/s")
    print(f"projected for 1.9 GB: {r['projected_minutes_1_9gb']:.1f} minutes")


if __name__ == "__main__":
    main()
