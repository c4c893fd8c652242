import math

import pytest
import torch

from slms.config import MoEConfig
from slms.model.moe import (
    MoE,
    Routing,
    capacity,
    load_balancing_loss,
    reference_dispatch,
    router_z_loss,
    sorted_dispatch,
)


def make_moe(E: int, K: int, router: str = "topk", cf: float = 0.0, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    cfg = MoEConfig(n_experts=E, top_k=K, router=router, capacity_factor=cf)
    moe = MoE(16, cfg, hidden=24, activation="relu")
    with torch.no_grad():  # non-zero biases so that bias gradients are compared too
        for p in moe.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return moe


def grads(module: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for p in module.parameters()] + [x.grad.clone()]


@pytest.mark.parametrize("impl", ["slices", "grouped_mm"])
@pytest.mark.parametrize("router", ["noisy_topk", "topk", "bias"])
@pytest.mark.parametrize("E,K", [(1, 1), (4, 1), (4, 2), (8, 1), (8, 2)])
@pytest.mark.parametrize("cf", [0.0, 0.75])
@pytest.mark.parametrize("T", [1, 37])
def test_sorted_dispatch_equals_reference_loop(impl, router, E, K, cf, T):
    if impl == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not available")
    results = []
    for reference in (True, False):
        moe = make_moe(E, K, router, cf)
        moe.experts.impl = impl
        moe.reference = reference
        moe.eval()  # noise off: both paths must see identical routing
        x = torch.randn(1, T, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y, _ = moe(x)
        # a non-uniform output gradient; 0 * x keeps the graph when capacity drops every token
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().add(0 * x.sum()).backward()
        results.append((y.detach(), grads(moe, x)))
    (y_ref, g_ref), (y_fast, g_fast) = results
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_experts_without_tokens_and_capacity_drops_are_counted():
    moe = make_moe(4, 1).eval()
    x_TD = torch.randn(10, 16)
    # every token to expert 2: experts 0, 1, 3 get none; capacity floor(1 * 1 * 10 / 4) = 2
    r = Routing(torch.full((10, 1), 2), torch.ones(10, 1), torch.zeros(10, 4),
                torch.full((10, 4), 0.25))
    cap = capacity(MoEConfig(n_experts=4, top_k=1, capacity_factor=1.0), 10)
    assert cap == 2
    y, kept = sorted_dispatch(x_TD, r, moe.experts, cap)
    y_ref, kept_ref = reference_dispatch(x_TD, r, moe.experts, cap)
    torch.testing.assert_close(y, y_ref)
    assert kept.tolist() == kept_ref.tolist() == [[True]] * 2 + [[False]] * 8
    assert (y[2:] == 0).all()  # dropped tokens get nothing: the residual carries them
    y_free, kept_free = sorted_dispatch(x_TD, r, moe.experts, None)
    assert kept_free is None and (y_free[2:] != 0).any()


def test_balancing_loss_known_values():
    E, T = 8, 64
    # uniform probabilities and a perfectly even assignment: 1.0
    probs = torch.full((T, E), 1 / E)
    experts = torch.arange(T).remainder(E).view(T, 1)
    assert load_balancing_loss(probs, experts).item() == pytest.approx(1.0)
    # one-hot router sending everything to expert 3: E
    onehot = torch.zeros(T, E)
    onehot[:, 3] = 1
    assert load_balancing_loss(onehot, torch.full((T, 2), 3)).item() == pytest.approx(E)
    # invariant to the order of tokens
    probs = torch.randn(T, E).softmax(-1)
    experts = probs.topk(2).indices
    perm = torch.randperm(T)
    assert load_balancing_loss(probs[perm], experts[perm]).item() == pytest.approx(
        load_balancing_loss(probs, experts).item())


def test_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
    lse = [math.log(1 + math.e + math.e ** 2), 1 + math.log(3)]
    assert router_z_loss(logits).item() == pytest.approx((lse[0] ** 2 + lse[1] ** 2) / 2)


def test_noisy_topk_deterministic_in_eval_noisy_in_training():
    moe = make_moe(8, 2, "noisy_topk")
    x = torch.randn(2, 16, 16)
    moe.eval()
    assert torch.equal(moe(x)[0], moe(x)[0])
    moe.train()
    assert not torch.equal(moe(x)[0], moe(x)[0])


def test_aux_loss_in_training_only_and_weighted():
    moe = make_moe(4, 2, "topk")
    x = torch.randn(2, 8, 16)
    moe.train()
    _, aux = moe(x)
    r = moe.router(x.view(-1, 16))
    expected = 0.01 * load_balancing_loss(r.probs_TE, r.experts_TK) + 0.001 * router_z_loss(
        r.logits_TE)
    assert aux.item() == pytest.approx(expected.item(), rel=1e-5)
    moe.eval()
    assert moe(x)[1].item() == 0.0


def test_bias_router_moves_load_towards_balance():
    torch.manual_seed(0)
    cfg = MoEConfig(n_experts=4, top_k=1, router="bias", bias_update_rate=0.02)
    moe = MoE(16, cfg, hidden=8, activation="relu").train()
    with torch.no_grad():
        moe.router.gate.weight.mul_(4)  # token-dependent scores, so balance is reachable
        moe.router.gate.bias.copy_(torch.tensor([3.0, 0.0, 0.0, 0.0]))  # skewed to expert 0
    x = torch.randn(256, 16)

    def max_over_mean() -> float:
        load = torch.bincount(moe.router(x).experts_TK.flatten(), minlength=4).float()
        return (load.max() / load.mean()).item()

    before = max_over_mean()
    moe.router.load_E.zero_()
    for _ in range(60):
        moe.router(x)
        moe.router.update_bias()
    after = max_over_mean()
    assert before > 2.5 and after < 1.25
    assert moe.router.expert_bias.sum().abs().item() < 1e-5  # re-centred
    assert moe.router.expert_bias[0] < 0


def test_stats_report_loads():
    moe = make_moe(4, 2, "topk").eval()
    moe.reset_stats()
    moe(torch.randn(3, 10, 16))
    s = moe.pop_stats()
    assert sum(s["tokens_per_expert"]) == 60 and sum(s["share"]) == pytest.approx(1.0)
    assert s["max_over_mean"] >= 1.0 and 0 < s["entropy"] <= math.log(4) + 1e-6
