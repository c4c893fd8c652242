"""MoE statistics (slms.model.moe_stats) and the model's verbs around them: paused_stats,
after_optimizer_step, the checkpoint state and its older formats."""

import io

import pytest
import torch

from conftest import tiny_config
from slms.config import MoEConfig
from slms.model import GPT, eval_mode
from slms.model.moe import MoE
from slms.model.moe_stats import MoEStats


def _two_calls() -> MoEStats:
    """K=2, E=4: a dropless training call on 3 tokens, then an evaluation call on 2 tokens
    with one assignment dropped (no losses)."""
    s = MoEStats.zeros(4, top_k=2)
    s.add(torch.tensor([3, 1, 0, 2]), 3, torch.tensor(1.5), balance=torch.tensor(1.2),
          z=torch.tensor(0.5))
    s.add(torch.tensor([1, 1, 1, 0]), torch.tensor(2), torch.tensor(0.5), torch.tensor(1))
    return s


def _round_trip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_summary_of_added_calls_by_hand():
    s = _two_calls()
    assert s.calls == 2 and s.loss_calls == 1
    got = s.summary()
    assert got.keys() == {"tokens_per_expert", "share", "max_over_mean", "entropy",
                          "dropped_share", "aux_loss", "z_loss", "loss_calls"}
    assert got["tokens_per_expert"] == [4, 2, 1, 2]
    assert got["share"] == pytest.approx([4 / 9, 2 / 9, 1 / 9, 2 / 9])
    assert got["max_over_mean"] == pytest.approx(4 / (9 / 4))
    assert got["entropy"] == pytest.approx(2.0 / 5)  # per token
    assert got["dropped_share"] == pytest.approx(1 / (5 * 2))  # of the assignments
    assert got["aux_loss"] == pytest.approx(1.2) and got["z_loss"] == pytest.approx(0.5)
    assert got["loss_calls"] == 1


def test_empty_summary_reads_zeros():
    got = MoEStats.zeros(3, top_k=1).summary()
    assert got["tokens_per_expert"] == [0, 0, 0] and got["share"] == [0.0, 0.0, 0.0]
    assert (got["max_over_mean"], got["entropy"], got["dropped_share"], got["aux_loss"],
            got["z_loss"], got["loss_calls"]) == (0.0, 0.0, 0.0, 0.0, 0.0, 0)


def test_state_dict_round_trips_through_a_weights_only_load():
    s = _two_calls()
    state = s.state_dict()
    assert all(isinstance(v, (torch.Tensor, int, float)) for v in state.values())
    back = MoEStats.from_state_dict(_round_trip(state), top_k=2)
    assert back.summary() == s.summary()
    assert back.calls == s.calls and back.loss_calls == s.loss_calls


def test_the_dict_format_of_older_checkpoints_loads():
    # As MoE.stats was saved before it had a type: the same keys ...
    before_type = {"tokens_E": torch.tensor([4, 2, 1, 2]), "tokens": torch.tensor(5),
                   "dropped": torch.tensor(1), "entropy_token_sum": torch.tensor(2.0),
                   "aux_sum": torch.tensor(1.2), "z_sum": torch.tensor(0.5), "calls": 2,
                   "loss_calls": 1}
    assert (MoEStats.from_state_dict(_round_trip(before_type), top_k=2).summary()
            == _two_calls().summary())
    # ... and before evaluation skipped the losses: every call computed them (loss_calls =
    # calls), and the entropy was a per-call sum that summary does not read.
    oldest = {"tokens_E": torch.tensor([4, 2, 1, 2]), "tokens": 5, "dropped": 1,
              "entropy_sum": 0.7, "aux_sum": torch.tensor(2.4), "z_sum": torch.tensor(1.0),
              "calls": 2}
    got = MoEStats.from_state_dict(_round_trip(oldest), top_k=2).summary()
    assert got["loss_calls"] == 2 and got["entropy"] == 0.0
    assert got["aux_loss"] == pytest.approx(1.2) and got["z_loss"] == pytest.approx(0.5)
    assert got["tokens_per_expert"] == [4, 2, 1, 2] and got["dropped_share"] == 0.1


def test_a_held_stats_snapshot_is_not_changed_by_later_calls():
    # A checkpoint holds `state_dict()` of the statistics: later calls add out of place.
    torch.manual_seed(0)
    moe = MoE(16, MoEConfig(n_experts=4, top_k=2, router="topk"), 24, "relu").eval()
    moe(torch.randn(1, 6, 16))
    held = moe.stats.state_dict()
    before = (held["tokens_E"].clone(), held["tokens"], held["calls"])
    moe(torch.randn(2, 6, 16))
    assert torch.equal(held["tokens_E"], before[0])
    assert (held["tokens"], held["calls"]) == before[1:]
    moe.stats = MoEStats.from_state_dict(held, top_k=2)
    assert sum(moe.pop_stats()["tokens_per_expert"]) == 12


def _bias_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config(moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=64,
                                         router="bias")))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)


def test_nothing_is_recorded_inside_paused_stats_and_held_stats_stay():
    model = _bias_gpt().train()
    x = torch.randint(0, 300, (2, 16))
    model(x, x)
    held = model.moe_stats_state()
    with model.paused_stats():
        model(x, x)  # training
        with model.paused_stats():  # nested: still paused after the inner one ends
            pass
        with eval_mode(model):
            model(x)  # evaluation
        assert not any(layer.track_stats for layer in model.moe_layers())
    assert all(_same(a, b) for a, b in zip(model.moe_stats_state(), held, strict=True))
    assert all(layer.track_stats for layer in model.moe_layers())
    model(x, x)  # recorded again
    assert [s["loss_calls"] for s in model.pop_moe_stats()] == [2, 2]
    assert model.pop_moe_stats()[0]["tokens_per_expert"] == [0, 0, 0, 0]  # popped


def test_after_a_skipped_step_the_bias_stays_and_the_load_is_discarded():
    model = _bias_gpt().train()
    x = torch.randint(0, 300, (4, 32))
    routers = [layer.router for layer in model.moe_layers()]
    model(x, x)
    assert all(r.load_E.sum() == 4 * 32 * 2 for r in routers)
    bias = [r.expert_bias.clone() for r in routers]
    model.after_optimizer_step(skipped=True)
    assert all(torch.equal(r.expert_bias, b) for r, b in zip(routers, bias, strict=True))
    assert all(r.load_E.sum() == 0 for r in routers)
    model(x, x)
    assert all(r.load_E.unique().numel() > 1 for r in routers)  # unbalanced: the bias moves
    model.after_optimizer_step(skipped=False)
    assert all(not torch.equal(r.expert_bias, b) for r, b in zip(routers, bias, strict=True))
    assert all(r.load_E.sum() == 0 for r in routers)
    dense_routing = GPT(tiny_config(moe=True)).train()  # topk: nothing to update
    dense_routing.after_optimizer_step(skipped=False)
    dense_routing.after_optimizer_step(skipped=True)


def test_moe_stats_state_round_trips_into_another_model():
    model = _bias_gpt().train()
    x = torch.randint(0, 300, (2, 16))
    model(x, x)
    other = _bias_gpt()
    other.load_moe_stats_state(_round_trip(model.moe_stats_state()))
    assert other.pop_moe_stats() == model.pop_moe_stats()
    assert GPT(tiny_config()).moe_stats_state() == []  # dense


def test_reset_moe_state_after_a_meta_build():
    # transformers builds on the meta device and loads only the saved tensors
    ref = _bias_gpt()
    with torch.device("meta"):
        model = GPT(ref.cfg)
    model.load_state_dict(ref.state_dict(), assign=True)
    assert model.moe_layers()[0].router.load_E.is_meta
    model.reset_moe_state()
    for layer in model.moe_layers():
        assert not layer.router.load_E.is_meta and layer.router.load_E.sum() == 0
        assert not layer.stats.tokens_E.is_meta
    x = torch.randint(0, 300, (1, 8))
    model.train()(x, x)
    assert sum(model.pop_moe_stats()[0]["tokens_per_expert"]) == 8 * 2
