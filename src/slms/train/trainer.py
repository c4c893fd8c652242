"""The training loop. `train()` reads as a table of contents; the details are named functions."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
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
from slms.model import GPT, count_params
from slms.tokenizer import Tokenizer
from slms.train import checkpoint as ckpt
from slms.train.checkpoint import RUN_CONFIG
from slms.train.metrics import MetricsWriter, fmt_count, moe_summary
from slms.train.optim import build_optimizer, build_scheduler


class DataMismatchError(ValueError):
    """The prepared data does not fit the model (vocab size, tokenizer)."""


@dataclass
class Env:
    """Where and how the computation runs."""

    device: torch.device
    autocast: AbstractContextManager
    scaler: torch.amp.GradScaler | None


@dataclass
class State:
    step: int = 0  # optimizer steps completed
    best_val: float = math.inf
    tokens_seen: int = 0


def train(cfg: RunConfig, out_dir: str | Path | None = None, resume: str | Path | None = None,
          log=print) -> Path:
    """Train `cfg`; returns the run directory (checkpoints, best/, metrics.jsonl, config)."""
    tc = cfg.train
    env = setup(tc)
    data = PackedData(resolve_data(cfg.data, seed=cfg.data.seed, log=log))
    tokenizer = Tokenizer.from_file(data.dir / "tokenizer.json")
    cfg = fit_vocab(cfg, data, tokenizer)
    model = GPT(cfg.model).to(env.device)
    opt = build_optimizer(model, tc, env.device)
    sched = build_scheduler(opt, tc)
    state = State()
    run_dir = Path(resume) if resume else make_run_dir(cfg, out_dir)
    if resume:
        state = restore(run_dir, model, opt, sched, env)
    write_run_config(run_dir, cfg, data)
    metrics = MetricsWriter(run_dir / "metrics.jsonl")
    announce(model, cfg, data, run_dir, log)

    bar = tqdm(total=tc.max_steps, initial=state.step, desc="train", unit="step",
               dynamic_ncols=True)
    window_start, window_tokens = time.perf_counter(), 0
    while state.step < tc.max_steps:
        loss, aux, grad_norm = train_step(model, opt, sched, data, cfg, state.step, env)
        state.step += 1
        tokens = tc.batch_size * tc.grad_accum * cfg.model.block_size
        state.tokens_seen += tokens
        window_tokens += tokens
        last = state.step == tc.max_steps
        if state.step % tc.log_every == 0 or last:
            elapsed = time.perf_counter() - window_start
            record = log_record(model, state, loss, aux, grad_norm, sched, window_tokens / elapsed)
            metrics.write(record)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{record['lr']:.2e}",
                            tok_s=fmt_count(record["tokens_per_s"]))
            if record.get("moe"):
                bar.write(f"step {state.step}: {moe_summary(record['moe'])}")
            window_start, window_tokens = time.perf_counter(), 0
        if state.step % tc.eval_every == 0 or last:
            val = run_eval(model, data, cfg, env, state, metrics, run_dir, tokenizer, opt, sched)
            bar.write(f"step {state.step}: val loss {val['loss']:.4f} "
                      f"(ppl {val['perplexity']:.2f}, {val['bits_per_byte']:.3f} bits/byte)")
            window_start = time.perf_counter()  # evaluation time is not training throughput
        if state.step % tc.checkpoint_every == 0 or last:
            save(run_dir / "checkpoints" / f"step-{state.step}", model, tokenizer, cfg, state,
                 opt, sched, env)
            ckpt.prune(run_dir, keep=2)
        bar.update(1)
    bar.close()
    return run_dir


def setup(tc: TrainConfig) -> Env:
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = resolve_device(tc.device)
    seed_everything(tc.seed)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[tc.precision]
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext())
    scaler = torch.amp.GradScaler(device.type) if tc.precision == "fp16" else None
    return Env(device, autocast, scaler)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={name} but CUDA is not available; use train.device=cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def fit_vocab(cfg: RunConfig, data: PackedData, tokenizer: Tokenizer) -> RunConfig:
    """The config with model.vocab_size taken from the data when unset; a mismatch between
    data, tokenizer and model is an error."""
    if data.meta.get("tokenizer_sha256") not in (None, tokenizer.sha256):
        raise DataMismatchError(f"{data.dir}/tokenizer.json is not the tokenizer the data was "
                                "prepared with; prepare the data again")
    mcfg = cfg.model
    if mcfg.vocab_size is None:
        return dataclasses.replace(cfg, model=dataclasses.replace(mcfg,
                                                                  vocab_size=data.vocab_size))
    if data.vocab_size != mcfg.vocab_size:
        raise DataMismatchError(
            f"the data in {data.dir} was tokenized with a {data.vocab_size}-token vocab but "
            f"model.vocab_size is {mcfg.vocab_size}; set model.vocab_size={data.vocab_size} "
            "(or leave it out), or prepare the data with a matching tokenizer")
    return cfg


def make_run_dir(cfg: RunConfig, out_dir: str | Path | None) -> Path:
    if out_dir is None:
        out_dir = Path("runs") / f"{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out_dir = Path(out_dir)
    if ckpt.list_checkpoints(out_dir) or (out_dir / "best").exists():
        raise FileExistsError(f"{out_dir} already holds a run; resume it with --resume {out_dir} "
                              "or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def write_run_config(run_dir: Path, cfg: RunConfig, data: PackedData) -> None:
    resolved = cfg.to_dict() | {"data_dir": str(data.dir)}
    (run_dir / RUN_CONFIG).write_text(json.dumps(resolved, indent=2) + "\n")


def announce(model: GPT, cfg: RunConfig, data: PackedData, run_dir: Path, log) -> None:
    counts = count_params(model)
    tc = cfg.train
    tokens = data.meta["splits"]["train"]["tokens"]
    per_step = tc.batch_size * tc.grad_accum * cfg.model.block_size
    log(f"model: {counts['params_total']:,} parameters, {counts['params_active']:,} active per "
        f"token ({'MoE' if cfg.model.moe else 'dense'}, {cfg.model.n_layer} layers, "
        f"n_embd {cfg.model.n_embd})")
    log(f"data: {data.dir} ({tokens:,} training tokens); {per_step:,} tokens per step "
        f"= {tc.batch_size} x {tc.grad_accum} accumulation x {cfg.model.block_size} tokens; "
        f"{tc.max_steps} steps = {tc.max_steps * per_step / tokens:.2f} epochs")
    log(f"run directory: {run_dir}")


def train_step(model: GPT, opt: torch.optim.Optimizer, sched, data: PackedData, cfg: RunConfig,
               step: int, env: Env) -> tuple[float, float, float]:
    """One optimizer step over grad_accum micro-batches; returns (lm loss, aux loss, grad norm)."""
    tc = cfg.train
    model.train()
    lm_total = torch.zeros((), device=env.device)
    aux_total = torch.zeros((), device=env.device)
    for micro in range(tc.grad_accum):
        x, y = data.train_batch(tc.batch_size, cfg.model.block_size, tc.seed, step, micro=micro)
        x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
        with env.autocast:
            out = model(x, y)
            loss = (out.loss + out.aux_loss) / tc.grad_accum
        (env.scaler.scale(loss) if env.scaler else loss).backward()
        lm_total += out.loss.detach() / tc.grad_accum
        aux_total += out.aux_loss.detach() / tc.grad_accum
    if env.scaler:
        env.scaler.unscale_(opt)
    clip = tc.grad_clip if tc.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    if env.scaler:
        env.scaler.step(opt)
        env.scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    for moe in model.moe_layers():
        moe.router.update_bias()
    return float(lm_total), float(aux_total), float(grad_norm)


def log_record(model: GPT, state: State, loss: float, aux: float, grad_norm: float, sched,
               tokens_per_s: float) -> dict[str, Any]:
    record: dict[str, Any] = {"step": state.step, "loss": loss, "aux_loss": aux,
                              "lr": sched.get_last_lr()[0], "grad_norm": grad_norm,
                              "tokens_per_s": tokens_per_s, "tokens": state.tokens_seen}
    moe = [layer.pop_stats() for layer in model.moe_layers()]
    if moe:
        record["moe"] = moe
    return record


def run_eval(model: GPT, data: PackedData, cfg: RunConfig, env: Env, state: State,
             metrics: MetricsWriter, run_dir: Path, tokenizer: Tokenizer, opt, sched
             ) -> dict[str, Any]:
    stats_before = [layer.stats for layer in model.moe_layers()]
    val = evaluate(model, data, "val", cfg.train.batch_size, cfg.model.block_size, env.device,
                   env.autocast)
    # Evaluation routing is reported by `slms experts`; keep training statistics clean.
    for layer, stats in zip(model.moe_layers(), stats_before, strict=True):
        layer.stats = stats
    metrics.write({"step": state.step, "val_loss": val["loss"], "val_perplexity":
                   val["perplexity"], "val_bits_per_byte": val["bits_per_byte"],
                   "tokens": state.tokens_seen})
    if val["loss"] < state.best_val:
        state.best_val = val["loss"]
        save(run_dir / "best", model, tokenizer, cfg, state, opt, sched, env, val)
    return val


def save(path: Path, model: GPT, tokenizer: Tokenizer, cfg: RunConfig, state: State, opt, sched,
         env: Env, val: dict[str, Any] | None = None) -> None:
    info = {"step": state.step, "run": cfg.to_dict(), "tokens_seen": state.tokens_seen}
    if val is not None:
        info["val"] = val
    trainer_state = {
        "step": state.step, "best_val": state.best_val, "tokens_seen": state.tokens_seen,
        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "scaler": env.scaler.state_dict() if env.scaler else {},
        "rng_torch": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    ckpt.save_checkpoint(path, model, tokenizer, info, trainer_state)


def restore(run_dir: Path, model: GPT, opt, sched, env: Env) -> State:
    """Load the newest checkpoint of run_dir into model/opt/sched; returns the trainer state."""
    ckpts = ckpt.list_checkpoints(run_dir)
    if not ckpts:
        raise ckpt.CheckpointError(f"{run_dir} has no checkpoints to resume from")
    path = ckpts[-1]
    loaded, _, _ = ckpt.load_checkpoint(path, env.device)
    model.load_state_dict(loaded.state_dict())
    ts = ckpt.load_trainer_state(path)
    opt.load_state_dict(ts["optimizer"])
    sched.load_state_dict(ts["scheduler"])
    if env.scaler and ts["scaler"]:
        env.scaler.load_state_dict(ts["scaler"])
    torch.set_rng_state(ts["rng_torch"])
    if ts["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ts["rng_cuda"])
    return State(step=ts["step"], best_val=ts["best_val"], tokens_seen=ts["tokens_seen"])

