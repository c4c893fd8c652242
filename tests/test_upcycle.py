import math

import pytest
import torch
from tests.conftest import tiny_config
from tests.test_cli import TINY

from slms.checkpoint import load_checkpoint, save_checkpoint
from slms.cli import main
from slms.model import GPT
from slms.train.metrics import read_metrics
from slms.upcycle import train_overrides, upcycle, upcycle_checkpoint


def dense(**kw) -> GPT:
    torch.manual_seed(0)
    model = GPT(tiny_config(**kw)).eval()
    with torch.no_grad():  # nonzero biases, so that copying them is checked too
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    return model


def logits(model: GPT, seed: int = 1) -> torch.Tensor:
    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("activation", ["relu", "gelu", "relu2", "swiglu"])
@pytest.mark.parametrize("router", ["topk", "noisy_topk", "bias"])
@pytest.mark.parametrize("top_k,every", [(1, 1), (2, 1), (2, 2)])
def test_upcycled_model_computes_the_dense_function(activation, router, top_k, every):
    m = dense(activation=activation)
    u = upcycle(m, 4, top_k, router, every=every)
    assert [u.cfg.is_moe_layer(i) for i in range(2)] == ([True, True] if every == 1
                                                         else [False, True])
    assert not u.training
    torch.testing.assert_close(logits(u), logits(m), rtol=1e-5, atol=1e-5)


def test_no_biases_and_training_mode_noise():
    m = dense(bias=False)
    u = upcycle(m, 4, 2, "noisy_topk").train()
    ex = u.blocks[0].ffn.experts
    assert ex.b1_EH.abs().sum() == 0 and ex.b2_ED.abs().sum() == 0
    # the router noise reweights identical experts with weights summing to one
    torch.testing.assert_close(logits(u), logits(m), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["relu2", "swiglu"])
def test_upcycled_without_biases_round_trips_a_checkpoint(activation, tmp_path, tokenizer):
    """--no-bias: routers and experts without bias parameters, the dense function computed,
    the checkpoint saved and loaded with identical logits and its overrides naming the option;
    refused for a dense model with MLP biases, which bias-free experts could not copy."""
    m = dense(bias=False, activation=activation)
    with pytest.raises(ValueError, match="model.bias=false"):
        upcycle(dense(), 4, 2, bias=False)
    save_checkpoint(tmp_path / "dense", m, tokenizer)
    u, path = upcycle_checkpoint(tmp_path / "dense", tmp_path / "moe", 4, 2, "noisy_topk",
                                 bias=False)
    assert not [n for n in u.state_dict() if "b1_EH" in n or "b2_ED" in n or "router" in n
                and n.endswith("bias")]
    torch.testing.assert_close(logits(u), logits(m), rtol=1e-5, atol=1e-5)
    loaded, _, meta = load_checkpoint(path)
    assert loaded.cfg.moe.bias is False and meta["upcycle"]["bias"] is False
    assert torch.equal(logits(loaded), logits(u))
    assert "model.moe.bias=false" in train_overrides(loaded.cfg.moe, path)
    assert "model.moe.bias=false" not in train_overrides(upcycle(m, 4, 2).cfg.moe, path)


def test_layout_of_the_copied_experts():
    m = dense(activation="swiglu")
    ex = upcycle(m, 3, 2, every=1).blocks[1].ffn.experts
    mlp = m.blocks[1].ffn
    for e in range(3):
        assert torch.equal(ex.w1_EDH[e], mlp.fc.weight.t())
        assert torch.equal(ex.w2_EHD[e], mlp.proj.weight.t())
        assert torch.equal(ex.b1_EH[e], mlp.fc.bias) and torch.equal(ex.b2_ED[e], mlp.proj.bias)


def test_expert_noise_makes_experts_differ():
    m = dense()
    u = upcycle(m, 4, 2, expert_noise=0.01, seed=3)
    w = u.blocks[0].ffn.experts.w1_EDH
    assert not torch.equal(w[0], w[1])
    rel = ((w[0] - m.blocks[0].ffn.fc.weight.t()).std() / w[0].std()).item()
    assert 0.005 < rel < 0.02
    a, b = logits(u), logits(m)
    assert not torch.equal(a, b)
    torch.testing.assert_close(a, b, rtol=0, atol=0.05)


def test_bad_values_are_value_errors(tmp_path, tokenizer):
    m = dense()
    with pytest.raises(ValueError, match="top_k"):
        upcycle(m, 4, 5)
    with pytest.raises(ValueError, match="already a Mixture-of-Experts"):
        upcycle(GPT(tiny_config(moe=True)), 4, 2)
    with pytest.raises(ValueError, match="expert-noise"):
        upcycle(m, 4, 2, expert_noise=-1)
    save_checkpoint(tmp_path / "dense", m, tokenizer)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        upcycle_checkpoint(tmp_path / "dense", tmp_path / "full", 4, 2)
    (tmp_path / "empty").mkdir()
    u, path = upcycle_checkpoint(tmp_path / "dense", tmp_path / "empty", 4, 2)
    loaded, _, meta = load_checkpoint(path)
    assert meta["upcycle"]["n_experts"] == 4
    torch.testing.assert_close(logits(loaded), logits(m), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_cli_upcycle_then_continue_training(tmp_path, data_dir, capsys):
    common = ["train", "configs/tiny.toml", f"data.path={data_dir}", *TINY, "train.lr=3e-3"]
    assert main([*common, "model.moe=none", "train.max_steps=30", "train.log_every=10",
                 "train.eval_every=30", "train.checkpoint_every=30",
                 "--out", str(tmp_path / "dense")]) == 0
    dense_last = [r["loss"] for r in read_metrics(tmp_path / "dense") if "loss" in r][-1]
    capsys.readouterr()
    ckpt = tmp_path / "moe-init"
    assert main(["upcycle", str(tmp_path / "dense"), "--experts", "4", "--top-k", "2",
                 "--out", str(ckpt)]) == 0
    out = capsys.readouterr()
    overrides = out.out.strip().splitlines()[-1].split()
    assert overrides[-1] == f"train.init_from={ckpt}"
    assert out.err == ""  # exact copies behind a new router separate: nothing to warn of
    assert main(["upcycle", str(tmp_path / "dense"), "--experts", "4", "--expert-noise", "0.01",
                 "--out", str(tmp_path / "noisy")]) == 0
    assert capsys.readouterr().err == ""
    assert main([*common, *overrides, "train.max_steps=2", "train.log_every=1",
                 "--out", str(tmp_path / "moe")]) == 0
    first = [r for r in read_metrics(tmp_path / "moe") if "loss" in r][0]
    assert len(first["moe"]) == 2
    assert abs(first["loss"] - dense_last) < 0.3 < math.log(300) - first["loss"]

    def fails(argv: list[str], message: str) -> None:
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err

    fails(["upcycle", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")], "not found")
    fails(["upcycle", str(tmp_path / "moe"), "--out", str(tmp_path / "x")],
          "already a Mixture-of-Experts")
    fails(["upcycle", str(tmp_path / "dense"), "--out", str(ckpt)], "not empty")
    fails(["upcycle", str(tmp_path / "dense"), "--experts", "4", "--top-k", "5",
           "--out", str(tmp_path / "x")], "top_k")
    fails([*common, *overrides, "model.moe.top_k=1", "train.max_steps=1",
           "--out", str(tmp_path / "bad")], "model.moe.top_k=1 (checkpoint: 2)")
    fails([*common, "train.init_from=no/such/ckpt", "train.max_steps=1",
           "--out", str(tmp_path / "bad2")], "not found")
    # a refused init_from leaves no run directory behind
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad2").exists()


@pytest.mark.parametrize("router", ["topk", "bias"])
def test_upcycled_routers_spread_tokens_and_learn(router):
    """The router starts as a new model's (not at zero, where every token tied and went to the
    same K experts): tokens reach more than K experts, which all get gradients, and after one
    optimizer step (the experts then differ) the LM loss has a gradient on the router."""
    m = dense()
    u = upcycle(m, 4, 2, router, seed=0).train()
    start = u.blocks[0].ffn.router.gate.weight.clone()
    assert start.abs().sum() > 0
    assert torch.equal(upcycle(m, 4, 2, router, seed=0).blocks[0].ffn.router.gate.weight, start)
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, 300, (4, 24), generator=gen)
    y = torch.randint(0, 300, (4, 24), generator=gen)
    layer = u.blocks[0].ffn
    h = torch.randn(96, u.cfg.n_embd, generator=gen)
    assert layer.router(h).experts_TK.unique().numel() == 4  # not one tie for every token
    opt = torch.optim.SGD(u.parameters(), lr=0.1)
    u(x, y).loss.backward()
    trained = sum(float(g.abs().sum()) > 0 for g in layer.experts.w1_EDH.grad)
    assert trained > 2  # a zero router tied: the same K = 2 experts for every token
    opt.step()
    opt.zero_grad()
    u(x, y).loss.backward()
    assert float(layer.router.gate.weight.grad.abs().sum()) > 0
