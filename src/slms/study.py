"""Compute-matched dense vs MoE (`slms study`): does an MoE beat the dense model for the same
training compute, on this data, at this scale, and does upcycling the dense model help?

Trained in sequence on the same data, batches and recipe (the base config), each to the same
budget:
  dense        the base config (it must be dense)
  moe-eE-kK    each E in `experts` and K in `top_ks`: every FFN an MoE layer of E experts, K
               active per token, each expert of hidden width ~ the dense FFN's / K, so that a
               token's expert matmuls cost what the dense FFN's do (the router's small matmul
               comes on top, and is counted)
  upcycled     the dense run's own checkpoint at about half the budget, upcycled
               (slms.upcycle: experts copied from the dense FFN with a little noise, a new
               router) and trained on from there to the same total budget (train.init_from
               with train.init_step: a fresh optimizer state; the dense run's batches from
               that step on and its learning-rate schedule continued)

The budget is training FLOPs (CONVENTION) or wall-clock minutes of optimizer steps per variant
(train.max_minutes). With FLOPs, a variant trains round(budget / (FLOPs per token x tokens per
step)) steps, so its FLOPs are within half a step of the budget. Scores are the validation bits
per byte of the last evaluation (the whole validation split). Writes study.json and two PNGs
(validation bpb against training FLOPs and against training seconds) into the output directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from slms.config import ModelConfig, RunConfig, load_config, override_text, run_config_from_dict
from slms.model.info import ffn_matmul_params

CONVENTION = (
    "training FLOPs = tokens trained (batch_size x grad_accum x block_size per step) x FLOPs "
    "per token; FLOPs per token = 6 x the matmul weights a token passes through (for an MoE "
    "layer its top_k experts and the router) + 12 x n_layer x n_embd x block_size for attention "
    "(counted in full, non-causal, as PaLM and nanoGPT count MFU); slms.model.info."
    "flops_per_token, the figure `slms info` prints")
BIAS_UPDATE_RATE = 0.01  # the modern MoE preset's: the default 0.001 moves too little in a
# few hundred steps (docs/router_study.md)
MIN_STEPS = 10  # fewer and rounding alone can put a variant's FLOPs 5% off the budget
QUICK_OVERRIDES = (  # --quick: a tiny model on a small embedded corpus, seconds per variant
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=64",
    "data.stories=400", "data.vocab_size=300", "train.batch_size=8", "train.precision=fp32",
    "train.warmup_steps=5", "train.threads=1")
QUICK_DENSE_STEPS = 30


@dataclass(frozen=True)
class StudyOptions:
    config: Path
    out: Path
    overrides: tuple[str, ...] = ()
    flops: float = 0.0  # budget per variant; 0: dense_steps or minutes
    dense_steps: int = 0  # budget = this many steps of the dense model
    minutes: float = 0.0  # budget = minutes of optimizer steps per variant
    experts: tuple[int, ...] = (4, 8, 16)
    top_ks: tuple[int, ...] = (1, 2)
    router: str = "bias"
    upcycle: tuple[int, int] | None = (8, 2)  # (experts, top_k); None: no upcycled variant
    # slms.upcycle's expert_noise. The new router already spreads tokens over the experts, so
    # exact copies drift apart from the first step; a little noise makes them differ at once,
    # so the router's LM-loss gradient is not zero at step 0 either.
    upcycle_noise: float = 0.01
    evals: int = 10  # evaluations per run (FLOPs budget)
    eval_every: int = 50  # steps between evaluations (minutes budget)
    data: str | None = None  # a text file (held out in order), a prepared dir, or a source
    val_stories: int = 500
    separator: str = "newline"

    def validate(self) -> None:
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


@dataclass(frozen=True)
class Variant:
    name: str  # also its run directory's name
    kind: str  # dense | moe | upcycled
    overrides: tuple[str, ...] = ()  # model.* overrides on the base config
    n_experts: int = 0
    top_k: int = 0
    expert_hidden: int = 0


@dataclass
class Study:
    """The resolved plan: base config (data prepared, vocab set) and the budget."""

    opts: StudyOptions
    base: RunConfig
    tokens_per_step: int
    flops: float  # 0 with a minutes budget
    results: list[dict[str, Any]] = field(default_factory=list)


def expert_width(cfg: ModelConfig, top_k: int) -> int:
    """The expert hidden width whose top_k experts do the matmul FLOPs of the dense FFN
    (mlp_ratio * n_embd): the nearest width to FFN / top_k by slms.model.info's count."""
    C, H = cfg.n_embd, cfg.mlp_ratio * cfg.n_embd
    dense = ffn_matmul_params(cfg.activation, C, H)
    guess = max(1, round(H / top_k))
    return min(range(max(1, guess - 3), guess + 4),
               key=lambda h: abs(top_k * ffn_matmul_params(cfg.activation, C, h) - dense))


def moe_overrides(n_experts: int, top_k: int, hidden: int, router: str) -> tuple[str, ...]:
    out = [f"model.moe.n_experts={n_experts}", f"model.moe.top_k={top_k}",
           f"model.moe.expert_hidden={hidden}", f"model.moe.router={router}",
           # top-1 with renormalised weights gives the router no gradient (its one weight is
           # always 1): top-1 uses Switch Transformer's unnormalised gate probability instead
           f"model.moe.renormalize={override_text(top_k > 1)}"]
    if router == "bias":
        out.append(f"model.moe.bias_update_rate={BIAS_UPDATE_RATE}")
    return tuple(out)


def plan(cfg: ModelConfig, opts: StudyOptions) -> list[Variant]:
    """dense, then moe-eE-kK for each E and K, then the upcycled variant (trained last)."""
    out = [Variant("dense", "dense")]
    for e in opts.experts:
        for k in opts.top_ks:
            h = expert_width(cfg, k)
            out.append(Variant(f"moe-e{e}-k{k}", "moe", moe_overrides(e, k, h, opts.router),
                               e, k, h))
    if opts.upcycle:
        e, k = opts.upcycle
        out.append(Variant(f"upcycled-e{e}-k{k}", "upcycled", (), e, k,
                           cfg.mlp_ratio * cfg.n_embd))
    return out


def setup(opts: StudyOptions, log=print) -> Study:
    """Validate the options, prepare the data, and fix the budget in FLOPs (or minutes)."""
    from slms.data.prepare import read_meta
    from slms.model import flops_per_token

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
    from slms.data.heldout import prepare_held_out
    from slms.data.pipeline import resolve_data

    source = opts.data or base.data.path
    if source is not None and Path(source).suffix == ".txt" and Path(source).is_file():
        log(f"holding out the last {opts.val_stories} stories of {source}; preparing into "
            f"{opts.out / 'data'}")
        return prepare_held_out(Path(source), opts.out, opts.val_stories, base.data.vocab_size,
                                opts.separator)
    if source is not None and not Path(source).exists():
        raise ValueError(f"--data {source} not found")
    return resolve_data(dataclasses.replace(base.data, path=source), seed=base.data.seed,
                        log=log)


def steps_for(study: Study, flops: float, flops_per_token: int) -> int:
    steps = round(flops / (flops_per_token * study.tokens_per_step))
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
    from slms.train.metrics import read_metrics
    from slms.train.trainer import train

    cfg = run_config_from_dict(study.base.to_dict(), [*variant.overrides, *extra])
    t0 = time.perf_counter()
    train(cfg, out_dir=run_dir, log=log)
    seconds = time.perf_counter() - t0
    evals = [r for r in read_metrics(run_dir) if "val_bits_per_byte" in r]
    return cfg, evals, seconds


def curve(evals: list[dict[str, Any]], fpt: int, tokens_per_step: int, step0: int = 0,
          flops0: float = 0.0, seconds0: float = 0.0) -> list[dict[str, Any]]:
    """Evaluation points with cumulative training FLOPs and training seconds (the optimizer
    steps' time, evaluation excluded), of a run whose steps began at `step0` (train.init_step)
    after a previous segment's flops0 and seconds0."""
    return [{"step": r["step"],
             "flops": flops0 + (r["step"] - step0) * tokens_per_step * fpt,
             "train_seconds": seconds0 + 60 * r.get("train_minutes", 0.0),
             "val_bpb": r["val_bits_per_byte"], "val_loss": r["val_loss"]} for r in evals]


def summary(study: Study, variant: Variant, cfg: RunConfig, points: list[dict[str, Any]],
            run_seconds: float, run_dir: Path) -> dict[str, Any]:
    from slms.model import GPT, count_params, flops_per_token

    last = points[-1]
    return {"name": variant.name, "kind": variant.kind, "n_experts": variant.n_experts,
            "top_k": variant.top_k, "expert_hidden": variant.expert_hidden,
            **count_params(GPT(cfg.model)), "flops_per_token": flops_per_token(cfg.model),
            "steps": last["step"], "flops": last["flops"],
            "flops_vs_budget": last["flops"] / study.flops if study.flops else None,
            "final_val_bpb": last["val_bpb"], "best_val_bpb": min(p["val_bpb"] for p in points),
            "train_seconds": last["train_seconds"],
            "tokens_per_s": last["step"] * study.tokens_per_step / max(last["train_seconds"],
                                                                         1e-9),
            "precision": cfg_as_trained(run_dir)["train"]["precision"],
            # other processes on the CPU slow the run (and only its seconds): a load average
            # above the run's threads says it did not run alone
            "load_avg_1min_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "run_seconds": run_seconds, "run_dir": str(run_dir), "curve": points}


def cfg_as_trained(run_dir: Path) -> dict[str, Any]:
    """The run's resolved config (precision auto resolved, a time budget's steps fixed)."""
    from slms.rundir import RunDir

    return RunDir(run_dir).read_config()


def run_plain(study: Study, variant: Variant, log) -> tuple[dict[str, Any], int | None]:
    """Train the dense model or an MoE variant to the budget; for the dense model with an
    upcycled variant planned, also returns the step of its checkpoint to upcycle."""
    from slms.model import flops_per_token

    probe = run_config_from_dict(study.base.to_dict(), list(variant.overrides))
    fpt, opts = flops_per_token(probe.model), study.opts
    half = None
    if study.flops:
        steps = steps_for(study, study.flops, fpt)
        every = math.ceil(steps / opts.evals)
        if variant.kind == "dense" and opts.upcycle:
            half = every * max(1, round(steps / 2 / every))  # an evaluated step near half
        extra = train_overrides(steps, every, half or 10**9)
        log(f"== {variant.name}: {steps} steps of {fpt * study.tokens_per_step:.3g} FLOPs")
    else:
        keep = variant.kind == "dense" and opts.upcycle  # checkpoints to choose half from
        extra = train_overrides(1, opts.eval_every, opts.eval_every if keep else 10**9,
                                opts.minutes)
        log(f"== {variant.name}: {opts.minutes:g} minutes")
    run_dir = opts.out / variant.name
    cfg, evals, seconds = train_run(study, variant, extra, run_dir, log)
    points = curve(evals, fpt, study.tokens_per_step)
    if half is None and variant.kind == "dense" and opts.upcycle:
        half = halfway(points, opts.minutes * 60)
    return summary(study, variant, cfg, points, seconds, run_dir), half


def halfway(points: list[dict[str, Any]], seconds: float) -> int:
    """The evaluated step (not the last) whose training time is nearest half of `seconds`."""
    if len(points) < 2:
        raise ValueError("the dense run was evaluated only once: lower --eval-every so that "
                         "it has a checkpoint near half its minutes to upcycle")
    return min(points[:-1], key=lambda p: abs(p["train_seconds"] - seconds / 2))["step"]


def run_upcycled(study: Study, variant: Variant, dense: dict[str, Any], half: int, log
                 ) -> dict[str, Any]:
    """Upcycle the dense run's checkpoint at step `half` and train it on to the budget."""
    from slms.model import flops_per_token
    from slms.rundir import RunDir
    from slms.upcycle import train_overrides as init_overrides
    from slms.upcycle import upcycle_checkpoint

    opts = study.opts
    start = next(p for p in dense["curve"] if p["step"] == half)
    ckpt_dir = opts.out / f"{variant.name}-init"
    model, ckpt = upcycle_checkpoint(RunDir(dense["run_dir"]).step_dir(half), ckpt_dir,
                                     variant.n_experts, variant.top_k, opts.router,
                                     opts.upcycle_noise)
    assert model.cfg.moe is not None
    rate = [f"model.moe.bias_update_rate={BIAS_UPDATE_RATE}"] if opts.router == "bias" else []
    variant = dataclasses.replace(variant, overrides=(*init_overrides(model.cfg.moe, ckpt),
                                                      *rate))
    fpt = flops_per_token(model.cfg)
    if study.flops:
        steps = steps_for(study, study.flops - start["flops"], fpt)
        extra = train_overrides(half + steps, math.ceil(steps / (opts.evals / 2)), 10**9)
        more = f"{steps} more steps of {fpt * study.tokens_per_step:.3g} FLOPs"
    else:
        left = max(opts.minutes - start["train_seconds"] / 60, 1e-3)
        extra = train_overrides(1, opts.eval_every, 10**9, left)
        more = f"{left:.2f} more minutes"
    # the dense run continued: its batches from step `half` on and its schedule (planned over
    # its own steps) carried on from there over the upcycled run's
    dense_steps = cfg_as_trained(Path(dense["run_dir"]))["train"]["max_steps"]
    extra += [f"train.init_step={half}", f"train.init_total={dense_steps}"]
    log(f"== {variant.name}: from the dense checkpoint at step {half}, {more}")
    run_dir = opts.out / variant.name
    cfg, evals, seconds = train_run(study, variant, extra, run_dir, log)
    before = [p for p in dense["curve"] if p["step"] <= half]
    points = before + curve(evals, fpt, study.tokens_per_step, half, start["flops"],
                            start["train_seconds"])
    out = summary(study, variant, cfg, points, seconds, run_dir)
    return out | {"upcycled_at_step": half, "init": str(ckpt), "expert_noise": opts.upcycle_noise}


def run_study(opts: StudyOptions, log=print) -> dict[str, Any]:
    """Train every variant in sequence; writes and returns the report (study.json)."""
    import torch

    threads = torch.get_num_threads()  # train.threads sets it for the whole process
    try:
        return _run_study(opts, log)
    finally:
        torch.set_num_threads(threads)


def _run_study(opts: StudyOptions, log) -> dict[str, Any]:
    study = setup(opts, log)
    variants = plan(study.base.model, opts)
    half = None
    for variant in variants:
        if variant.kind == "upcycled":
            assert half is not None
            result = run_upcycled(study, variant, study.results[0], half, log)
        else:
            result, h = run_plain(study, variant, log)
            half = h if variant.kind == "dense" else half
        study.results.append(result)
        report = write_report(study)  # after each variant: a crash keeps what was done
    plot_study(report, opts.out)
    return report


def write_report(study: Study) -> dict[str, Any]:
    import torch

    from slms.precision import cpu_model

    opts = study.opts
    report = {
        "config": str(opts.config), "overrides": list(opts.overrides),
        "data": study.base.data.path, "budget": {
            "flops": study.flops or None, "minutes": opts.minutes or None,
            "dense_steps": opts.dense_steps or None, "convention": CONVENTION},
        "tokens_per_step": study.tokens_per_step, "router": opts.router,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "date": datetime.now().isoformat(timespec="seconds"), "variants": study.results}
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "study.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def table(report: dict[str, Any]) -> str:
    """The results as a markdown table, best final validation bpb first."""
    rows = ["| variant | params (active) | FLOPs/token | steps | FLOPs (x budget) | final val "
            "bpb | train s | tokens/s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(report["variants"], key=lambda r: r["final_val_bpb"]):
        ratio = f" ({r['flops_vs_budget']:.3f})" if r["flops_vs_budget"] else ""
        params = f"{r['params_total'] / 1e6:.2f}M ({r['params_active'] / 1e6:.2f}M)"
        rows.append(f"| {r['name']} | {params} | {r['flops_per_token'] / 1e6:.2f}M | "
                    f"{r['steps']:,} | "
                    f"{r['flops']:.3g}{ratio} | {r['final_val_bpb']:.4f} | "
                    f"{r['train_seconds']:.1f} | {r['tokens_per_s']:,.0f} |")
    return "\n".join(rows)


def plot_study(report: dict[str, Any], out: Path) -> list[Path]:
    """study_flops.png and study_time.png: validation bpb against training FLOPs and against
    training seconds (evaluation excluded), one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget = report["budget"]
    what = (f"{budget['flops']:.3g} training FLOPs" if budget["flops"] else
            f"{budget['minutes']:g} minutes") + f" each on {report['cpu']}"
    paths = []
    for key, label, name in (("flops", "training FLOPs", "study_flops.png"),
                             ("train_seconds", "training seconds (evaluation excluded)",
                              "study_time.png")):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for r in report["variants"]:
            xs = [p[key] for p in r["curve"]]
            ys = [p["val_bpb"] for p in r["curve"]]
            ax.plot(xs, ys, **_style(r), label=f"{r['name']} ({r['final_val_bpb']:.3f})")
        ax.set_ylim(*_y_range(report["variants"]))
        ax.set_xlabel(label)
        ax.set_ylabel("validation bits per byte")
        ax.set_title(f"dense vs MoE, {what}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(out / name)
    return paths


def _style(r: dict[str, Any]) -> dict[str, Any]:
    if r["kind"] == "dense":
        return {"color": "black", "lw": 2.2, "marker": "o", "ms": 3}
    if r["kind"] == "upcycled":
        return {"color": "tab:red", "ls": "--", "lw": 1.8, "marker": "^", "ms": 3}
    colors = {4: "tab:blue", 8: "tab:green", 16: "tab:purple"}
    return {"color": colors.get(r["n_experts"], None), "lw": 1.2, "ms": 3,
            "marker": "o" if r["top_k"] > 1 else "s", "ls": "-" if r["top_k"] > 1 else ":"}


def _y_range(results: list[dict[str, Any]]) -> tuple[float, float]:
    """Low end: the best value; high end: the worst value after the first two evaluations of
    each run, so that the early drop does not squash where the variants differ."""
    ys = [p["val_bpb"] for r in results for p in r["curve"]]
    later = [p["val_bpb"] for r in results for p in r["curve"][2:]] or ys
    low, high = min(ys), max(later)
    pad = 0.05 * max(high - low, 1e-3)
    return low - pad, high + pad
