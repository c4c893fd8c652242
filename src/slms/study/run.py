"""Training a study's variants in sequence (`run_study`): the data prepared once, the budget
fixed in FLOPs or minutes, each variant trained to it, the results written after each."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from slms.config import RunConfig, load_config, run_config_from_dict
from slms.data.heldout import prepare_held_out
from slms.data.pipeline import resolve_data
from slms.data.prepare import read_meta
from slms.model import GPT, count_params, flops_per_token
from slms.rundir import RunDir
from slms.study.options import StudyOptions
from slms.study.plan import BIAS_UPDATE_RATE, Study, Variant, plan
from slms.study.report import plot_study, write_report
from slms.study.results import Point, Result
from slms.train.metrics import read_metrics
from slms.train.trainer import train
from slms.upcycle import train_overrides as init_overrides
from slms.upcycle import upcycle_checkpoint

MIN_STEPS = 10  # fewer and rounding alone can put a variant's FLOPs 5% off the budget
# train.checkpoint_every of a run whose checkpoints along the way are not needed: an interval
# no run reaches
NEVER = 10**9


def setup(opts: StudyOptions, log=print) -> Study:
    """Validate the options, prepare the data, and fix the budget in FLOPs (or minutes)."""
    opts.validate()
    base = load_config(opts.config, list(opts.overrides))
    if base.model.moe is not None:
        raise ValueError(f"{opts.config} is an MoE config; the study needs the dense base "
                         "(add the override model.moe=none)")
    data_dir = prepare_data(base, opts, log)
    vocab = read_meta(data_dir)["vocab_size"]
    base = dataclasses.replace(
        base, data=dataclasses.replace(base.data, path=str(data_dir)),
        model=dataclasses.replace(base.model, vocab_size=base.model.vocab_size or vocab))
    tc = base.train
    tokens_per_step = tc.batch_size * tc.grad_accum * base.model.block_size
    flops = opts.flops or opts.dense_steps * flops_per_token(base.model) * tokens_per_step
    return Study(opts, base, tokens_per_step, float(flops))


def prepare_data(base: RunConfig, opts: StudyOptions, log) -> Path:
    """A prepared data directory: a .txt file is split in order (the last val_stories held
    out, slms.data.heldout, as benchmarks/quality.py); anything else goes through the usual
    pipeline (data.path of the base config when no --data is given; the embedded corpus when
    neither is)."""
    source = opts.data or base.data.path
    if source is not None and Path(source).suffix == ".txt" and Path(source).is_file():
        data = prepare_held_out(Path(source), opts.out, opts.val_stories, base.data.vocab_size,
                                opts.separator)
        log(f"held out the last {opts.val_stories} stories of {source}; prepared in {data}")
        return data
    if source is not None and not Path(source).exists():
        raise ValueError(f"--data {source} not found")
    return resolve_data(dataclasses.replace(base.data, path=source), seed=base.data.seed,
                        log=log)


def steps_for(study: Study, flops: float, fpt: int) -> int:
    """The steps of `flops` training FLOPs for a model of `fpt` FLOPs per token."""
    steps = round(flops / (fpt * study.tokens_per_step))
    if steps < MIN_STEPS:
        raise ValueError(f"the budget of {study.flops:.3g} FLOPs gives a run only {steps} steps "
                         f"(fewer than {MIN_STEPS}); raise --flops or --dense-steps")
    return steps


def train_overrides(steps: int, every: int, checkpoint_every: int, minutes: float = 0.0
                    ) -> list[str]:
    """The run-length overrides of one training run: `steps` steps (or `minutes`), evaluated
    and logged every `every` steps; step checkpoints every `checkpoint_every`, all kept."""
    return [f"train.max_steps={max(steps, 1)}", f"train.max_minutes={minutes}",
            "train.epochs=0", "train.early_stop=0", "train.resume=never",
            f"train.eval_every={every}", f"train.log_every={every}",
            f"train.checkpoint_every={checkpoint_every}", "train.keep_checkpoints=1000000"]


def train_run(study: Study, variant: Variant, extra: list[str], run_dir: Path, log
              ) -> tuple[RunConfig, list[dict[str, Any]], float]:
    """Train the base config with the variant's and `extra` overrides into run_dir; returns
    (the config, its evaluation records, seconds the training call took)."""
    cfg = run_config_from_dict(study.base.to_dict(), [*variant.overrides, *extra])
    t0 = time.perf_counter()
    train(cfg, out_dir=run_dir, log=log)
    seconds = time.perf_counter() - t0
    evals = [r for r in read_metrics(run_dir) if "val_bits_per_byte" in r]
    return cfg, evals, seconds


def curve(evals: list[dict[str, Any]], fpt: int, tokens_per_step: int, step0: int = 0,
          flops0: float = 0.0, seconds0: float = 0.0) -> list[Point]:
    """The evaluation points of a run whose steps began at `step0` (train.init_step) after a
    previous segment's flops0 and seconds0."""
    return [Point(step=r["step"], flops=flops0 + (r["step"] - step0) * tokens_per_step * fpt,
                  train_seconds=seconds0 + 60 * r.get("train_minutes", 0.0),
                  val_bpb=r["val_bits_per_byte"], val_loss=r["val_loss"]) for r in evals]


def summary(study: Study, variant: Variant, cfg: RunConfig, points: list[Point],
            run_seconds: float, run_dir: Path, **upcycled: Any) -> Result:
    """The result of a trained variant (`upcycled`: the upcycled variant's own fields)."""
    last = points[-1]
    return Result(
        name=variant.name, kind=variant.kind, n_experts=variant.n_experts, top_k=variant.top_k,
        expert_hidden=variant.expert_hidden, **count_params(GPT(cfg.model)),
        flops_per_token=flops_per_token(cfg.model), steps=last.step, flops=last.flops,
        flops_vs_budget=last.flops / study.flops if study.flops else None,
        final_val_bpb=last.val_bpb, best_val_bpb=min(p.val_bpb for p in points),
        train_seconds=last.train_seconds,
        tokens_per_s=last.step * study.tokens_per_step / max(last.train_seconds, 1e-9),
        precision=cfg_as_trained(run_dir)["train"]["precision"],
        load_avg_1min_after=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        run_seconds=run_seconds, run_dir=str(run_dir), curve=points, **upcycled)


def cfg_as_trained(run_dir: Path) -> dict[str, Any]:
    """The run's resolved config (precision auto resolved, a time budget's steps fixed)."""
    return RunDir(run_dir).read_config()


def run_plain(study: Study, variant: Variant, log) -> tuple[Result, int | None]:
    """Train the dense model or an MoE variant to the budget; for the dense model with an
    upcycled variant planned, also returns the step of its checkpoint to upcycle."""
    probe = run_config_from_dict(study.base.to_dict(), list(variant.overrides))
    fpt, opts = flops_per_token(probe.model), study.opts
    half = None
    if study.flops:
        steps = steps_for(study, study.flops, fpt)
        every = math.ceil(steps / opts.evals)
        if variant.kind == "dense" and opts.upcycle:
            half = every * max(1, round(steps / 2 / every))  # an evaluated step near half
        extra = train_overrides(steps, every, half or NEVER)
        log(f"== {variant.name}: {steps} steps of {fpt * study.tokens_per_step:.3g} FLOPs")
    else:
        keep = variant.kind == "dense" and opts.upcycle  # checkpoints to choose half from
        extra = train_overrides(1, opts.eval_every, opts.eval_every if keep else NEVER,
                                opts.minutes)
        log(f"== {variant.name}: {opts.minutes:g} minutes")
    run_dir = opts.out / variant.name
    cfg, evals, seconds = train_run(study, variant, extra, run_dir, log)
    points = curve(evals, fpt, study.tokens_per_step)
    if half is None and variant.kind == "dense" and opts.upcycle:
        half = halfway(points, opts.minutes * 60)
    return summary(study, variant, cfg, points, seconds, run_dir), half


def halfway(points: list[Point], seconds: float) -> int:
    """The evaluated step (not the last) whose training time is nearest half of `seconds`."""
    if len(points) < 2:
        raise ValueError("the dense run was evaluated only once: lower --eval-every so that "
                         "it has a checkpoint near half its minutes to upcycle")
    return min(points[:-1], key=lambda p: abs(p.train_seconds - seconds / 2)).step


def run_upcycled(study: Study, variant: Variant, half: int, log) -> Result:
    """Upcycle the dense run's checkpoint at step `half` and train it on to the budget."""
    opts, dense = study.opts, study.dense
    start = next(p for p in dense.curve if p.step == half)
    ckpt_dir = opts.out / f"{variant.name}-init"
    model, ckpt = upcycle_checkpoint(RunDir(dense.run_dir).step_dir(half), ckpt_dir,
                                     variant.n_experts, variant.top_k, opts.router,
                                     opts.upcycle_noise)
    assert model.cfg.moe is not None
    rate = [f"model.moe.bias_update_rate={BIAS_UPDATE_RATE}"] if opts.router == "bias" else []
    variant = dataclasses.replace(variant, overrides=(*init_overrides(model.cfg.moe, ckpt),
                                                      *rate))
    fpt = flops_per_token(model.cfg)
    if study.flops:
        steps = steps_for(study, study.flops - start.flops, fpt)
        extra = train_overrides(half + steps, math.ceil(steps / (opts.evals / 2)), NEVER)
        more = f"{steps} more steps of {fpt * study.tokens_per_step:.3g} FLOPs"
    else:
        left = max(opts.minutes - start.train_seconds / 60, 1e-3)
        extra = train_overrides(1, opts.eval_every, NEVER, left)
        more = f"{left:.2f} more minutes"
    # the dense run continued: its batches from step `half` on and its schedule (planned over
    # its own steps) carried on from there over the upcycled run's
    dense_steps = cfg_as_trained(Path(dense.run_dir))["train"]["max_steps"]
    extra += [f"train.init_step={half}", f"train.init_total={dense_steps}"]
    log(f"== {variant.name}: from the dense checkpoint at step {half}, {more}")
    run_dir = opts.out / variant.name
    cfg, evals, seconds = train_run(study, variant, extra, run_dir, log)
    before = [p for p in dense.curve if p.step <= half]
    points = before + curve(evals, fpt, study.tokens_per_step, half, start.flops,
                            start.train_seconds)
    return summary(study, variant, cfg, points, seconds, run_dir, upcycled_at_step=half,
                   init=str(ckpt), expert_noise=opts.upcycle_noise)


def run_study(opts: StudyOptions, log=print) -> Study:
    """Train every variant in sequence, writing study.json after each and the plots at the
    end; returns the study, its results filled in."""
    threads = torch.get_num_threads()  # train.threads sets it for the whole process
    try:
        return _run_study(opts, log)
    finally:
        torch.set_num_threads(threads)


def _run_study(opts: StudyOptions, log) -> Study:
    study = setup(opts, log)
    half = None  # the dense run's step to upcycle
    for variant in plan(study.base.model, opts):
        if variant.kind == "upcycled":
            assert half is not None
            result = run_upcycled(study, variant, half, log)
        else:
            result, h = run_plain(study, variant, log)
            half = h if variant.kind == "dense" else half
        study.results.append(result)
        write_report(study)  # after each variant: a crash keeps what was done
    plot_study(study)
    return study
