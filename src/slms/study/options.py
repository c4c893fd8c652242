"""What `slms study` compares and on what budget: StudyOptions, torch-free so that the command
line builds its options (and their defaults) from these fields."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from slms.config import MAX_STEPS, Router, check_numbers
from slms.ranges import num

QUICK_OVERRIDES = (  # --quick: a tiny model on a small embedded corpus, seconds per variant
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=64",
    "data.stories=400", "data.vocab_size=300", "train.batch_size=8", "train.precision=fp32",
    "train.warmup_steps=5", "train.threads=1")
QUICK_DENSE_STEPS = 30


@dataclass(frozen=True)
class StudyOptions:
    """The base config, the budget per variant, the variants, and where the data and the results
    are."""

    config: Path
    out: Path
    overrides: tuple[str, ...] = ()
    flops: float = num(0.0, 0)  # budget per variant; 0: dense_steps or minutes
    dense_steps: int = num(0, 0, MAX_STEPS)  # budget = this many steps of the dense model
    minutes: float = num(0.0, 0, 10**7)  # budget = minutes of optimizer steps per variant
    experts: tuple[int, ...] = (4, 8, 16)
    top_ks: tuple[int, ...] = (1, 2)
    router: Router = "bias"  # of the MoE variants (and the upcycled one)
    upcycle: tuple[int, int] | None = (8, 2)  # (experts, top_k); None: no upcycled variant
    # slms.upcycle's expert_noise. The new router already spreads tokens over the experts, so
    # exact copies drift apart from the first step; a little noise makes them differ at once,
    # so the router's LM-loss gradient is not zero at step 0 either.
    upcycle_noise: float = num(0.01, 0)
    evals: int = num(10, 2, 10**6)  # evaluations per run (FLOPs budget)
    eval_every: int = num(50, 1, MAX_STEPS)  # steps between evaluations (minutes budget)
    data: str | None = None  # a text file (held out in order), a prepared dir, or a source
    val_stories: int = num(500, 1, 10**9)
    separator: str = "newline"

    def validate(self) -> None:
        check_numbers(self, "study")
        given = sum(x > 0 for x in (self.flops, self.dense_steps, self.minutes))
        if given != 1:
            raise ValueError("give exactly one budget: --flops F, --dense-steps N or --minutes M")
        if not self.experts or not self.top_ks or min(self.experts) < 1 or min(self.top_ks) < 1:
            raise ValueError("--experts and --top-k need positive numbers, e.g. --experts 4,8,16")
        if max(self.top_ks) > min(self.experts):
            raise ValueError(f"--top-k {max(self.top_ks)} is more than the fewest experts "
                             f"({min(self.experts)})")
        if self.evals < 2 or self.eval_every < 1:
            raise ValueError("--evals must be >= 2 and --eval-every >= 1")
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise ValueError(f"--out {self.out} already exists and is not empty; choose another "
                             "directory")
