"""Throughput and memory of `slms prepare` on real TinyStories text.

Measures, in one run: MB/s with 1 and 2 tokenizer processes on the 4 MB sample, and the peak
resident memory on 1x and 4x that input (it must not grow with the input: preparation streams).
Projects the time for the full 1.9 GB train split from the best rate.

    python benchmarks/prepare_throughput.py [--json] [--sample PATH]
"""

from __future__ import annotations

import argparse
import json
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
from slms.data.prepare import PrepareOptions, prepare_source
from slms.data.sources import Source, SourceOptions
from slms.tokenizer import Tokenizer
src, tok, out, procs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
t0 = time.perf_counter()
meta = prepare_source(Source(src, SourceOptions(separator="newline")), Tokenizer.from_file(tok),
                      out, PrepareOptions(num_proc=procs))
dt = time.perf_counter() - t0
rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
          resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
nbytes = sum(s["bytes"] for s in meta["splits"].values())
print(dt, nbytes, rss / 1024)
"""


def run(src: Path, tok: Path, out: Path, procs: int) -> dict[str, float]:
    res = subprocess.run([sys.executable, "-c", CHILD, str(src), str(tok), str(out), str(procs)],
                         capture_output=True, text=True, check=True)
    dt, nbytes, rss_mb = map(float, res.stdout.split())
    return {"seconds": dt, "mb_per_s": nbytes / 1e6 / dt, "peak_rss_mb": rss_mb}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if not args.sample.is_file():
        sys.exit(f"{args.sample} not found: pass --sample with a TinyStories text file")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        tok = d / "tok.json"
        subprocess.run([sys.executable, "-m", "slms", "tokenizer", "--data", str(args.sample),
                        "--separator", "newline", "--vocab-size", "2048", "--out", str(tok)],
                       check=True, capture_output=True)
        big = d / "x4.txt"
        text = args.sample.read_text()
        big.write_text(text * 4)
        t0 = time.perf_counter()
        one = run(args.sample, tok, d / "p1", 1)
        two = run(args.sample, tok, d / "p2", 2)
        four = run(big, tok, d / "p4", 2)
        total = time.perf_counter() - t0
    best = max(one["mb_per_s"], two["mb_per_s"], four["mb_per_s"])
    result = {
        "sample_mb": args.sample.stat().st_size / 1e6,
        "mb_per_s_1proc": one["mb_per_s"], "mb_per_s_2proc": two["mb_per_s"],
        "mb_per_s_2proc_4x": four["mb_per_s"],
        "peak_rss_mb_1x": two["peak_rss_mb"], "peak_rss_mb_4x": four["peak_rss_mb"],
        "projected_minutes_1_9gb": FULL_BYTES / 1e6 / best / 60,
        "benchmark_seconds": total,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"sample {result['sample_mb']:.1f} MB")
    print(f"1 process : {one['mb_per_s']:6.2f} MB/s  peak RSS {one['peak_rss_mb']:6.0f} MB")
    print(f"2 processes: {two['mb_per_s']:6.2f} MB/s  peak RSS {two['peak_rss_mb']:6.0f} MB")
    print(f"2 processes, 4x input: {four['mb_per_s']:6.2f} MB/s  peak RSS "
          f"{four['peak_rss_mb']:6.0f} MB")
    print(f"projected for 1.9 GB: {result['projected_minutes_1_9gb']:.1f} minutes")


if __name__ == "__main__":
    main()
