"""The training loop. `train()` reads as a table of contents; the details are named functions."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import random
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from slms.analysis.evaluate import evaluate
from slms.config import RunConfig, TrainConfig
from slms.data.loader import PackedData
from slms.data.pipeline import resolve_data
from slms.devices import resolve_device
from slms.lock import LockedError
from slms.memory import keep_freed_memory
from slms.model import GPT, count_params, flops_per_token
from slms.model.gpt import DOCUMENT_START_ID
from slms.precision import DTYPES, auto_reason, resolve_precision
from slms.rundir import RunDir
from slms.tokenizer import Tokenizer
from slms.train import adapt, distributed
from slms.train.budget import PROBE_STEPS, PROVISIONAL_STEPS, TimeBudget, ValidationWatch
from slms.train.distributed import Dist, unwrap
from slms.train.metrics import (
    MetricsWriter,
    console_line,
    memory_gb,
    moe_summary,
    peak_flops,
)
from slms.train.optim import build_optimizer, build_scheduler, schedule_of
from slms.train.signals import StopRequest
from slms.train.state import (
    NonFiniteError,
    Run,
    State,
    find_resume,
    load_weights_into,
    restore,
    resume_target,
    save,
    save_step,
)
from slms.train.step import Env, StepResult, train_step
from slms.train.summary import early_stop_summary, final_summary


class DataMismatchError(ValueError):
    """The prepared data does not fit the model (vocab size, tokenizer)."""


def train(cfg: RunConfig, out_dir: str | Path | None = None, resume: str | Path | None = None,
          log=print) -> Path:
    """Train `cfg`; returns the run directory (checkpoints, best/, metrics.jsonl, config).

    `resume` (or train.resume=auto with an `out_dir` holding checkpoints) continues a run from
    its newest intact checkpoint, reproducing the uninterrupted run exactly. Under torchrun each
    process trains on its own micro-batches and only rank 0 writes files and prints.
    """
    cfg.validate()  # a config made in code is held to the loader's rules
    env, precision = setup(cfg.train)
    log = log if env.dist.main else _quiet
    if cfg.train.precision == "auto":
        log(f"precision: auto -> {precision} ({auto_reason(env.device)})")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))
    run = None
    locks = contextlib.ExitStack()  # the run directory's, held until the run ends
    try:
        data = load_data(cfg, env.dist, log)
        tokenizer = Tokenizer.from_file(data.dir / "tokenizer.json")
        cfg = resolve_steps(fit_vocab(cfg, data, tokenizer), data, env.dist)
        cfg = adapt.at_start(cfg, data.train_tokens, global_batch_tokens(cfg, env.dist.world),
                             resume_target(cfg, out_dir, resume), log)
        run = build_run(cfg, env, tokenizer, out_dir, resume, log, locks)
        if env.dist.main:
            write_run_config(run.run_dir, cfg, data)
        metrics = MetricsWriter(RunDir(run.run_dir).metrics_file, enabled=env.dist.main,
                                tensorboard=cfg.train.tensorboard)
        announce(run, data, log)
        with StopRequest(verbose=env.dist.main) as stop:
            loop(run, data, env, metrics, stop, log)
        metrics.close()
        return run.run_dir
    finally:
        if env.dist.enabled:
            # DDP/FSDP modules hold the process group: free them while it is alive, not at
            # interpreter exit after it is gone (a rank aborted there, rarely, under FSDP2).
            run = None
            gc.collect()
        locks.close()
        distributed.shutdown(env.dist)


def loop(run: Run, data: PackedData, env: Env, metrics: MetricsWriter, stop: StopRequest,
         log) -> None:
    """Steps until train.max_steps, a stop request or an early stop; logs, evaluates and
    checkpoints. The progress bar is closed whatever happens, so an error starts its line."""
    bar = tqdm(total=run.cfg.train.max_steps, initial=run.state.step, desc="train",
               unit="step", dynamic_ncols=True, disable=not env.dist.main)
    try:
        ended = steps(run, data, env, metrics, stop, bar, log)
    finally:
        bar.close()
    log(ended or final_summary(run, data))


def steps(run: Run, data: PackedData, env: Env, metrics: MetricsWriter, stop: StopRequest,
          bar, log) -> str | None:
    """The training steps of `loop`; returns why it ended early (None: max_steps reached)."""
    state = run.state
    meter = Meter(run.cfg, env)
    budget, watch = run.budget, run.watch
    while state.step < run.cfg.train.max_steps:
        t0 = time.perf_counter()
        result = train_step(run.model, run.opt, run.sched, data, run.cfg.train,
                            run.cfg.model.block_size, state.step, env)
        state.step += 1
        dt = time.perf_counter() - t0
        state.train_seconds += dt
        proposal = budget.record(dt)
        if proposal is not None:  # the same steps on every rank; rank 0's measurement counts
            fitted = budget.accept(env.dist.gather(proposal)[0])
            if fitted is not None:  # the budget counts its own steps: after train.init_step
                fix_max_steps(run, run.cfg.train.init_step + fitted, bar, log)
            if run.cfg.train.adapt and budget.settled_now:
                adapt_live(run, data, bar, bar.write)
        tc = run.cfg.train
        state.tokens_seen += result.tokens
        meter.tokens += result.tokens
        watch.add_train(result.loss)
        guard_non_finite(run, result, metrics, bar.write)
        last = state.step == tc.max_steps
        stopping = env.dist.any(stop.requested is not None, env.device)
        if state.step % tc.log_every == 0 or last or stopping:
            log_step(run, result, meter, metrics, bar)
        early = False
        if state.step % tc.eval_every == 0 or last:
            val = run_eval(run, data, env, metrics, bar.write, state.train_seconds / 60)
            meter.restart()  # evaluation time is not training throughput
            early = watch_validation(watch, val["loss"], run, bar.write) and not last
        if state.step % tc.checkpoint_every == 0 or last or stopping or early:
            path = save_step(run)
        bar.update(1)
        if early:
            return early_stop_summary(run, data, watch)
        if stopping:
            return (f"stopped by {stop.requested or 'another rank'} at step {state.step}; "
                    f"checkpoint saved in {path}; continue with: slms train --resume "
                    f"{run.run_dir}")
    return None


def adapt_live(run: Run, data: PackedData, bar, log) -> None:
    """`adapted` once the time budget has settled (`TimeBudget.settled_now`): the model's
    dropout and the optimizer's weight decay set in place; a capped step count ends the
    budget's fitting (the schedule anneals over the capped steps); the run's config rewritten
    with them."""
    tc = run.cfg.train
    fitted = tc.max_steps
    run.cfg = adapt.adapted(run.cfg, data.train_tokens, global_batch_tokens(run.cfg, run.d.world),
                            f"{tc.max_minutes:g} minutes", log if run.d.main else _quiet)
    unwrap(run.model).set_dropout(run.cfg.model.dropout)
    adapt.set_weight_decay(run.opt, run.model, run.cfg.train.weight_decay)
    if run.cfg.train.max_steps < fitted:
        run.budget.minutes, run.budget.times = 0, []  # fitted for good: no refit fills it
        fix_max_steps(run, run.cfg.train.max_steps, bar, _quiet)
    elif run.d.main:
        run_dir = RunDir(run.run_dir)
        run_dir.write_config(run.cfg.to_dict(), run_dir.data_dir())


def watch_validation(watch: ValidationWatch, val_loss: float, run: Run, write) -> bool:
    """Record an evaluation; warn of overfitting; True when train.early_stop says stop."""
    warning = watch.evaluated(val_loss)
    if warning and run.d.main:
        write(f"step {run.state.step}: warning: {warning}")
    return watch.should_stop


def fix_max_steps(run: Run, steps: int, bar, log) -> None:
    """train.max_minutes, at each fit: max_steps set, the schedule continued over it from this
    step (the lr stays continuous), and the count written to the run's config for the reader
    (a resumed run takes it, and the budget's state, from its checkpoint)."""
    tc = dataclasses.replace(run.cfg.train, max_steps=max(steps, run.state.step))
    run.cfg = dataclasses.replace(run.cfg, train=tc)
    schedule_of(run.sched).refit(run.state.step, tc.max_steps)
    if run.d.main:
        run_dir = RunDir(run.run_dir)
        data_dir = run_dir.data_dir()
        run_dir.write_config(run.cfg.to_dict(), data_dir)
    bar.total = tc.max_steps
    bar.refresh()
    log(f"time budget: {tc.max_steps} steps fit (fitted at step {run.state.step})")


def _quiet(*args: Any, **kwargs: Any) -> None:
    pass


def setup(tc: TrainConfig) -> tuple[Env, str]:
    """The device, process group, autocast and loss scaler of a run, and its precision
    (train.precision with "auto" resolved: every rank takes rank 0's measurement)."""
    d = distributed.init(tc.device)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = distributed.device_for(d, resolve_device(tc.device, "train.device"))
    if device.type == "cpu" and tc.keep_freed_memory:
        keep_freed_memory()
    seed_everything(tc.seed)
    precision = d.gather(resolve_precision(tc.precision, device))[0]
    dtype = DTYPES[precision]
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                else nullcontext())
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return Env(device, autocast, scaler, d), precision


def load_data(cfg: RunConfig, d: Dist, log) -> PackedData:
    """The prepared data; rank 0 prepares (and caches) it first, the other ranks then read it."""
    if not d.main:
        d.barrier()
    data_dir = resolve_data(cfg.data, seed=cfg.data.seed, log=log)
    if d.main:
        d.barrier()
    return PackedData(data_dir)


def global_batch_tokens(cfg: RunConfig, world: int) -> int:
    """Token positions per optimizer step: micro batch x accumulation x processes x block."""
    tc = cfg.train
    return tc.batch_size * tc.grad_accum * world * cfg.model.block_size


def epoch_size(cfg: RunConfig, data: PackedData, world: int) -> tuple[int, int]:
    """(units in one epoch, units per optimizer step): training tokens and token positions per
    step (packed), or rows and rows per step (padded: a step's rows are mostly pads, so
    positions would count about a fifth of an epoch)."""
    split = data.meta["splits"]["train"]
    if data.padded:
        tc = cfg.train
        return split["rows"], tc.batch_size * tc.grad_accum * world
    return split["tokens"], global_batch_tokens(cfg, world)


def resolve_steps(cfg: RunConfig, data: PackedData, d: Dist) -> RunConfig:
    """With train.epochs > 0, max_steps = ceil(epochs * epoch size / step size), so schedules
    are computed from the true total. With train.max_minutes the total is provisional (the
    time budget fixes it after its probe, `fix_max_steps`)."""
    tc = cfg.train
    if tc.max_minutes > 0:
        return dataclasses.replace(cfg, train=dataclasses.replace(tc, max_steps=PROVISIONAL_STEPS))
    if tc.epochs <= 0:
        return cfg
    size, per_step = epoch_size(cfg, data, d.world)
    steps = max(1, math.ceil(tc.epochs * size / per_step))
    return dataclasses.replace(cfg, train=dataclasses.replace(tc, max_steps=steps))


def build_run(cfg: RunConfig, env: Env, tokenizer: Tokenizer, out_dir: str | Path | None,
              resume: str | Path | None, log, locks: contextlib.ExitStack) -> Run:
    """Model (wrapped for DDP/FSDP/compile), optimizer, schedule; restored when resuming. The
    run directory's lock goes on `locks` before anything in the directory is read to be
    changed (a second writer is refused, naming the first)."""
    tc, d = cfg.train, env.dist
    resume_dir = find_resume(cfg, out_dir, resume, tokenizer)
    gpt = GPT(cfg.model).to(env.device)  # same init on every rank (same seed)
    if tc.init_from and not resume_dir:  # a resumed run has its own weights
        # before the run directory exists: a refused checkpoint leaves nothing behind
        log(f"weights from {load_weights_into(gpt, tc.init_from, tokenizer)}")
    if resume_dir:
        if resume_dir.is_dir():  # else restore() says there is nothing to resume
            lock_run_dir(resume_dir, d, locks)
        run_dir = resume_dir
    else:
        run_dir = make_run_dir(cfg, out_dir, d, locks)
    gpt.grad_checkpointing = tc.grad_checkpointing
    if d.rank:
        torch.manual_seed(tc.seed + d.rank)  # own dropout / router-noise stream per rank
    model = distributed.wrap(gpt, tc.parallel, d, env.device, tc.compile)
    opt = build_optimizer(model, tc, env.device)
    sched = build_scheduler(opt, tc)
    state = State(step=tc.init_step)  # 0 unless it continues another run (train.init_step)
    run = Run(cfg, run_dir, model, opt, sched, env.scaler, tokenizer, d, state,
              TimeBudget(tc.max_minutes), ValidationWatch(tc.patience))
    if resume_dir:
        restore(run, log)
        continue_schedule(run, log)
    elif tc.init_step:
        planned = tc.init_total or tc.max_steps
        log(f"continues that run at step {tc.init_step}: its batches from there, its schedule "
            f"(planned over {planned} steps) at lr x {schedule_of(sched)(tc.init_step):.4f}")
    return run


def continue_schedule(run: Run, log) -> None:
    """A resumed run's step count and schedule: those of its checkpoint under a time budget
    (never the provisional 10**9 of `resolve_steps`: the budget's restored state refits it);
    otherwise train.max_steps, the schedule's remaining progress spread over it when it
    changed (the lr continues from where the run was)."""
    tc, schedule = run.cfg.train, schedule_of(run.sched)
    if tc.max_minutes > 0:
        if run.budget.started:  # the checkpoint's budget
            tc = dataclasses.replace(tc, max_steps=schedule.total)
            run.cfg = dataclasses.replace(run.cfg, train=tc)
        return
    if tc.max_steps != schedule.total:
        schedule.refit(run.state.step, tc.max_steps)
        log(f"schedule: continues from step {run.state.step} to train.max_steps="
            f"{tc.max_steps} (it was planned for {schedule.total})")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def fit_vocab(cfg: RunConfig, data: PackedData, tokenizer: Tokenizer) -> RunConfig:
    """The config with model.vocab_size taken from the data when unset; a mismatch between
    data, tokenizer and model (vocab, tokenizer file, the document mask's story boundary) is an
    error."""
    if data.meta.get("tokenizer_sha256") not in (None, tokenizer.sha256):
        raise DataMismatchError(f"{data.dir}/tokenizer.json is not the tokenizer the data was "
                                "prepared with; prepare the data again")
    mcfg = cfg.model
    if mcfg.vocab_size is None:
        mcfg = dataclasses.replace(mcfg, vocab_size=data.vocab_size)
        cfg = dataclasses.replace(cfg, model=mcfg)
    if data.vocab_size != mcfg.vocab_size:
        raise DataMismatchError(
            f"the data in {data.dir} was tokenized with a {data.vocab_size}-token vocab but "
            f"model.vocab_size is {mcfg.vocab_size}; set model.vocab_size={data.vocab_size} "
            "(or leave it out), or prepare the data with a matching tokenizer")
    if mcfg.document_mask and tokenizer.eos_id != DOCUMENT_START_ID:
        raise DataMismatchError(
            f"model.document_mask splits stories at token id {DOCUMENT_START_ID}, but the data "
            f"in {data.dir} ends stories with id {tokenizer.eos_id} (a tokenizer not trained by "
            "`slms tokenizer`, e.g. an imported seed one); set model.document_mask=false, or "
            "prepare the data with a tokenizer from `slms tokenizer`")
    return cfg


def make_run_dir(cfg: RunConfig, out_dir: str | Path | None, d: Dist,
                 locks: contextlib.ExitStack) -> Path:
    """A new run's directory, created and locked; refused when it holds a run already."""
    if out_dir is None:
        stamp = d.gather(datetime.now().strftime("%Y%m%d-%H%M%S"))[0]  # rank 0's, on all ranks
        out_dir = Path("runs") / f"{cfg.name}-{stamp}"
    out_dir = Path(out_dir)
    for locked in (False, True):  # before anything is made; again once no one else can save
        if RunDir(out_dir).holds_run():
            raise FileExistsError(f"{out_dir} already holds a run; resume it with --resume "
                                  f"{out_dir} (or train.resume=auto), or choose another --out")
        if not locked:
            if d.main:
                out_dir.mkdir(parents=True, exist_ok=True)
            lock_run_dir(out_dir, d, locks)
    return out_dir


def lock_run_dir(run_dir: Path, d: Dist, locks: contextlib.ExitStack) -> None:
    """Rank 0 takes the run directory's lock (`RunDir.lock`); when another process holds it,
    every rank raises its LockedError (so none waits for the others at a barrier)."""
    refused = None
    if d.main:
        try:
            locks.enter_context(RunDir(run_dir).lock())
        except LockedError as e:
            refused = str(e)
    refused = d.gather(refused)[0]
    if refused:
        raise LockedError(refused)


def write_run_config(run_dir: Path, cfg: RunConfig, data: PackedData) -> None:
    RunDir(run_dir).write_config(cfg.to_dict(), data.dir)


def announce(run: Run, data: PackedData, log) -> None:
    cfg, d = run.cfg, run.d
    counts = count_params(unwrap(run.model))
    tc = cfg.train
    tokens = data.train_tokens
    per_step = global_batch_tokens(cfg, d.world)
    size, units_per_step = epoch_size(cfg, data, d.world)
    log(f"model: {counts['params_total']:,} parameters, {counts['params_active']:,} active per "
        f"token ({'MoE' if cfg.model.moe else 'dense'}, {cfg.model.n_layer} layers, "
        f"n_embd {cfg.model.n_embd})")
    procs = f" x {d.world} processes ({tc.parallel})" if d.enabled else ""
    log(f"data: {data.dir} ({tokens:,} training tokens); global batch {per_step:,} tokens per "
        f"step = {tc.batch_size} x {tc.grad_accum} accumulation{procs} x "
        f"{cfg.model.block_size} tokens; " + (
            f"{tc.max_minutes:g} minutes of training (the step count is fitted after timing "
            f"the first {PROBE_STEPS} steps, and refitted as the run goes)"
            if tc.max_minutes > 0 else
            f"{tc.max_steps} steps = {tc.max_steps * units_per_step / size:.2f} epochs"))
    log(f"run directory: {run.run_dir}")


class Meter:
    """Throughput over the current log window, and what it means (MFU, memory)."""

    def __init__(self, cfg: RunConfig, env: Env):
        tc = cfg.train
        self.flops_per_token = flops_per_token(cfg.model)
        peak = peak_flops(env.device, tc.precision, tc.peak_flops)
        self.peak = peak * env.dist.world if peak else None
        self.device = env.device
        self.restart()

    def restart(self) -> None:
        self.start, self.tokens = time.perf_counter(), 0

    def read(self) -> dict[str, Any]:
        tps = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        mem, kind = memory_gb(self.device)
        mfu = self.flops_per_token * tps / self.peak if self.peak else None
        self.restart()
        return {"tokens_per_s": tps, "mfu": mfu, "memory_gb": mem, "memory_kind": kind}


def guard_non_finite(run: Run, result: StepResult, metrics: MetricsWriter, write) -> None:
    """Count skipped steps; train.max_bad_steps in a row stop the run."""
    state = run.state
    if not result.skipped:
        state.bad_in_row = 0
        return
    state.bad_steps += 1
    state.bad_in_row += 1
    metrics.write({"step": state.step, "skipped": "non-finite", "loss": result.loss,
                   "grad_norm": result.grad_norm, "skipped_steps": state.bad_steps})
    if run.d.main:
        write(f"step {state.step}: non-finite loss {result.loss} / grad norm "
              f"{result.grad_norm}; optimizer step skipped ({state.bad_in_row} in a row)")
    if state.bad_in_row >= run.cfg.train.max_bad_steps:
        raise NonFiniteError(
            f"{state.bad_in_row} non-finite steps in a row (up to step {state.step}); stopping. "
            "Lower train.lr, use train.precision=bf16 or fp32, or resume from the last "
            f"checkpoint in {RunDir(run.run_dir).checkpoints_dir}")


def log_step(run: Run, result: StepResult, meter: Meter, metrics: MetricsWriter, bar) -> None:
    state = run.state
    record: dict[str, Any] = {"step": state.step, "loss": result.loss, "aux_loss": result.aux,
                              "lr": result.lr, "grad_norm": result.grad_norm,
                              **meter.read(), "tokens": state.tokens_seen,
                              "skipped_steps": state.bad_steps}
    moe = unwrap(run.model).pop_moe_stats()
    if moe:
        record["moe"] = moe
    metrics.write(record)
    if run.d.main:
        bar.write(console_line(record, run.cfg.train.max_steps))
        if moe:
            bar.write(f"step {state.step}: {moe_summary(moe)}")


def run_eval(run: Run, data: PackedData, env: Env, metrics: MetricsWriter, write,
             train_minutes: float | None = None) -> dict[str, Any]:
    """Loss over the whole validation split; a new best is saved to best/. train_minutes: the
    optimizer steps' time so far in this process (evaluation excluded), recorded with it."""
    gpt, state = unwrap(run.model), run.state
    # Evaluation routing is reported by `slms experts`; keep training statistics clean.
    with gpt.paused_stats():
        val = evaluate(gpt, data, "val", run.cfg.train.batch_size, run.cfg.model.block_size,
                       env.device, env.autocast, env.dist)  # the ranks share the batches
    metrics.write({"step": state.step, "val_loss": val["loss"], "val_perplexity":
                   val["perplexity"], "val_bits_per_byte": val["bits_per_byte"],
                   "tokens": state.tokens_seen,
                   **({"train_minutes": train_minutes} if train_minutes is not None else {})})
    if run.d.main:
        write(f"step {state.step}: val loss {val['loss']:.4f} (ppl {val['perplexity']:.2f}, "
              f"{val['bits_per_byte']:.3f} bits/byte)")
    if val["loss"] < state.best_val:
        state.best_val, state.best_step = val["loss"], state.step
        save(run, RunDir(run.run_dir).best, val)
    return val
