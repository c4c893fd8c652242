import functools
import math
import os

import pytest
import torch
import torch.nn.functional as F

import slms.model.moe_dispatch as dispatch_module
from slms.config import MoEConfig
from slms.model import activations, native
from slms.model.moe import MoE, Routing, capacity, load_balancing_loss, router_z_loss
from slms.model.moe_dispatch import (
    PATHS,
    DispatchPath,
    Situation,
    choose_path,
    describe,
    reference_dispatch,
    sorted_dispatch,
)
from slms.model.moe_kernels import native_activation


def make_moe(E: int, K: int, router: str = "topk", cf: float = 0.0, seed: int = 0,
             activation: str = "relu", bias: bool = True, **switches: object) -> MoE:
    """switches: MoE's test switches (impl, reference, small_n)."""
    torch.manual_seed(seed)
    cfg = MoEConfig(n_experts=E, top_k=K, router=router, capacity_factor=cf, bias=bias)
    moe = MoE(16, cfg, hidden=24, activation=activation, **switches)
    with torch.no_grad():  # non-zero biases so that bias gradients are compared too
        for p in moe.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return moe


def use_kernels(kernels: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """native: the C++ kernels (skipped where they cannot be built); python: the Python loop."""
    if kernels == "python":
        monkeypatch.setattr(native, "ops", lambda: None)
    elif native.ops() is None:
        pytest.skip("the C++ MoE kernels cannot be built here")


def train_without_noise(moe: MoE) -> None:
    """Training mode (capacity applies) with the router's noise and load counting off: the
    paths compared must see identical routing."""
    moe.train()
    moe.router.eval()


def grads(module: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for p in module.parameters()] + [x.grad.clone()]


@pytest.mark.parametrize("impl", ["native", "torch", "grouped_mm"])
@pytest.mark.parametrize("router", ["noisy_topk", "topk", "bias"])
@pytest.mark.parametrize("E,K", [(1, 1), (4, 1), (4, 2), (8, 1), (8, 2)])
@pytest.mark.parametrize("cf", [0.0, 0.75])
@pytest.mark.parametrize("T,small_n", [(1, 64), (37, 0), (37, 64)])
def test_sorted_dispatch_equals_reference_loop(impl, router, E, K, cf, T, small_n, monkeypatch,
                                               activation="relu"):
    """Outputs and all gradients; small_n picks the few-assignments combine or the gathers.

    native: the C++ kernels (the experts' loop, the decode kernel); torch: the same loop in
    Python."""
    if impl == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not available")
    use_kernels("native" if impl == "native" else "python", monkeypatch)
    results = []
    for reference in (True, False):
        moe = make_moe(E, K, router, cf, activation=activation, impl=impl, reference=reference,
                       small_n=small_n)
        train_without_noise(moe)
        x = torch.randn(1, T, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y, _ = moe(x)
        # a non-uniform output gradient; 0 * x keeps the graph when capacity drops every token
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().add(0 * x.sum()).backward()
        results.append((y.detach(), grads(moe, x)))
    (y_ref, g_ref), (y_fast, g_fast) = results
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["native", "torch"])
@pytest.mark.parametrize("T,small_n", [(1, 64), (37, 0), (37, 64)])
def test_gelu_experts_equal_reference_loop(impl, T, small_n, monkeypatch):
    test_sorted_dispatch_equals_reference_loop(impl, "topk", 8, 2, 0.0, T, small_n,
                                               monkeypatch, activation="gelu")


@pytest.mark.parametrize("activation", ["relu2", "swiglu"])
@pytest.mark.parametrize("impl", ["native", "torch", "grouped_mm"])
@pytest.mark.parametrize("cf", [0.0, 0.75])
@pytest.mark.parametrize("T,small_n", [(1, 64), (37, 0), (37, 64)])
def test_relu2_and_swiglu_experts_equal_reference_loop(activation, impl, cf, T, small_n,
                                                       monkeypatch):
    """Outputs and every gradient (the hand-written backward of each activation): relu2 by the
    C++ kernels where "native" is asked, swiglu (which they do not implement) by the Python loop
    there too."""
    if impl == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not available")
    test_sorted_dispatch_equals_reference_loop(impl, "topk", 8, 2, cf, T, small_n,
                                               monkeypatch, activation=activation)


@pytest.mark.parametrize("activation", ["relu2", "swiglu"])
@pytest.mark.parametrize("T", [1, 8, 37])
def test_relu2_and_swiglu_inference_paths_equal_reference_loop(activation, T):
    x = torch.randn(T, 1, 16, generator=torch.Generator().manual_seed(2))
    outs = []
    for reference in (True, False):
        moe = make_moe(8, 2, "topk", activation=activation, reference=reference).eval()
        with torch.no_grad():
            outs.append(moe(x)[0])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)


def test_swiglu_experts_have_two_thirds_width_and_three_matrices():
    moe = make_moe(4, 2, activation="swiglu")
    assert moe.experts.w1_EDH.shape == (4, 16, 2 * 16) and moe.experts.w2_EHD.shape == (4, 16, 16)


@pytest.mark.parametrize("router", ["noisy_topk", "topk", "bias"])
@pytest.mark.parametrize("E,K", [(1, 1), (4, 2), (8, 1), (8, 2)])
@pytest.mark.parametrize("T", [1, 8, 37])
@pytest.mark.parametrize("kernels", ["native", "python"])
def test_inference_paths_equal_reference_loop(router, E, K, T, kernels, monkeypatch):
    """Under no_grad (generation): the C++ decode kernel, or without it the batch-1 path and
    the few-assignments combine; the gathers (37 tokens)."""
    use_kernels(kernels, monkeypatch)
    x = torch.randn(T, 1, 16, generator=torch.Generator().manual_seed(2))
    outs = []
    for reference in (True, False):
        moe = make_moe(E, K, router, reference=reference).eval()
        with torch.no_grad():
            outs.append((moe(x)[0], moe.pop_stats()))
    (y_ref, s_ref), (y_fast, s_fast) = outs
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-6)
    assert s_fast["tokens_per_expert"] == s_ref["tokens_per_expert"]
    assert s_fast["entropy"] == pytest.approx(s_ref["entropy"])


def test_autocast_bf16_runs_experts_in_bf16_close_to_fp32():
    moe = make_moe(4, 2).eval()
    x = torch.randn(2, 9, 16)
    y32 = moe(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = moe(x)[0]
        with torch.no_grad():  # the few-assignments path of generation
            y16_small = moe(x[:, :3])[0]
    torch.testing.assert_close(y16.float(), y32, rtol=0.05, atol=0.02)
    torch.testing.assert_close(y16_small.float(), y32[:, :3], rtol=0.05, atol=0.02)


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
    counts = s["tokens_per_expert"]
    assert s["max_over_mean"] == pytest.approx(max(counts) / (60 / 4))
    assert 0 < s["entropy"] <= math.log(4) + 1e-6


@pytest.mark.parametrize("training", [True, False])
def test_stats_match_a_hand_count(training):
    moe = make_moe(4, 2, "topk", cf=0.75).train(training)
    xs = [torch.randn(2, 5, 16), torch.randn(1, 8, 16)]
    counts, drops, entropies, bals = torch.zeros(4, dtype=torch.long), 0, [], []
    for x in xs:
        r = moe.router(x.view(-1, 16))
        cap = capacity(moe.cfg, len(r.experts_TK)) if training else None  # dropless in eval
        _, kept = reference_dispatch(x.view(-1, 16), r, moe.experts, cap)
        kept = torch.ones_like(r.experts_TK, dtype=torch.bool) if kept is None else kept
        counts += torch.bincount(r.experts_TK[kept], minlength=4)
        drops += int((~kept).sum())
        entropies.append(-(r.probs_TE * r.probs_TE.log()).sum(-1))
        bals.append(load_balancing_loss(r.probs_TE, r.experts_TK).item())
    moe.reset_stats()
    for x in xs:
        moe(x)
    s = moe.pop_stats()
    assert s["tokens_per_expert"] == counts.tolist()
    assert s["dropped_share"] == pytest.approx(drops / (18 * 2))
    assert s["entropy"] == pytest.approx(torch.cat(entropies).mean().item(), rel=1e-5)
    # the losses are computed (and averaged per call) in training only
    assert s["loss_calls"] == (2 if training else 0)
    assert s["aux_loss"] == pytest.approx(sum(bals) / 2 if training else 0.0, rel=1e-5)


def test_grad_checkpointing_counts_each_token_once():
    from conftest import tiny_config
    from slms.config import MoEConfig
    from slms.model import GPT

    torch.manual_seed(0)
    cfg = tiny_config(moe=True)
    cfg = type(cfg)(**{**cfg.__dict__, "moe": MoEConfig(n_experts=4, top_k=2, router="bias")})
    model = GPT(cfg).train()
    model.grad_checkpointing = True
    for layer in model.moe_layers():
        layer.reset_stats()
    x = torch.randint(0, 300, (2, 16))
    model(x, x).loss.backward()  # replays each block's forward (at least up to the router)
    for layer in model.moe_layers():
        assert sum(layer.pop_stats()["tokens_per_expert"]) == 2 * 16 * 2  # T * K, once
        assert layer.router.load_E.sum().item() == 2 * 16 * 2


def test_generation_leaves_expert_statistics_alone():
    from conftest import tiny_config
    from slms.model import GPT

    model = GPT(tiny_config(moe=True)).eval()
    model(torch.randint(0, 300, (1, 8)))
    before = [layer.stats.calls for layer in model.moe_layers()]
    model.generate(torch.zeros(1, 2, dtype=torch.long), 5, temperature=0)
    assert [layer.stats.calls for layer in model.moe_layers()] == before == [1, 1]
    assert all(layer.track_stats for layer in model.moe_layers())


@pytest.mark.parametrize("activation", ["relu", "gelu", "relu2"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("T,K,H,skew", [(1, 2, 24, False), (8, 2, 96, False), (5, 3, 203, False),
                                        (40, 1, 40, True), (16, 4, 64, True)])
def test_decode_kernel_equals_expert_by_expert(activation, threads, T, K, H, skew):
    """The C++ decode kernel: any hidden width (64- and 8-column blocks and a scalar tail: 203),
    1-4-row groups and more rows per expert than a group (skew: most tokens on one expert),
    hidden chunks shared by threads, and a zero gate weight (a dropped slot) adding nothing."""
    ops = native.ops()
    if ops is None:
        pytest.skip("the C++ MoE kernels cannot be built here")
    g = torch.Generator().manual_seed(T * 100 + H)
    E, D = 6, 48
    w1, b1 = torch.randn(E, D, H, generator=g) * 0.2, torch.randn(E, H, generator=g) * 0.1
    w2, b2 = torch.randn(E, H, D, generator=g) * 0.2, torch.randn(E, D, generator=g) * 0.1
    x = torch.randn(T, D, generator=g)
    scores = torch.randn(T, E, generator=g)
    if skew:
        scores[:, 2] += 10
    w_TK, experts_TK = scores.softmax(-1).topk(K)
    w_TK[0, -1] = 0.0
    act = functools.partial(activations.activate, activation)
    ref = torch.zeros(T, D)
    for t in range(T):
        for k in range(K):
            e = experts_TK[t, k]
            ref[t] += w_TK[t, k] * (act(x[t] @ w1[e] + b1[e]) @ w2[e] + b2[e])
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = ops.experts_decode(x, experts_TK, w_TK.contiguous(), w1, b1, w2, b2,
                                 native_activation(activation))
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_decode_kernel_runs_for_few_tokens_without_autograd_only(monkeypatch):
    """Generation's steps (few tokens, no_grad, fp32) take the kernel; training, autocast and
    inference-mode parameters behave. The kernels are forced (SLMS_NATIVE=1): timing them at
    first use would call decode too."""
    if native.ops() is None:
        pytest.skip("the C++ MoE kernels cannot be built here")
    monkeypatch.setenv("SLMS_NATIVE", "1")
    calls = []
    decode = dispatch_module.native_decode
    monkeypatch.setattr(dispatch_module, "native_decode",
                        lambda *a: (calls.append(a[0].shape[0]), decode(*a))[1])
    moe = make_moe(8, 2).eval()
    x = torch.randn(8, 1, 16)
    with torch.no_grad():
        moe(x)
        moe(torch.randn(40, 1, 16))  # 80 assignments: the sorted path
        with torch.autocast("cpu", dtype=torch.bfloat16):
            moe(x)  # bf16 compute: not the fp32 kernel
    moe.train()
    moe(x)[0].sum().backward()
    assert calls == [8]
    with torch.inference_mode():  # parameters made as inference tensors decode too
        frozen = make_moe(8, 2).eval()
        frozen(x)
    assert calls == [8, 8]


def test_native_kernels_fall_back_with_one_warning(monkeypatch, caplog):
    """No compiler (any build error): one warning naming the cause, then the Python loop;
    SLMS_NATIVE=0 turns the kernels off without a word."""
    import torch.utils.cpp_extension as cpp

    def fail(**kw):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_ops", None)
    monkeypatch.setattr(cpp, "load", fail)
    with caplog.at_level("WARNING", logger="slms.model.native"):
        assert native.ops() is None and native.ops() is None
    assert [r.getMessage() for r in caplog.records] == [
        "slms: C++ MoE kernels unavailable (Error building extension: c++: command not found); "
        "using the Python loop. Install a C++ compiler, or set SLMS_NATIVE=0 to silence this."]
    moe = make_moe(4, 2)
    moe(torch.randn(2, 5, 16))[0].sum().backward()  # the Python loop
    monkeypatch.setenv("SLMS_NATIVE", "0")
    monkeypatch.setattr(native, "_tried", False)
    with caplog.at_level("WARNING", logger="slms.model.native"):
        assert native.ops() is None
    assert len(caplog.records) == 1


@pytest.mark.parametrize("router", ["topk", "bias"])
@pytest.mark.parametrize("cf", [0.0, 0.75, 4.0])
def test_pads_are_routed_but_left_out_of_losses_and_statistics(router, cf):
    """The padded layout: outputs, router losses, the bias router's load and the statistics of
    a batch with pads equal those of its real tokens alone."""
    x = torch.randn(1, 12, 16, generator=torch.Generator().manual_seed(4))
    real = torch.zeros(1, 12, dtype=torch.bool)
    real[0, :7] = True
    outs = []
    for inputs, mask in ((x, real), (x[:, :7], None)):
        moe = make_moe(4, 2, router, cf).train()
        torch.manual_seed(5)
        y, aux = moe(inputs, mask)
        outs.append((y, aux, moe.pop_stats(), getattr(moe.router, "load_E", None)))
    (y_pad, aux_pad, s_pad, load_pad), (y_real, aux_real, s_real, load_real) = outs
    torch.testing.assert_close(y_pad[:, :7], y_real, rtol=1e-5, atol=1e-6)
    assert (y_pad[:, 7:] == 0).all()  # pads skip the experts: the residual carries them
    assert aux_pad.item() == pytest.approx(aux_real.item(), rel=1e-5)
    assert s_pad["tokens_per_expert"] == s_real["tokens_per_expert"]
    assert s_pad["dropped_share"] == s_real["dropped_share"]  # capacity of the real tokens
    assert sum(s_pad["tokens_per_expert"]) == (7 * 2 if cf != 0.75 else
                                               sum(s_real["tokens_per_expert"]))
    assert s_pad["entropy"] == pytest.approx(s_real["entropy"], rel=1e-5)
    assert s_pad["z_loss"] == pytest.approx(s_real["z_loss"], rel=1e-5)
    if router == "bias":
        assert load_pad.tolist() == load_real.tolist()


@pytest.mark.parametrize("router", ["noisy_topk", "topk", "bias"])
@pytest.mark.parametrize("E,K", [(1, 1), (4, 2), (8, 2)])
@pytest.mark.parametrize("cf", [0.0, 0.75])
def test_pads_skip_the_experts_as_in_the_reference_loop(router, E, K, cf):
    """With pads: outputs and all gradients equal the reference loop's; pads get 0."""
    real = torch.rand(1, 37, generator=torch.Generator().manual_seed(6)) < 0.6
    results = []
    for reference in (True, False):
        moe = make_moe(E, K, router, cf, reference=reference)
        train_without_noise(moe)
        x = torch.randn(1, 37, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y, _ = moe(x, real)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().add(0 * x.sum()).backward()
        results.append((y.detach(), grads(moe, x)))
    (y_ref, g_ref), (y_fast, g_fast) = results
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-6)
    assert (y_fast[~real] == 0).all()
    for a, b in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_native_experts_run_under_inference_mode_and_with_few_experts(monkeypatch):
    """The C++ loop's worker threads get the caller's inference mode; fewer experts with tokens
    than threads run on the calling thread (its ops threaded): both equal the Python loop."""
    if native.ops() is None:
        pytest.skip("the C++ MoE kernels cannot be built here")
    assert torch.get_num_threads() >= 2
    x = torch.randn(2, 40, 16, generator=torch.Generator().manual_seed(6))
    for E, K in ((8, 2), (1, 1)):
        outs = []
        for kernels in ("native", "python"):
            with monkeypatch.context() as m:
                use_kernels(kernels, m)
                moe = make_moe(E, K).eval()
                with torch.inference_mode():  # 80 assignments: the sorted path
                    outs.append(moe(x)[0])
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def test_build_failures_name_the_error_and_stale_locks_are_cleared(tmp_path):
    msg = ("Error building extension 'slms_moe_cpu_x': [1/2] c++ -MMD -O3 -c moe_cpu.cpp\n"
           "FAILED: moe_cpu.o\nmoe_cpu.cpp:3:10: fatal error: torch/library.h: No such file\n"
           "compilation terminated.\nninja: build stopped: subcommand failed.")
    assert native._first_error(RuntimeError(msg)) == (
        "moe_cpu.cpp:3:10: fatal error: torch/library.h: No such file")
    lock = tmp_path / "lock"
    lock.touch()
    native._clear_stale_lock(tmp_path)
    assert lock.exists()  # a build may be running
    os.utime(lock, (0, 0))
    native._clear_stale_lock(tmp_path)
    assert not lock.exists()  # left by a killed build: torch would wait on it forever


def test_balancing_loss_is_one_when_balanced_and_at_most_e_over_k():
    E, K, T = 8, 2, 16
    # perfect balance: every expert gets T*K/E slots and mean probability 1/E
    experts_TK = torch.arange(T * K).view(T, K) % E
    assert load_balancing_loss(torch.full((T, E), 1 / E), experts_TK).item() == pytest.approx(1)
    # worst case: every token to experts 0 and 1 with all its probability on them
    probs_TE = torch.zeros(T, E)
    probs_TE[:, :K] = 1 / K
    worst = load_balancing_loss(probs_TE, torch.arange(K).expand(T, K))
    assert worst.item() == pytest.approx(E / K)


def test_router_losses_do_not_reach_the_noise_network():
    """The noise only chooses experts: the balancing and z losses are computed on the clean
    logits, so they give the noise network no gradient (a z-loss on noisy logits pushes the
    learned noise down)."""
    moe = make_moe(4, 2, "noisy_topk").train()
    x = torch.randn(2, 8, 16)
    _, aux = moe(x)
    aux.backward()
    assert moe.router.gate.weight.grad.abs().sum() > 0
    assert moe.router.noise.weight.grad is None or not moe.router.noise.weight.grad.any()
    # the losses equal those of the clean logits
    torch.manual_seed(3)
    r = moe.router(x.view(-1, 16))
    clean = F.linear(x.view(-1, 16), moe.router.gate.weight, moe.router.gate.bias)
    torch.testing.assert_close(r.clean_logits_TE, clean)
    assert not torch.equal(r.logits_TE, clean)  # the choice was noisy


@pytest.mark.parametrize("reference", [True, False])
def test_capacity_keeps_first_choices_before_second_choices(reference):
    """Choice-major priority (GShard, Switch): token 0's second choice does not take the slot
    of token 1's first choice, and row 0 of a batch does not always win."""
    moe = make_moe(2, 2, reference=reference).train()
    x_TD = torch.randn(2, 16)
    # token 0: experts (1, 0); token 1: experts (0, 1); capacity 1 per expert
    r = Routing(torch.tensor([[1, 0], [0, 1]]), torch.full((2, 2), 0.5), torch.zeros(2, 2))
    dispatch = reference_dispatch if reference else sorted_dispatch
    _, kept = dispatch(x_TD, r, moe.experts, 1)
    assert kept.tolist() == [[True, False], [True, False]]


def test_capacity_applies_in_training_only():
    """Evaluation and generation are dropless: with a capacity factor, cached decoding (one
    token per call, capacity floor(cf * K / E) = 0) would otherwise output zeros."""
    moe = make_moe(4, 2, "topk", cf=0.5)
    x = torch.randn(1, 1, 16)
    moe.eval()
    with torch.no_grad():
        y = moe(x)[0]
        moe.cfg = MoEConfig(n_experts=4, top_k=2, router="topk")  # dropless
        torch.testing.assert_close(y, moe(x)[0])
    assert y.abs().sum() > 0
    moe.cfg = MoEConfig(n_experts=4, top_k=2, router="topk", capacity_factor=0.5)
    train_without_noise(moe)
    assert (moe(x)[0] == 0).all()  # capacity 0 in training: every assignment dropped


def test_bias_router_has_no_balancing_loss_unless_asked():
    assert MoEConfig(router="bias").balance_coef == 0.0
    assert MoEConfig(router="bias", aux_loss_coef=0.01).balance_coef == 0.01
    assert MoEConfig(router="topk").balance_coef == 0.01
    moe = make_moe(4, 2, "bias").train()
    _, aux = moe(torch.randn(2, 8, 16))
    assert aux.item() == pytest.approx(0.001 * moe.pop_stats()["z_loss"], rel=1e-5)


def test_grouped_matmul_is_chosen_for_training_under_autocast():
    """On Hopper GPUs the experts run as torch._grouped_mm in bf16; under training's autocast the
    residual stream is fp32, and the choice must follow the autocast dtype, not x's."""
    from slms.model.moe_dispatch import grouped_mm_pays
    from slms.model.moe_experts import compute_dtype

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    if hasattr(torch, "_grouped_mm"):
        assert grouped_mm_pays(cuda, torch.bfloat16, (9, 0))
    assert not grouped_mm_pays(cuda, torch.float32, (9, 0))
    assert not grouped_mm_pays(cuda, torch.bfloat16, (8, 0))
    assert not grouped_mm_pays(cpu, torch.bfloat16, None)
    x = torch.randn(3, 4)
    assert compute_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(x) == torch.bfloat16
        assert compute_dtype(x.double()) == torch.float64


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm not available")
def test_grouped_path_under_autocast_computes_in_the_autocast_dtype(monkeypatch):
    """The grouped path casts x and the weights to autocast's dtype itself (grouped_mm has no
    autocast rule); gradients reach the fp32 weights."""
    seen, grouped_mm = [], torch._grouped_mm

    def spy(a, b, **kw):  # noqa: ANN001, ANN202
        seen.append((a.dtype, b.dtype))
        return grouped_mm(a, b, **kw)

    monkeypatch.setattr(torch, "_grouped_mm", spy)
    outs = []
    for autocast in (False, True):
        moe = make_moe(4, 2, impl="grouped_mm")
        train_without_noise(moe)
        x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y, _ = moe(x)
        y.sum().backward()
        assert y.dtype == torch.float32 and moe.experts.w1_EDH.grad.dtype == torch.float32
        outs.append((y.detach(), moe.experts.w1_EDH.grad))
        dt = torch.bfloat16 if autocast else torch.float32
        assert seen and set(seen) == {(dt, dt)}
        seen.clear()
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0.05, atol=0.02)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=0.1, atol=0.05)


BF16, FP32 = torch.bfloat16, torch.float32
HOPPER = {"device": "cuda", "capability": (9, 0), "kernels": False}
FEW = {"tokens": 8, "assignments": 16}  # at most SMALL_N (64) assignments
ONE = {"tokens": 1, "assignments": 2}
MANY = {"tokens": 40, "assignments": 80}
TRAIN = {"grad_mode": True, "needs_grad": True}
P = DispatchPath
# (situation, expected path): the base situation is decoding on CPU in fp32 with the kernels
CHOICES = [
    ("cpu fp32 no grad few tokens, kernels", {**FEW}, P.DECODE),
    ("cpu fp32 no grad one token, kernels", {**ONE}, P.DECODE),
    ("cpu exactly SMALL_N assignments", {"tokens": 32, "assignments": 64}, P.DECODE),
    ("cpu one token without kernels", {**ONE, "kernels": False}, P.ONE_TOKEN),
    ("cpu few tokens without kernels", {**FEW, "kernels": False}, P.SMALL_COMBINE),
    ("cpu bf16 autocast few tokens", {**FEW, "dtype": BF16, "kernels": False},
     P.SMALL_COMBINE),
    ("cpu bf16 autocast one token", {**ONE, "dtype": BF16, "kernels": False}, P.ONE_TOKEN),
    ("cpu float64 few tokens", {**FEW, "dtype": torch.float64}, P.SMALL_COMBINE),
    ("cpu SMALL_N + 1 assignments", {"tokens": 65, "assignments": 65}, P.NATIVE),
    ("cpu SMALL_N + 1 assignments, no kernels", {"tokens": 65, "assignments": 65,
                                                 "kernels": False}, P.SLICED),
    ("pads, few tokens", {**FEW, "pads": True}, P.NATIVE),
    ("pads, one token", {**ONE, "pads": True, "kernels": False}, P.SLICED),
    ("capacity, few tokens", {**FEW, "capacity": True}, P.NATIVE),
    ("capacity, one token", {**ONE, "capacity": True, "kernels": False}, P.SLICED),
    ("cpu training", {**MANY, **TRAIN}, P.NATIVE_AUTOGRAD),
    ("cpu training, no kernels", {**MANY, **TRAIN, "kernels": False}, P.SLICED_AUTOGRAD),
    ("cpu training, few tokens", {**FEW, **TRAIN}, P.NATIVE_AUTOGRAD),
    ("cpu training, capacity and pads", {**MANY, **TRAIN, "capacity": True, "pads": True},
     P.NATIVE_AUTOGRAD),
    ("cpu bf16 autocast training: the C++ loop takes bf16", {**MANY, **TRAIN, "dtype": BF16},
     P.NATIVE_AUTOGRAD),
    ("grad mode, nothing needs grad", {**FEW, "grad_mode": True}, P.NATIVE),
    ("cpu no grad many tokens", {**MANY}, P.NATIVE),
    ("measured: torch beat the decode kernel", {**FEW, "measured": "torch"}, P.SMALL_COMBINE),
    ("measured: torch beat it, one token", {**ONE, "measured": "torch"}, P.ONE_TOKEN),
    ("measured: grouped_mm beat the rest", {**FEW, "measured": "grouped_mm"},
     P.SMALL_COMBINE_GROUPED),
    ("measured: torch beat the C++ loop", {**MANY, **TRAIN, "measured": "torch"},
     P.SLICED_AUTOGRAD),
    ("measured: grouped_mm in training", {**MANY, **TRAIN, "measured": "grouped_mm"},
     P.GROUPED_MM),
    ("measured native, but bf16 decoding has no C++ kernel", {**FEW, "dtype": BF16,
                                                            "measured": "native"},
     P.SMALL_COMBINE),
    ("forced beats measured", {**MANY, **TRAIN, "measured": "grouped_mm", "impl": "torch"},
     P.SLICED_AUTOGRAD),
    ("forced native where it cannot run: torch", {**MANY, **TRAIN, "kernels": False,
                                                  "impl": "native"}, P.SLICED_AUTOGRAD),
    ("hopper bf16 training", {**MANY, **TRAIN, **HOPPER, "dtype": BF16}, P.GROUPED_MM),
    ("hopper bf16 evaluation", {**MANY, **HOPPER, "dtype": BF16}, P.GROUPED_MM),
    ("hopper bf16 decoding", {**FEW, **HOPPER, "dtype": BF16}, P.SMALL_COMBINE_GROUPED),
    ("hopper bf16 one token", {**ONE, **HOPPER, "dtype": BF16}, P.SMALL_COMBINE_GROUPED),
    ("hopper fp32 training", {**MANY, **TRAIN, **HOPPER}, P.SLICED_AUTOGRAD),
    ("hopper fp32 one token", {**ONE, **HOPPER}, P.ONE_TOKEN),
    ("ampere bf16 training", {**MANY, **TRAIN, **HOPPER, "capability": (8, 0), "dtype": BF16},
     P.SLICED_AUTOGRAD),
    ("forced grouped_mm on cpu", {**MANY, **TRAIN, "impl": "grouped_mm"}, P.GROUPED_MM),
    ("forced grouped_mm, one token", {**ONE, "impl": "grouped_mm"}, P.SMALL_COMBINE_GROUPED),
    ("forced torch, one token: not the kernel", {**ONE, "impl": "torch"}, P.ONE_TOKEN),
    ("forced torch, few tokens", {**FEW, "impl": "torch"}, P.SMALL_COMBINE),
    ("forced torch on hopper bf16", {**MANY, **TRAIN, **HOPPER, "dtype": BF16,
                                      "impl": "torch"}, P.SLICED_AUTOGRAD),
    ("reference", {**FEW, "reference": True}, P.REFERENCE),
    ("reference wins over a forced impl", {**MANY, **TRAIN, **HOPPER, "dtype": BF16,
                                            "impl": "grouped_mm", "reference": True},
     P.REFERENCE),
]


def situation(**kw: object) -> Situation:
    base = {"device": "cpu", "dtype": FP32, "capability": None, "grad_mode": False,
            "needs_grad": False, "kernels": True, "capacity": False, "pads": False}
    return Situation(**{**base, **kw})


@pytest.mark.parametrize("kw,expected", [c[1:] for c in CHOICES], ids=[c[0] for c in CHOICES])
def test_choose_path_for_each_situation(kw, expected):
    """The one place that decides how the layer runs: a table of situation -> path."""
    s = situation(**kw)
    if (expected in (P.GROUPED_MM, P.SMALL_COMBINE_GROUPED) and s.impl == "auto"
            and not hasattr(torch, "_grouped_mm")):
        expected = {P.GROUPED_MM: P.SLICED_AUTOGRAD if s.needs_grad else P.SLICED,
                    P.SMALL_COMBINE_GROUPED: P.SMALL_COMBINE}[expected]
    assert choose_path(s) == expected


def test_choose_path_reads_the_situations_small_n():
    """Tests move the decode paths' threshold by the layer's small_n (MoE(small_n=...)), which
    the situation carries."""
    s = situation(**FEW, kernels=False)
    assert choose_path(s) == P.SMALL_COMBINE
    assert choose_path(s._replace(small_n=15)) == P.SLICED


def test_describe_measures_the_call(monkeypatch):
    moe = make_moe(4, 2)
    x_TD = torch.randn(3, 16)
    r = moe.router(x_TD)
    s = describe(x_TD, r, moe.experts, None)
    assert (s.device, s.dtype, s.capability, s.tokens, s.assignments) == ("cpu", FP32, None, 3, 6)
    assert s.grad_mode and s.needs_grad and not (s.capacity or s.pads or s.reference)
    assert s.kernels == (native.ops() is not None) and s.impl == "auto"
    with torch.no_grad():
        s = describe(x_TD, r, moe.experts, 2, torch.ones(3, dtype=torch.bool), reference=True)
        assert not (s.grad_mode or s.needs_grad) and s.capacity and s.pads and s.reference
        with torch.autocast("cpu", dtype=BF16):  # the decode kernel is fp32 only
            s = describe(x_TD, r, moe.experts, None)
            assert s.dtype == BF16 and "native" not in dispatch_module.candidates(s)
        monkeypatch.setattr(native, "ops", lambda: None)
        moe = make_moe(4, 2, impl="torch")
        s = describe(x_TD, r, moe.experts, None)
        assert not s.kernels and s.impl == "torch"


@pytest.mark.parametrize("activation", ["relu", "gelu", "relu2", "swiglu"])
def test_the_kernels_run_the_activations_they_implement(activation):
    """relu, gelu and relu2 (the modern presets' experts) by the C++ kernels; swiglu in Python."""
    moe = make_moe(4, 2, activation=activation)
    x_TD = torch.randn(3, 16)
    s = describe(x_TD, moe.router(x_TD), moe.experts, None)
    assert s.kernels == (native.ops() is not None and activation != "swiglu")


@pytest.mark.parametrize("path", list(DispatchPath))
def test_every_path_in_the_table_equals_the_reference_loop(path):
    """Each runner of PATHS, called directly on one token (every path can run it)."""
    if path == P.DECODE and native.ops() is None:
        pytest.skip("the C++ MoE kernels cannot be built here")
    if path in (P.GROUPED_MM, P.SMALL_COMBINE_GROUPED) and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not available")
    assert set(PATHS) == set(DispatchPath)
    moe = make_moe(4, 2).eval()
    x_TD = torch.randn(1, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        r = moe.router(x_TD)
        y_ref, _ = reference_dispatch(x_TD, r, moe.experts, None)
    with torch.set_grad_enabled(path == P.SLICED_AUTOGRAD):
        y_TD, kept_TK, counts_E = PATHS[path](x_TD, r, moe.experts, None, None)
    torch.testing.assert_close(y_TD.detach(), y_ref, rtol=1e-5, atol=1e-6)
    assert kept_TK is None
    if counts_E is not None:
        assert counts_E.tolist() == torch.bincount(r.experts_TK.flatten(), minlength=4).tolist()


GRAD_PATHS = (P.GROUPED_MM, P.NATIVE_AUTOGRAD, P.SLICED_AUTOGRAD, P.REFERENCE)


@pytest.mark.parametrize("path", list(DispatchPath))
@pytest.mark.parametrize("T", [1, 5])
def test_every_path_equals_the_reference_loop_without_biases(path, T):
    """model.moe.bias = false: the router and the experts have no bias parameters, and each
    runner of PATHS (the C++ kernels included) equals the reference loop: outputs, and the
    gradients where the path has autograd."""
    if path == P.ONE_TOKEN and T > 1:
        pytest.skip("the one-token path takes one token")
    if path in (P.DECODE, P.NATIVE, P.NATIVE_AUTOGRAD) and native.ops() is None:
        pytest.skip("the C++ MoE kernels cannot be built here")
    if path in (P.GROUPED_MM, P.SMALL_COMBINE_GROUPED) and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not available")
    moe = make_moe(4, 2, "noisy_topk", activation="relu2", bias=False).eval()
    names = [n for n, _ in moe.named_parameters()]
    assert names == ["router.gate.weight", "router.noise.weight", "experts.w1_EDH",
                     "experts.w2_EHD"]
    results = []
    for run in (PATHS[P.REFERENCE], PATHS[path]):
        moe.zero_grad()
        x_TD = torch.randn(T, 16, generator=torch.Generator().manual_seed(7), requires_grad=True)
        with torch.set_grad_enabled(path in GRAD_PATHS):
            y_TD = run(x_TD, moe.router(x_TD), moe.experts, None, None)[0]
            if path in GRAD_PATHS:
                (y_TD * torch.linspace(-1, 1, y_TD.numel()).view_as(y_TD)).sum().backward()
        results.append((y_TD.detach(), grads(moe, x_TD) if path in GRAD_PATHS else []))
    (y_ref, g_ref), (y_path, g_path) = results
    torch.testing.assert_close(y_path, y_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_path, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_decode_kernel_without_biases_equals_the_kernel_with_zero_biases():
    """The C++ decode kernel with its biases absent computes as with zero biases."""
    ops = native.ops()
    if ops is None:
        pytest.skip("the C++ MoE kernels cannot be built here")
    g = torch.Generator().manual_seed(3)
    E, D, H, T = 4, 16, 72, 3
    w1, w2 = torch.randn(E, D, H, generator=g), torch.randn(E, H, D, generator=g)
    x = torch.randn(T, D, generator=g)
    w_TK, experts_TK = torch.randn(T, E, generator=g).softmax(-1).topk(2)
    w_TK = w_TK.contiguous()
    zeros = ops.experts_decode(x, experts_TK, w_TK, w1, torch.zeros(E, H), w2,
                               torch.zeros(E, D), native_activation("gelu"))
    none = ops.experts_decode(x, experts_TK, w_TK, w1, None, w2, None, native_activation("gelu"))
    assert torch.equal(none, zeros) and zeros.abs().sum() > 0


@pytest.mark.parametrize("real", [False, True])
def test_one_token_with_a_pad_mask_takes_no_decode_path(real):
    """Pads skip the experts on every path: a lone pad token under no_grad gets 0 (the
    one-token path used to run its experts), as in the reference loop."""
    x = torch.randn(1, 1, 16, generator=torch.Generator().manual_seed(8))
    mask = torch.full((1, 1), real)
    outs = []
    for reference in (True, False):
        moe = make_moe(4, 2, reference=reference).eval()
        with torch.no_grad():
            outs.append(moe(x, mask)[0])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    assert (outs[1] != 0).any() == real
