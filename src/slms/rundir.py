"""A training run's directory, the one place that knows its layout:

    run_config.json      the resolved run config, and the prepared data directory it used
    checkpoints/step-N/  step checkpoints (slms.checkpoint format), the newest few kept
    best/                the checkpoint with the best validation loss so far
    latest               a pointer (text) to the newest step checkpoint
    metrics.jsonl        one JSON record per log line / evaluation
    tensorboard/         TensorBoard events (with train.tensorboard = true)
    loss.png, expert_load.png   the figures of `slms plot`
    .slms.lock           the lock of the process training the run (`slms.lock`): one writer
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from slms.checkpoint import MODEL_FILE, CheckpointError
from slms.fsutil import atomic_write_text, read_json, siblings
from slms.lock import DirLock

RUN_CONFIG = "run_config.json"
LOCK_FILE = ".slms.lock"
_STEP = re.compile(r"^step-(\d+)$")


class RunDir:
    """Paths and small reads/writes of one run directory (which need not exist yet)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def config_file(self) -> Path:
        return self.path / RUN_CONFIG

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tensorboard"

    @property
    def loss_plot(self) -> Path:
        return self.path / "loss.png"

    @property
    def expert_load_plot(self) -> Path:
        return self.path / "expert_load.png"

    def lock(self) -> DirLock:
        """The lock that one process at a time holds while it trains this run (the directory
        must exist when it is acquired)."""
        return DirLock(self.path / LOCK_FILE, f"the run directory {self.path}")

    @property
    def best(self) -> Path:
        return self.path / "best"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    def step_dir(self, step: int) -> Path:
        return self.checkpoints_dir / f"step-{step}"

    def checkpoints(self) -> list[Path]:
        """The step checkpoints, oldest first."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.checkpoints_dir.iterdir()
                 if (m := _STEP.match(p.name))]
        return [p for _, p in sorted(found)]

    def holds_run(self) -> bool:
        """Whether a run was written here (a new run must not overwrite it)."""
        return bool(self.checkpoints()) or self.best.exists()

    def write_config(self, config: dict[str, Any], data_dir: str | Path) -> None:
        resolved = config | {"data_dir": str(data_dir)}
        atomic_write_text(self.config_file, json.dumps(resolved, indent=2) + "\n")

    def read_config(self) -> dict[str, Any]:
        """The resolved run config (with its `data_dir`)."""
        if not self.config_file.is_file():
            raise FileNotFoundError(f"{self.config_file} not found: {self.path} is not a run "
                                    "directory")
        config = read_json(self.config_file, ": the run cannot be resumed (its checkpoints "
                           "still load; start a new run with --out to train on)")
        if not isinstance(config, dict):
            raise ValueError(f"{self.config_file} is not a run config: the run cannot be "
                             "resumed (its checkpoints still load)")
        train = config.get("train")
        if isinstance(train, dict):  # from before train.muon_split: Muon took fused ones whole
            train.setdefault("muon_split", False)
        return config

    def data_dir(self) -> Path | None:
        """The prepared data directory the run trained on, if recorded (and readable)."""
        try:
            d = self.read_config().get("data_dir") if self.config_file.is_file() else None
        except ValueError:
            return None
        return Path(d) if d else None

    @property
    def latest_file(self) -> Path:
        return self.path / "latest"

    def point_latest(self, step: int) -> None:
        """Point `latest` at checkpoints/step-`step` (a path relative to the run directory)."""
        target = self.step_dir(step).relative_to(self.path).as_posix()
        atomic_write_text(self.latest_file, target + "\n")

    def prune(self, keep: int) -> None:
        """Keep the newest `keep` step checkpoints."""
        for p in self.checkpoints()[:-keep] if keep > 0 else []:
            shutil.rmtree(p, ignore_errors=True)

    @classmethod
    def containing(cls, path: str | Path) -> RunDir | None:
        """The run directory that is `path` or holds it as a checkpoint (`best/`,
        `checkpoints/step-N/`), if any."""
        p = Path(path).resolve()
        for d in (p, p.parent, p.parent.parent):
            if (d / RUN_CONFIG).is_file():
                return cls(d)
        return None


def resolve(path: str | Path) -> Path:
    """A checkpoint directory from a run directory (its best/, else its latest checkpoint)
    or a checkpoint directory itself."""
    path = Path(path)
    found = _readable(path)
    if found is not None:
        return found
    if not path.exists():
        raise CheckpointError(f"{path} not found: give a run directory or a checkpoint directory")
    run = RunDir(path)
    best = _readable(run.best)
    if best is not None:
        return best
    ckpts = run.checkpoints()
    if ckpts:
        return ckpts[-1]
    raise CheckpointError(f"{path} holds no checkpoint (no {MODEL_FILE}, best/ or checkpoints/)")


def _readable(path: Path) -> Path | None:
    """`path` if it holds weights, else the newest `.NAME.old-*` copy a crash in the middle of
    a replace left behind (read-only: a reader must not move what a live writer may own)."""
    for p in [path, *reversed(siblings(path, "old"))]:
        if (p / MODEL_FILE).is_file():
            return p
    return None
