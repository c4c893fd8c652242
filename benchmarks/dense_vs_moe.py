"""Dense vs MoE for the same training compute, and the dense model upcycled halfway: a thin
wrapper of `slms study` (src/slms/study/), so that the benchmark and the command are one code.

    python benchmarks/dense_vs_moe.py --dense-steps 200 --evals 8 --out /tmp/study
    python benchmarks/dense_vs_moe.py --dense-steps 200 --evals 8 \\
        --data ../shared/data/tinystories/train-lowercase-4mb.txt --out /tmp/study-ts

Every argument is `slms study`'s (`slms study --help`). Results and the commands that produced
them: docs/dense_vs_moe.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from slms.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["study", *sys.argv[1:]]))
