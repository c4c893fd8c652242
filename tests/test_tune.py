"""Kernels chosen by measurement (slms.model.tune): the selection logic with injected timings,
the per-machine cache and what invalidates it, and the MoE layer following the choice."""

import json

import pytest
import torch

from slms import machine
from slms.model import moe_dispatch, native, tune
from slms.model.moe_dispatch import DispatchPath, choose_path, describe


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("SLMS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SLMS_TUNE", raising=False)
    monkeypatch.delenv("SLMS_NATIVE", raising=False)
    tune.forget()
    yield
    tune.forget()


def inject(monkeypatch, seconds: dict[str, float]) -> list[list[str]]:
    """Replace the timing with fixed figures; returns the candidate lists it was asked for."""
    asked = []

    def fake(timers):
        asked.append(sorted(timers))
        return {k: seconds.get(k, 1.0) for k in timers}
    monkeypatch.setattr(tune, "time_candidates", fake)
    return asked


@pytest.mark.parametrize("seconds,winner", [
    ({"torch": 1.0, "native": 0.5, "grouped_mm": 0.8}, "native"),
    ({"torch": 1.0, "native": 1.5, "grouped_mm": 0.8}, "grouped_mm"),
    ({"torch": 1.0, "native": 1.2, "grouped_mm": 1.1}, "torch"),  # never slower than torch
    ({"torch": 1.0, "native": 0.98}, "torch"),  # within noise of torch: torch
    ({"torch": 1.0, "native": 0.96}, "native"),
])
def test_pick_never_takes_a_path_slower_than_plain_torch(seconds, winner):
    assert tune.pick(seconds) == winner


def test_a_choice_is_measured_once_per_machine_and_cached(monkeypatch, tmp_path):
    asked = inject(monkeypatch, {"torch": 2.0, "native": 1.0})
    timers = lambda: {"torch": lambda: None, "native": lambda: None}  # noqa: E731
    for _ in range(3):
        assert tune.fastest(("decode", "E8"), timers) == "native"
    assert len(asked) == 1
    tune.forget()  # a new process reads the file
    assert tune.fastest(("decode", "E8"), timers) == "native" and len(asked) == 1
    cache = json.loads((tmp_path / "kernels.json").read_text())
    (key, entry), = cache.items()
    assert machine.cpu_model() in key and torch.__version__ in key and "decode|E8" in key
    assert entry == {"kernel": "native", "ms": {"torch": 2000.0, "native": 1000.0}}


@pytest.mark.parametrize("change", ["torch", "cpu", "gpu", "threads", "kernels", "in-process"])
def test_the_cache_is_invalidated_by_a_new_torch_cpu_thread_count_or_kernel_build(
        change, monkeypatch):
    """A choice is kept for its machine (CPU, GPU models, threads), torch and kernel build; in
    this process too, where a thread count set later (slms serve) must measure again."""
    asked = inject(monkeypatch, {"torch": 2.0, "native": 1.0})
    timers = lambda: {"torch": lambda: None, "native": lambda: None}  # noqa: E731
    tune.fastest(("sorted",), timers)
    if change != "in-process":
        tune.forget()
    if change == "in-process":
        monkeypatch.setattr(torch, "get_num_threads", lambda: 97)
    elif change == "gpu":
        monkeypatch.setattr(machine, "gpu_models", lambda: "NVIDIA H200")
    elif change == "torch":
        monkeypatch.setattr(torch, "__version__", "9.9.9")
    elif change == "cpu":
        monkeypatch.setattr(machine, "cpu_model", lambda: "Another CPU")
    elif change == "threads":
        monkeypatch.setattr(torch, "get_num_threads", lambda: 97)
    else:
        monkeypatch.setattr(tune, "build", lambda: "slms_moe_cpu_another")
    tune.fastest(("sorted",), timers)
    assert len(asked) == 2


def make_moe(E=4, K=2):
    from slms.config import MoEConfig
    from slms.model.moe import MoE

    return MoE(16, MoEConfig(n_experts=E, top_k=K, router="topk"), 32, "relu")


def describe_decoding(moe, tokens: int = 4):
    """The situation of a decoding call (no grad) of `moe` on `tokens` random tokens."""
    x_TD = torch.randn(tokens, 16)
    with torch.no_grad():
        return describe(x_TD, moe.router(x_TD), moe.experts, None)


@pytest.mark.parametrize("fastest,decode_path,train_path", [
    ("native", DispatchPath.DECODE, DispatchPath.NATIVE_AUTOGRAD),
    ("torch", DispatchPath.SMALL_COMBINE, DispatchPath.SLICED_AUTOGRAD),
    ("grouped_mm", DispatchPath.SMALL_COMBINE_GROUPED, DispatchPath.GROUPED_MM),
])
def test_the_layer_runs_the_kernel_measured_fastest(fastest, decode_path, train_path,
                                                    monkeypatch):
    if native.ops() is None or not hasattr(torch, "_grouped_mm"):
        pytest.skip("needs the C++ kernels and torch._grouped_mm")
    asked = inject(monkeypatch, {fastest: 0.1})
    moe = make_moe()
    x_TD = torch.randn(4, 16)
    with torch.no_grad():
        s = describe(x_TD, moe.router(x_TD), moe.experts, None)
    assert s.measured == fastest and choose_path(s) == decode_path
    x_TD.requires_grad_(True)
    s = describe(x_TD, moe.router(x_TD), moe.experts, None)
    assert s.measured == fastest and choose_path(s) == train_path
    assert asked == [["grouped_mm", "native", "torch"]] * 2


def test_real_timing_leaves_random_state_and_gradients_alone():
    """The first call of a shape class times every candidate, forward and backward: on
    synthetic inputs from a generator of its own, into copies of the weights."""
    moe = make_moe().train()
    torch.manual_seed(3)
    x = torch.randn(2, 8, 16, requires_grad=True)
    state = torch.random.get_rng_state()
    y, aux = moe(x)
    assert torch.equal(torch.random.get_rng_state(), state)  # topk router: no noise drawn
    assert all(p.grad is None for p in moe.parameters())
    (y.sum() + aux).backward()
    tune.forget()
    moe.zero_grad(set_to_none=True)
    y2, aux2 = moe(x)  # measured already: read from the cache
    torch.testing.assert_close(y2, y)


def test_measuring_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("SLMS_TUNE", "0")
    asked = inject(monkeypatch, {"torch": 0.1})
    s = describe_decoding(make_moe())
    assert s.measured is None and asked == []


def test_slms_native_1_uses_the_kernels_without_timing(monkeypatch):
    if native.ops() is None:
        pytest.skip("the C++ MoE kernels cannot be built here")
    monkeypatch.setenv("SLMS_NATIVE", "1")
    asked = inject(monkeypatch, {"torch": 0.1})
    s = describe_decoding(make_moe())
    assert s.measured == "native" and choose_path(s) == DispatchPath.DECODE and asked == []


def test_shape_classes_round_tokens_up_to_a_power_of_two():
    moe = make_moe()
    sizes = {}
    for T in (1, 2, 3, 5, 8, 33):
        x_TD = torch.randn(T, 16)
        with torch.no_grad():
            s = describe(x_TD, moe.router(x_TD), moe.experts, None)
        sizes[T] = moe_dispatch.shape_class(s, moe.experts)[-1]
    assert sizes == {1: "T1", 2: "T2", 3: "T4", 5: "T8", 8: "T8", 33: "T64"}


def test_shape_classes_tell_capacity_pads_and_weight_dtype_apart():
    moe = make_moe()
    x_TD = torch.randn(8, 16)
    r = moe.router(x_TD)
    classes = {moe_dispatch.shape_class(describe(x_TD, r, moe.experts, None), moe.experts),
               moe_dispatch.shape_class(describe(x_TD, r, moe.experts, 4), moe.experts),
               moe_dispatch.shape_class(describe(x_TD, r, moe.experts, None,
                                               torch.ones(8, dtype=torch.bool)), moe.experts)}
    moe.experts.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the same compute dtype as below
        classes.add(moe_dispatch.shape_class(describe(x_TD, r, moe.experts, None), moe.experts))
    moe.experts.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        classes.add(moe_dispatch.shape_class(describe(x_TD, r, moe.experts, None), moe.experts))
    assert len(classes) == 5


def test_a_kernel_that_cannot_run_a_shape_is_left_out():
    def fails():
        raise RuntimeError("strides should be multiple of 16 bytes")
    seconds = tune.time_candidates({"torch": lambda: None, "grouped_mm": fails})
    assert list(seconds) == ["torch"]
    with pytest.raises(RuntimeError):  # the plain path must run
        tune.time_candidates({"torch": fails})


@pytest.mark.slow
def test_slms_tune_measures_a_models_shapes_once(tmp_path, capsys, monkeypatch):
    from slms.cli import main

    argv = ["tune", "tiny", "--batch", "2", "--block", "64", "--precision", "fp32", "--json"]
    assert main(argv) == 0
    entries = json.loads(capsys.readouterr().out)
    kinds = {cls.split("|")[0] + "|" + cls.split("|")[4] for cls in entries}
    assert kinds >= {"sorted|grad", "sorted|nograd", "decode|nograd"}
    assert all(e["kernel"] in e["ms"] and "torch" in e["ms"] for e in entries.values())
    tune.forget()

    def no_timing(timers):
        raise AssertionError("measured again")
    monkeypatch.setattr(tune, "time_candidates", no_timing)
    assert main(argv[:-1]) == 0  # a second run reads the cache
    table = capsys.readouterr().out
    assert table.splitlines()[0].startswith("shape class") and len(table.splitlines()) > 3
    monkeypatch.undo()
    monkeypatch.setenv("SLMS_CACHE_DIR", str(tmp_path))
    asked = inject(monkeypatch, {"torch": 0.5})
    assert main([*argv[:-1], "--again"]) == 0 and asked  # --again measures anew
