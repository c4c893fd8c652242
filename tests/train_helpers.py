"""Helpers for the training-engine tests: tiny run overrides, the CLI in a subprocess with a
fault injected (SIGKILL / SIGTERM at a step, a kill in the middle of a checkpoint write), and a
worker for multi-process (gloo) runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from slms.train.metrics import read_metrics

TINY = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=32",
        "model.moe.expert_hidden=32", "model.dropout=0.1", "train.batch_size=4",
        "train.log_every=1", "train.eval_every=4", "train.checkpoint_every=3",
        "train.warmup_steps=2", "train.threads=2"]

_PRELUDE = """
import os, signal, sys
import slms.train.trainer as T
_step = T.train_step
def _hooked(model, opt, sched, data, tc, block_size, step, env):
    if step == AT:
        os.kill(os.getpid(), getattr(signal, SIG))
    return _step(model, opt, sched, data, tc, block_size, step, env)
"""

_KILL_IN_SAVE = """
import os, signal, sys
import torch
_save = torch.save
def _save_then_die(obj, f, *a, **k):
    if NAME in str(f):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    return _save(obj, f, *a, **k)
torch.save = _save_then_die
"""


def run_cli(args: list[str], signal_at: tuple[str, int] | None = None,
            kill_in_save: str | None = None) -> subprocess.CompletedProcess:
    """`slms ARGS` in a fresh interpreter; signal_at=("SIGKILL", s) sends the signal to itself
    just before step s+1 starts; kill_in_save="step-6" dies while writing that checkpoint."""
    code = ""
    if signal_at:
        code += _PRELUDE.replace("AT", str(signal_at[1])).replace("SIG", repr(signal_at[0]))
        code += "T.train_step = _hooked\n"
    if kill_in_save:
        code += _KILL_IN_SAVE.replace("NAME", repr(kill_in_save))
    code += "from slms.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=180, env=env)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "tokens_per_s" in r]


def val_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in read_metrics(run_dir) if "val_loss" in r]


def dist_worker(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    """One rank of a torchrun-like gloo run of `slms train` (for torch.multiprocessing.spawn)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from slms.config import load_config
    from slms.train.trainer import train

    cfg = load_config("configs/tiny.toml", overrides)
    train(cfg, out_dir=out, log=lambda *a: None)
    # The run is complete and its files are written; what is tested is in them. Skip the
    # interpreter's teardown, where a gloo/FSDP2 rank aborted about once in tens of runs
    # ("terminate called without an active exception") after everything had succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def train_on_fake_clock(monkeypatch, argv, interrupt_at=None, slow_from=None):
    """`slms train ARGV` in this process on a fake clock (every perf_counter call is one
    "second"; from step slow_from on, every other step takes two); SIGINT during step
    interrupt_at (0-based), as a user's Ctrl-C."""
    import os
    import signal
    import time

    import slms.train.trainer as trainer
    from slms.cli import main

    clock = iter(range(10**7))
    monkeypatch.setenv("SLMS_TUNE", "0")  # no kernel timing (it calls perf_counter too)
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(clock)))
    step_fn = trainer.train_step

    def hooked(model, opt, sched, data, tc, block_size, step, env):
        if step == interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)
        if slow_from is not None and step >= slow_from and step % 2:
            time.perf_counter()
        return step_fn(model, opt, sched, data, tc, block_size, step, env)

    monkeypatch.setattr(trainer, "train_step", hooked)
    assert main(argv) == 0
    monkeypatch.setattr(trainer, "train_step", step_fn)
