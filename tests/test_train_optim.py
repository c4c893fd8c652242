"""Parameter groups of the optimizer: weight decay by role."""

import pytest
import torch

from conftest import tiny_config
from slms.config import TrainConfig
from slms.model import GPT
from slms.train.optim import build_optimizer


def test_weight_decay_by_role_not_by_dimension():
    """Matmul and embedding weights (the experts' stacked w1/w2 too) are decayed; biases (the
    experts' stacked 2-D ones too) and norms are not, in MoE and dense models alike."""
    for moe in (False, True):
        model = GPT(tiny_config(moe=moe))
        opt = build_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
        groups = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
        names = {id(p): n for n, p in model.named_parameters()}
        decayed = sorted(names[i] for i, wd in groups.items() if wd > 0)
        kept = sorted(names[i] for i, wd in groups.items() if wd == 0)
        assert len(groups) == len(names)  # every parameter once (tied weight once)
        assert all(n.endswith(("weight", "w1_EDH", "w2_EHD")) for n in decayed)
        assert not any(n.startswith("ln") or ".ln" in n for n in decayed)
        assert all(n.endswith(("bias", "b1_EH", "b2_ED")) or "ln" in n for n in kept)
        if moe:
            assert "blocks.0.ffn.experts.b1_EH" in kept and "blocks.0.ffn.experts.b2_ED" in kept
            assert "blocks.0.ffn.experts.w1_EDH" in decayed
            assert "blocks.0.ffn.router.gate.weight" in decayed
        assert "wte.weight" in decayed and "wpe.weight" in decayed


def test_muon_trains_hidden_matrices_and_adamw_the_rest():
    from slms.train.optim import muon_parameters

    model = GPT(tiny_config(moe=True))
    names = {id(p): n for n, p in model.named_parameters()}
    muon = sorted(names[i] for i in muon_parameters(model))
    assert "blocks.0.attn.qkv.weight" in muon and "blocks.0.ffn.experts.w1_EDH" in muon
    assert not any("router" in n or "wte" in n or "lm_head" in n or "ln" in n for n in muon)
    opt = build_optimizer(model, TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02),
                          torch.device("cpu"))
    for g in opt.param_groups:
        assert g["lr"] == (0.02 if g["muon"] else 1e-3)
        assert all(p.dim() >= 2 for p in g["params"]) or not g["muon"]


def test_newton_schulz_orthogonalises_each_expert():
    from slms.train.muon import newton_schulz

    g = torch.randn(3, 16, 48, generator=torch.Generator().manual_seed(0))
    o = newton_schulz(g)
    sv = torch.linalg.svdvals(o)  # (3, 16): about 1 (the quintic's band is ~0.7-1.2)
    assert sv.shape == (3, 16) and sv.min() > 0.5 and sv.max() < 1.3
    # the singular vectors are g's: o is close to U V^T of each slice
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    cos = torch.nn.functional.cosine_similarity(o.flatten(1), (u @ vh).flatten(1))
    assert (cos > 0.95).all()
    tall = newton_schulz(g.mT)  # the transposed problem gives the transposed answer
    torch.testing.assert_close(tall, o.mT, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("moe", [False, True])
def test_muon_split_orthogonalises_each_block_of_a_fused_matrix(moe):
    """With train.muon_split the first update of the fused qkv is Q's, K's and V's own
    orthogonalised gradients side by side, each scaled by its own shape, and SwiGLU's gate and
    up likewise (rows of an MLP's fc, columns of the experts' w1); without it, the whole's."""
    from slms.train.muon import newton_schulz

    lr = 1e-2
    for split in (True, False):
        torch.manual_seed(0)
        model = GPT(tiny_config(moe=moe, activation="swiglu"))
        cfg = TrainConfig(optimizer="muon", lr=lr, weight_decay=0.0, muon_split=split)
        opt = build_optimizer(model, cfg, torch.device("cpu"))
        x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
        model(x, x).loss.backward()
        fc = model.blocks[0].ffn.experts.w1_EDH if moe else model.blocks[0].ffn.fc.weight
        cases = [(model.blocks[0].attn.qkv.weight, (-2, 3)), (fc, (-1, 2) if moe else (-2, 2))]
        m = cfg.muon_momentum  # the first Nesterov step: g lerped to the buffer (1 - m) g
        before = [(w.detach().clone(), w.grad.lerp((1 - m) * w.grad, m)) for w, _ in cases]
        opt.step()
        for (w, (dim, n)), (w0, g) in zip(cases, before, strict=True):
            parts = g.chunk(n, dim) if split else (g,)
            want = torch.cat([newton_schulz(b) * 0.2 * max(b.shape[-2:]) ** 0.5 for b in parts],
                             dim)
            torch.testing.assert_close(w0 - w.detach(), lr * want, rtol=1e-4, atol=1e-7)


def test_the_adamw_part_equals_torch_adamw():
    torch.manual_seed(0)
    ref, ours = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    ours.load_state_dict(ref.state_dict())
    from slms.train.muon import Muon

    a = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    b = Muon([{"params": list(ours.parameters()), "weight_decay": 0.1}], lr=1e-2,
             betas=(0.9, 0.95))
    for step in range(3):
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(step))
        for m, opt in ((ref, a), (ours, b)):
            opt.zero_grad()
            m(x).square().sum().backward()
            opt.step()
    for p, q in zip(ref.parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_muon_run_resumes_bitwise(tmp_path, data_dir):
    from slms.cli import main
    from train_helpers import TINY, losses, run_cli

    args = ["train", "configs/tiny.toml", f"data.path={data_dir}", *TINY, "train.max_steps=6",
            "train.optimizer=\"muon\"", "train.muon_lr=0.01"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main([*args, "--out", str(ref)]) == 0
    killed = run_cli([*args, "--out", str(run)], signal_at=("SIGKILL", 4))
    assert killed.returncode == -9, killed.stderr
    assert main(["train", "--resume", str(run)]) == 0
    assert losses(run) == losses(ref) and len(losses(ref)) == 6
    assert losses(ref)[-1][1] < losses(ref)[0][1]  # it learns


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_muon_on_two_gloo_processes_matches_one(tmp_path, data_dir, parallel):
    import socket

    import torch.multiprocessing as mp

    from slms.checkpoint import load_checkpoint
    from slms.config import load_config
    from slms.train.trainer import train
    from train_helpers import dist_worker, losses

    base = [f"data.path={data_dir}", "model.n_layer=2", "model.n_embd=32", "model.n_head=2",
            "model.block_size=32", "model.moe.expert_hidden=32", "model.moe.router=\"topk\"",
            "train.batch_size=4", "train.max_steps=3", "train.log_every=1",
            "train.eval_every=3", "train.checkpoint_every=3", "train.warmup_steps=1",
            "train.optimizer=\"muon\""]
    single = tmp_path / "single"
    train(load_config("configs/tiny.toml", [*base, "train.grad_accum=2"]), out_dir=single,
          log=lambda *a: None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    mp.spawn(dist_worker, args=(2, port, [*base, f"train.parallel=\"{parallel}\"",
                                          "train.threads=1"], str(out)), nprocs=2, join=True)
    got = load_checkpoint(out / "checkpoints" / "step-3")[0].state_dict()
    ref = load_checkpoint(single / "checkpoints" / "step-3")[0].state_dict()
    for name, w in ref.items():
        torch.testing.assert_close(got[name], w, rtol=1e-4, atol=1e-5, msg=name)
    assert [s for s, _ in losses(out)] == [1, 2, 3]


def _factors(sched, n):
    out = []
    for _ in range(n):
        out.append(sched.get_last_lr()[0] / sched.base_lrs[0])
        sched.optimizer.step()
        sched.step()
    return out


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_a_refit_keeps_the_learning_rate_continuous(schedule):
    """Refit at step 750 of 1,000 to 1,150 or 870 steps: the factor of step 750 is what it
    was (a rebuilt cosine jumped +81% / -68% there), the decay then ends at the new total."""
    from slms.train.optim import Schedule, build_scheduler, schedule_of

    cfg = TrainConfig(max_steps=1000, warmup_steps=50, schedule=schedule, min_lr_ratio=0.1)
    for total in (1150, 870):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = build_scheduler(opt, cfg)
        before = _factors(sched, 750)
        plain = Schedule(cfg)
        assert before == pytest.approx([plain(s) for s in range(750)], rel=1e-12)
        assert sched.get_last_lr()[0] == pytest.approx(plain(750), rel=1e-12)
        schedule_of(sched).refit(750, total)
        after = _factors(sched, total - 750)
        assert after[0] == pytest.approx(plain(750), rel=1e-12)  # continuous
        steps = [b - a for a, b in zip(after, after[1:], strict=False)]
        assert all(d < 0 for d in steps) and max(-d for d in steps) < 3 * (-steps[0] + 1e-9)
        end = 0.1 if schedule == "cosine" else 1 / 25 / 1e4
        assert after[-1] == pytest.approx(end, rel=1e-3)  # the last step is one before T


def test_onecycle_equals_torch_onecyclelr():
    from slms.train.optim import build_scheduler

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    ref = torch.optim.lr_scheduler.OneCycleLR(torch.optim.SGD([p], lr=0.1), max_lr=0.1,
                                              total_steps=200)
    ours = build_scheduler(opt, TrainConfig(max_steps=200, schedule="onecycle"))
    for _ in range(200):
        assert ours.get_last_lr()[0] == pytest.approx(ref.get_last_lr()[0], rel=1e-9)
        opt.step()
        ref.optimizer.step()
        ours.step()
        ref.step()


def test_a_muon_run_resumes_with_its_own_split(tmp_path, data_dir, capsys):
    import json

    from slms.cli import main
    from slms.rundir import RunDir
    from train_helpers import TINY

    run = tmp_path / "run"
    args = ["train", "configs/tiny.toml", f"data.path={data_dir}", *TINY,
            "train.optimizer=\"muon\"", "train.muon_split=false", "--out", str(run)]
    assert main([*args, "train.max_steps=3"]) == 0
    # a run written before train.muon_split existed took the fused matrices whole
    config = json.loads(RunDir(run).config_file.read_text())
    del config["train"]["muon_split"]
    RunDir(run).config_file.write_text(json.dumps(config))
    assert RunDir(run).read_config()["train"]["muon_split"] is False
    # other groups than the checkpoint's: one line that says so, and the checkpoint is kept
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "train.max_steps=6",
                 "train.muon_split=true"]) != 0
    err = capsys.readouterr().err
    assert "optimizer settings changed" in err and "muon_split" in err, err
    assert [p.name for p in RunDir(run).checkpoints()] == ["step-3"]
    assert main(["train", "--resume", str(run), "train.max_steps=6"]) == 0
    assert [p.name for p in RunDir(run).checkpoints()][-1] == "step-6"
