"""One training step: non-finite guard, mixed precision on CPU, gradient checkpointing."""

import dataclasses
import math
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch

from conftest import tiny_config
from slms.checkpoint import load_checkpoint
from slms.config import MoEConfig, RunConfig, TrainConfig
from slms.data.loader import PackedData
from slms.model import GPT
from slms.train.distributed import Dist
from slms.train.metrics import read_metrics
from slms.train.optim import build_optimizer, build_scheduler
from slms.train.state import NonFiniteError
from slms.train.step import Env, train_step
from slms.train.trainer import train


def _setup(data_dir, precision="fp32", router="noisy_topk"):
    torch.manual_seed(0)
    mcfg = tiny_config(moe=True, n_head=2, block_size=16)
    mcfg = dataclasses.replace(mcfg, moe=dataclasses.replace(mcfg.moe, router=router))
    cfg = RunConfig(model=mcfg, train=TrainConfig(batch_size=2, precision=precision,
                                                  warmup_steps=0, lr=1e-2))
    model = GPT(mcfg)
    opt = build_optimizer(model, cfg.train, torch.device("cpu"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast("cpu", dtype=dtype) if dtype else nullcontext()
    scaler = torch.amp.GradScaler("cpu") if precision == "fp16" else None
    env = Env(torch.device("cpu"), autocast, scaler, Dist())
    return model, opt, build_scheduler(opt, cfg.train), PackedData(data_dir), cfg, env


def _nan_forward(model):
    forward = model.forward

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        return out._replace(loss=out.loss * float("nan"))

    model.forward = poisoned


def test_nan_loss_skips_the_step_and_leaves_weights_unchanged(data_dir):
    model, opt, sched, data, cfg, env = _setup(data_dir, router="bias")
    block = cfg.model.block_size
    assert not train_step(model, opt, sched, data, cfg.train, block, 0, env).skipped
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt_before = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    _nan_forward(model)
    result = train_step(model, opt, sched, data, cfg.train, block, 1, env)
    assert result.skipped and math.isnan(result.loss)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(opt_before[k], v) for k, v in opt.state_dict()["state"][0].items())
    assert all(p.grad is None for p in model.parameters())


def test_max_bad_steps_stops_the_run_without_writing_checkpoints(tmp_path, data_dir,
                                                                 monkeypatch):
    from slms.config import load_config

    cfg = load_config("configs/tiny.toml", [f"data.path={data_dir}", "model.n_layer=1",
                                            "model.n_embd=32", "model.block_size=16",
                                            "model.moe.expert_hidden=32", "train.batch_size=2",
                                            "train.max_steps=20", "train.max_bad_steps=3",
                                            "train.log_every=1", "train.checkpoint_every=1"])
    original = GPT.forward

    def nan_after_two(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        step = getattr(self, "_calls", 0)
        self._calls = step + 1
        return out._replace(loss=out.loss * float("nan")) if step >= 2 else out

    monkeypatch.setattr(GPT, "forward", nan_after_two)
    with pytest.raises(NonFiniteError, match="3 non-finite steps in a row"):
        train(cfg, out_dir=tmp_path / "run", log=lambda *a: None)
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records if r.get("skipped")] == [3, 4, 5]
    assert [r["skipped_steps"] for r in records if "tokens_per_s" in r] == [0, 0, 1, 2]
    ckpts = list((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert ckpts and all(torch.isfinite(p).all() for ck in ckpts
                         for p in load_checkpoint(ck)[0].parameters())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_run_on_cpu(data_dir, precision):
    model, opt, sched, data, cfg, env = _setup(data_dir, precision)
    before = model.wte.weight.detach().clone()
    losses = [train_step(model, opt, sched, data, cfg.train, cfg.model.block_size, s, env)
              for s in range(3)]
    assert all(math.isfinite(r.loss) for r in losses)
    assert not torch.equal(before, model.wte.weight)  # the weights moved
    if precision == "fp16":
        assert env.scaler.get_scale() > 0


@pytest.mark.parametrize("moe", [False, True])
def test_grad_checkpointing_gives_the_same_gradients(moe):
    cfg = tiny_config(moe=moe, dropout=0.1)
    if moe:
        cfg = dataclasses.replace(cfg, moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=64,
                                                     router="noisy_topk"))
    torch.manual_seed(0)
    model = GPT(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
    grads = []
    for ckpt in (False, True):
        model.grad_checkpointing = ckpt
        model.zero_grad()
        torch.manual_seed(1)  # same dropout masks and router noise
        out = model(x, x)
        (out.loss + out.aux_loss).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=0, atol=1e-6, msg=name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_step_on_cuda_with_fused_adamw(data_dir):
    """One bf16-autocast step on CUDA with fused AdamW against the same step (same weights,
    same batch) in fp32 on the CPU: the same loss and gradient norm within bf16 rounding,
    fp32 master weights, and the same update (AdamW's first step moves each weight by about
    lr * sign(grad), so a wrong gradient or optimizer shows as a different direction)."""
    import copy

    import torch.nn.functional as F

    # topk: no router noise, whose random draws would differ between the devices
    model, opt, sched, data, cfg, env = _setup(data_dir, router="topk")
    device = torch.device("cuda")
    gpu = copy.deepcopy(model).to(device)
    gpu_opt = build_optimizer(gpu, cfg.train, device)
    assert gpu_opt.defaults["fused"] and not opt.defaults.get("fused")
    before = [p.detach().clone() for p in model.parameters()]
    gpu_env = Env(device, torch.autocast("cuda", dtype=torch.bfloat16), None, Dist())
    block = cfg.model.block_size
    ours = train_step(gpu, gpu_opt, build_scheduler(gpu_opt, cfg.train), data, cfg.train, block,
                      0, gpu_env)
    ref = train_step(model, opt, sched, data, cfg.train, block, 0, env)
    assert not ours.skipped and ours.tokens == ref.tokens == 2 * 16
    assert ours.loss == pytest.approx(ref.loss, rel=1e-2)
    assert ours.grad_norm == pytest.approx(ref.grad_norm, rel=5e-2)
    assert all(p.dtype == torch.float32 for p in gpu.parameters())
    moved_gpu = torch.cat([(p.detach().cpu() - b).flatten()
                           for p, b in zip(gpu.parameters(), before, strict=True)])
    moved_cpu = torch.cat([(p.detach() - b).flatten()
                           for p, b in zip(model.parameters(), before, strict=True)])
    assert moved_gpu.abs().max() > 0.5 * cfg.train.lr  # the weights moved
    assert F.cosine_similarity(moved_gpu, moved_cpu, dim=0) > 0.95


@pytest.mark.slow
def test_compiled_checkpointed_run_saves_plain_keys(tmp_path, data_dir, monkeypatch):
    import functools

    from slms.config import load_config

    # the eager backend exercises the torch.compile wrapper without inductor's minute of codegen
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))

    cfg = load_config("configs/tiny.toml", [
        f"data.path={data_dir}", "model.n_layer=1", "model.n_embd=32", "model.block_size=16",
        "model.moe.expert_hidden=32", "train.batch_size=2", "train.max_steps=2",
        "train.compile=true", "train.grad_checkpointing=true"])
    run = train(cfg, out_dir=tmp_path / "run", log=lambda *a: None)
    model = load_checkpoint(run / "checkpoints" / "step-2")[0]  # strict: no _orig_mod. keys
    assert not any("_orig_mod" in k for k in model.state_dict())


def test_accumulation_weighs_every_real_target_equally(stories, tokenizer, tmp_path):
    """Padded rows: the step's gradient is that of the mean loss over all real targets of its
    micro-batches, not the mean of per-micro-batch means (which over-weighs short rows)."""
    import copy

    import torch.nn.functional as F

    from slms.data.prepare import PrepareOptions, prepare_source
    from slms.data.sources import Source
    from slms.model import IGNORE_INDEX

    chosen = {"train": stories[:30], "val": stories[30:32]}
    src = Source(None)
    src.iter = lambda split: iter(chosen[split])  # an in-memory source
    block = 400  # longer than every story: rows end in pads, differently
    prepare_source(src, tokenizer, tmp_path / "pad", PrepareOptions(layout="padded",
                                                                    block_size=block))
    data = PackedData(tmp_path / "pad")
    torch.manual_seed(0)
    mcfg = tiny_config(block_size=block)
    cfg = RunConfig(model=mcfg, train=TrainConfig(batch_size=2, grad_accum=2, grad_clip=0.0,
                                                  warmup_steps=0))
    model = GPT(mcfg)
    before = copy.deepcopy(model)
    opt = build_optimizer(model, cfg.train, torch.device("cpu"))
    seen: dict[str, torch.Tensor] = {}
    opt.register_step_pre_hook(lambda *_: seen.update(
        {n: p.grad.clone() for n, p in model.named_parameters()}))
    env = Env(torch.device("cpu"), nullcontext(), None, Dist())
    result = train_step(model, opt, build_scheduler(opt, cfg.train), data, cfg.train, block, 0,
                        env)
    # the reference: the same two micro-batches, summed losses over the real targets / their count
    batches = [data.train_batch(2, block, cfg.train.seed, 0, micro=i) for i in range(2)]
    counts = [int((y != IGNORE_INDEX).sum()) for _, y in batches]
    assert counts[0] != counts[1]  # else equal weighting would be right too
    nats = sum(F.cross_entropy(before(x).logits.flatten(0, 1), y.flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum") for x, y in batches)
    (nats / sum(counts)).backward()
    assert result.tokens == sum(counts)
    for name, p in before.named_parameters():
        torch.testing.assert_close(seen[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert result.loss == pytest.approx(nats.item() / sum(counts), rel=1e-6)


KEEP_MEMORY_PROBE = """
import resource, sys, torch
from slms.memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else True
def step():  # a training step's large tensors: allocated, used, freed
    a, b = torch.ones(4 << 20), torch.ones(4 << 20)  # 16 MB each
    c = a + b
    del a, b, c
for _ in range(10):  # the heap grows to its working size
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_keep_freed_memory_stops_large_tensors_faulting_in_every_step():
    """Once freed memory is kept, a step's large tensors reuse resident pages: fewer page
    faults in 10 steps than one 16 MB tensor has pages. (With glibc's defaults the same probe
    faults all 12,000 pages of every step in most processes here: 4 of 5 runs.)"""
    out = subprocess.run([sys.executable, "-c", KEEP_MEMORY_PROBE, "keep"], check=True,
                         capture_output=True, text=True).stdout.split()
    assert out[0] == "True" and int(out[1]) < 4096, out


def test_fp16_step_skipped_by_the_scaler_leaves_the_bias_router_alone(data_dir):
    """The grad scaler skips a step with inf gradients (routine under fp16): the bias router's
    load of that step is discarded, as for any step whose weights did not move."""
    model, opt, sched, data, cfg, env = _setup(data_dir, precision="fp16", router="bias")
    block = cfg.model.block_size
    router = model.blocks[0].ffn.router
    assert not train_step(model, opt, sched, data, cfg.train, block, 0, env).skipped
    bias = router.expert_bias.clone()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "expert_bias" not in k}
    scale = env.scaler.get_scale()
    hook = model.lm_head.weight.register_hook(lambda g: g * float("inf"))
    result = train_step(model, opt, sched, data, cfg.train, block, 1, env)
    hook.remove()
    assert not result.skipped and not math.isfinite(result.grad_norm)  # routine, not an error
    assert env.scaler.get_scale() < scale
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items() if k in weights)
    assert torch.equal(router.expert_bias, bias) and router.load_E.sum() == 0
