"""Training state on disk: what a checkpoint must hold for a resumed run to reproduce the
uninterrupted one bit for bit, how a run directory is resumed, and what a new run may take from
another's checkpoint (train.init_from).

Saved: weights (bias-router state included: it is a model buffer), optimizer, scheduler, grad
scaler, step, tokens seen, best validation loss, non-finite step counts, the MoE statistics of the
unfinished log window, the time budget's and the validation watch's state, and every rank's
RNG states (torch, CUDA, numpy, python). Training batches
are a pure function of (seed, step, rank, micro-step), so no loader state is needed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slms import checkpoint as ckpt
from slms import fsutil
from slms.config import RunConfig, model_config_diff, override_text
from slms.model import GPT
from slms.rundir import RunDir, resolve
from slms.tokenizer import Tokenizer
from slms.train import distributed
from slms.train.budget import TimeBudget, ValidationWatch
from slms.train.distributed import Dist


class NonFiniteError(ValueError):
    """Training diverged (non-finite loss, gradients or weights)."""


@dataclass
class State:
    step: int = 0  # optimizer steps completed
    best_val: float = math.inf
    best_step: int = 0  # the step of best/ (0: none yet)
    tokens_seen: int = 0
    bad_steps: int = 0  # non-finite steps skipped in the whole run
    bad_in_row: int = 0
    train_seconds: float = 0.0  # optimizer steps only (evaluation and checkpoints excluded)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_pos": int(np_state[2]), "python": random.getstate()}


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"], 0, 0.0))
    random.setstate(s["python"])


@dataclass
class Run:
    """Everything a checkpoint is written from and restored into."""

    cfg: RunConfig
    run_dir: Path
    model: nn.Module  # possibly wrapped (DDP, FSDP2, torch.compile)
    opt: torch.optim.Optimizer
    sched: Any
    scaler: torch.amp.GradScaler | None
    tokenizer: Tokenizer
    d: Dist
    state: State
    budget: TimeBudget = field(default_factory=lambda: TimeBudget(0.0))
    watch: ValidationWatch = field(default_factory=lambda: ValidationWatch(0))


def save(run: Run, path: Path, val: dict[str, Any] | None = None) -> None:
    """Write a checkpoint (a collective: every rank calls it; rank 0 writes)."""
    weights, optim = distributed.full_state(run.model, run.opt)
    rngs = run.d.gather(rng_state())
    gpt = distributed.unwrap(run.model)
    moe_stats = gpt.moe_stats_state()
    if not run.d.main:
        return
    if weights is not None:  # FSDP: the gathered full weights in a plain CPU model
        gpt = GPT(gpt.cfg)
        gpt.load_state_dict(weights)
    state = run.state
    if not all(bool(torch.isfinite(p).all()) for p in gpt.parameters()):
        raise NonFiniteError(f"the weights at step {state.step} are not finite; not writing "
                             f"{path} (lower train.lr or use train.precision=bf16/fp32)")
    info = {"step": state.step, "run": run.cfg.to_dict(), "tokens_seen": state.tokens_seen}
    if val is not None:
        info["val"] = val
    trainer_state = {
        "step": state.step, "best_val": state.best_val, "best_step": state.best_step,
        "tokens_seen": state.tokens_seen,
        "bad_steps": state.bad_steps, "bad_in_row": state.bad_in_row, "world": run.d.world,
        "optimizer": optim, "scheduler": run.sched.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler else {}, "rng": rngs,
        "moe_stats": moe_stats, "train_seconds": state.train_seconds,
        "budget": dataclasses.asdict(run.budget), "watch": dataclasses.asdict(run.watch),
    }
    ckpt.save_checkpoint(path, gpt, run.tokenizer, info, trainer_state)


def save_step(run: Run) -> Path:
    """Save checkpoints/step-N, point `latest` at it, keep the newest train.keep_checkpoints."""
    run_dir = RunDir(run.run_dir)
    path = run_dir.step_dir(run.state.step)
    save(run, path)
    if run.d.main:
        run_dir.point_latest(run.state.step)
        run_dir.prune(keep=run.cfg.train.keep_checkpoints)
    return path


def newest_intact(run_dir: Path, log=print) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """(checkpoint dir, its weights, its trainer state): the newest checkpoint that loads; a
    damaged one is skipped with a one-line warning."""
    layout = RunDir(run_dir)
    ckpts = layout.checkpoints()
    if not ckpts:
        raise ckpt.CheckpointError(f"{run_dir} has no checkpoints to resume from")
    for path in reversed(ckpts):
        try:
            ts = ckpt.load_trainer_state(path)
            model, _, _ = ckpt.load_checkpoint(path)
            return path, model.state_dict(), ts
        except ckpt.CheckpointError as e:
            log(f"warning: {e}; trying an older checkpoint")
    raise ckpt.CheckpointError(f"no intact checkpoint in {layout.checkpoints_dir} "
                               f"(all {len(ckpts)} are damaged); start a new run")


def check_groups(opt: torch.optim.Optimizer, saved: dict[str, Any], path: Path) -> None:
    """Raise CheckpointError when the checkpoint's optimizer has other parameter groups than
    this run's (the optimizer settings changed between the runs)."""
    if "param_groups" not in saved:  # FSDP's full state dict: checked by torch when it loads
        return
    ours = [len(g["params"]) for g in opt.param_groups]
    theirs = [len(g["params"]) for g in saved["param_groups"]]
    if ours != theirs:
        raise ckpt.CheckpointError(
            f"{path} has optimizer groups of {theirs} tensors, this run {ours}: the optimizer "
            "settings changed (train.optimizer, train.muon_split); resume "
            "with the run's own settings (slms train --resume RUN_DIR)")


def restore(run: Run, log=print) -> None:
    """Load the newest intact checkpoint of run.run_dir into the model, optimizer, scheduler,
    scaler, RNGs and run.state."""
    d = run.d
    warn = log if d.main else (lambda *_: None)
    if d.main:
        recover_run_dir(run.run_dir)  # a checkpoint torn out mid-replace is back before we look
    d.barrier()
    path, weights, ts = newest_intact(run.run_dir, warn)
    check_groups(run.opt, ts["optimizer"], path)
    distributed.load_full_state(run.model, run.opt, weights, ts["optimizer"])
    run.sched.load_state_dict(ts["scheduler"])
    if run.scaler is not None and ts["scaler"]:
        run.scaler.load_state_dict(ts["scaler"])
    rngs = ts["rng"]
    if len(rngs) == d.world:
        set_rng_state(rngs[d.rank])
    else:
        warn(f"warning: {path} was written by {len(rngs)} processes, this run has {d.world}; "
             "random streams (dropout, router noise) restart from the seed")
    distributed.unwrap(run.model).load_moe_stats_state(ts.get("moe_stats", []))
    run.state = State(step=ts["step"], best_val=ts["best_val"], best_step=ts.get("best_step", 0),
                      tokens_seen=ts["tokens_seen"],
                      bad_steps=ts.get("bad_steps", 0), bad_in_row=ts.get("bad_in_row", 0),
                      train_seconds=ts.get("train_seconds", 0.0))
    restore_watchers(run, ts)
    if d.main:
        tidy_run_dir(run.run_dir, run.state.step)
    warn(f"resumed from {path} (step {run.state.step})")


def restore_watchers(run: Run, ts: dict[str, Any]) -> None:
    """The time budget (when the run still has one: train.max_minutes) and the validation
    watch as they were; train.early_stop is the run's own now (it may be changed on resume).
    A checkpoint written before they were saved: the watch's best is the run's best."""
    saved = TimeBudget(**ts["budget"]) if "budget" in ts else None
    if saved is not None and saved.started and run.cfg.train.max_minutes > 0:
        run.budget = saved
    w = ts.get("watch")
    if w is None:
        run.watch = ValidationWatch(run.cfg.train.patience, best=run.state.best_val)
    else:
        last = tuple(w["last"]) if w["last"] is not None else None
        run.watch = ValidationWatch(**{**w, "last": last, "patience": run.cfg.train.patience})


def recover_run_dir(run_dir: Path) -> None:
    """After a crash: put back a best/ or step-N whose replacement was cut short, and drop
    half-written temp checkpoints and files (only while no process writes the run)."""
    fsutil.tidy(run_dir)
    fsutil.tidy(RunDir(run_dir).checkpoints_dir)


def tidy_run_dir(run_dir: Path, step: int) -> None:
    """After a crash: repair and tidy the checkpoints (`recover_run_dir`) and drop the metrics
    logged after `step` (the resumed run logs those steps again)."""
    recover_run_dir(run_dir)
    metrics = RunDir(run_dir).metrics_file
    if metrics.is_file():
        keep = []
        for line in metrics.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line + "\n")
            except (json.JSONDecodeError, KeyError):
                pass  # a line cut short by the crash
        fsutil.atomic_write_text(metrics, "".join(keep))


def resume_target(cfg: RunConfig, out_dir: str | Path | None, resume: str | Path | None
                  ) -> Path | None:
    """The run directory to resume: --resume, or with train.resume=auto the --out directory
    when it holds checkpoints (None: a new run)."""
    if resume:
        return Path(resume)
    if cfg.train.resume == "auto" and out_dir is not None and RunDir(out_dir).checkpoints():
        return Path(out_dir)
    return None


def find_resume(cfg: RunConfig, out_dir: str | Path | None, resume: str | Path | None,
                tokenizer: Tokenizer | None = None) -> Path | None:
    """`resume_target`, whose model and tokenizer must be this run's (`tokenizer`: the
    data's; `check_same_model`)."""
    run_dir = resume_target(cfg, out_dir, resume)
    if run_dir is not None:
        check_same_model(cfg, run_dir, tokenizer)
    return run_dir


def check_same_model(cfg: RunConfig, run_dir: Path, tokenizer: Tokenizer | None = None
                     ) -> None:
    """A resumed run keeps its model and its tokenizer: compare cfg.model with the newest
    readable checkpoint's config.json before a model is built (ValueError naming the keys that
    differ), and the checkpoint's tokenizer with `tokenizer` (the data's)."""
    for path in reversed(RunDir(run_dir).checkpoints()):
        try:
            meta = ckpt.read_config(path)
            trained = ckpt.checkpoint_model_config(path, meta)
            break
        except ckpt.CheckpointError:
            continue
    else:
        return  # nothing readable: restore() reports that
    if tokenizer is not None:
        check_same_tokenizer(meta.get("tokenizer_sha256"), tokenizer, f"cannot resume {run_dir}",
                             path)
    differ = model_config_diff(cfg.model, trained)
    if differ:
        raise ValueError(
            f"cannot resume {run_dir} with "
            + ", ".join(f"{k}={override_text(now)}" for k, now, _ in differ)
            + ": the run was trained with "
            + ", ".join(f"{k}={override_text(then)}" for k, _, then in differ)
            + " (model keys cannot change on resume; start a new run with --out)")


def check_same_tokenizer(trained: str | None, tokenizer: Tokenizer, what: str, path: Path
                         ) -> None:
    """The checkpoint at `path`, whose tokenizer's sha256 is `trained` (None: not recorded, not
    checked), continues on data of `tokenizer` only if it is the same tokenizer: the same ids
    would mean other text."""
    if trained is not None and trained != tokenizer.sha256:
        raise ValueError(f"{what}: {path} was trained with another tokenizer (sha256 "
                         f"{trained[:12]}) than the one the data was prepared with "
                         f"({tokenizer.sha256[:12]}); prepare the data with the checkpoint's "
                         f"tokenizer (slms prepare --tokenizer {path / ckpt.TOKENIZER_FILE})")


# settings a run may change when it starts from a checkpoint's weights: they change neither the
# parameters nor the function the model computes
TRAINING_ONLY = ("model.dropout", "model.attn_dropout", "model.moe.aux_loss_coef",
                 "model.moe.z_loss_coef", "model.moe.capacity_factor",
                 "model.moe.bias_update_rate")


def load_weights_into(model: GPT, path: str | Path, tokenizer: Tokenizer | None = None
                      ) -> Path:
    """train.init_from: copy the weights of the checkpoint (or run directory) `path` into
    `model`, whose config must equal the checkpoint's but for TRAINING_ONLY settings, and whose
    data's `tokenizer` must be the checkpoint's; returns the checkpoint used."""
    path_used = resolve(path)
    source, source_tok, _ = ckpt.load_checkpoint(path_used)
    if tokenizer is not None:
        check_same_tokenizer(source_tok.sha256, tokenizer, f"train.init_from={path}", path_used)
    differ = model_config_diff(model.cfg, source.cfg, ignore=TRAINING_ONLY)
    if differ:
        shown = ", ".join(f"{k}={override_text(mine)} (checkpoint: {override_text(theirs)})"
                          for k, mine, theirs in differ)
        raise ckpt.CheckpointError(f"train.init_from={path}: the run's model config differs "
                                   f"from the checkpoint's: {shown}")
    model.load_state_dict(source.state_dict())
    return path_used
