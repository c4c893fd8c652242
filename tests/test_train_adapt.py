"""The recipe that adapts to the data and the budget (train.adapt), the cheap CPU dropout it
relies on, and the end of a run that stopped improving (train.early_stop, auto under a time
budget)."""

import json
import math

import pytest
import torch

from slms.model.dropout import LEVELS, Dropout, dropout, effective_rate
from slms.train.adapt import MOST_PASSES, RULE, choose
from train_helpers import TINY, train_on_fake_clock


def test_the_rule_picks_more_regularisation_for_more_passes():
    # the case: 190,000 training tokens, ~33 passes in 10 minutes -> the most dropout
    many = choose(190_000, 6.3e6)
    assert round(many.passes) == 33 and many.dropout == RULE[-1][1]
    # 1M tokens seen about 8 times (docs/quality.md's set) and a single pass over a big text
    mid, few = choose(1_040_000, 8.6e6), choose(50_000_000, 8.6e6)
    assert few.dropout == 0.0 and few.passes < 1
    assert few.dropout <= mid.dropout <= many.dropout
    rates = [choose(100_000, passes * 100_000).dropout for passes in (0.5, 2, 5, 10, 30, 100)]
    assert rates == sorted(rates)
    line = many.describe("10 minutes", 1538)
    assert line.startswith("adapt: 190,000 training tokens, ~33 passes in 10 minutes: dropout")


def test_a_budget_of_more_passes_than_pay_trains_fewer_steps():
    over = choose(55_000, 150 * 55_000)
    assert over.capped and over.steps(1500) == math.ceil(1500 * MOST_PASSES / 150)
    assert f"training {MOST_PASSES:g} passes ({over.steps(1500):,} of the 1,500 steps)" in \
        over.describe("10 minutes", 1500)
    under = choose(1_040_000, 8 * 1_040_000)
    assert not under.capped and under.steps(2000) == 2000
    assert "passes (" not in under.describe("10 minutes", 2000)


def test_cpu_dropout_drops_at_its_rate_and_keeps_the_mean():
    torch.manual_seed(0)
    x = torch.ones(1000, 1000)
    y = dropout(x, 0.2, training=True)
    rate = effective_rate(0.2, x.device)
    assert rate == 51 / LEVELS
    assert abs(float((y == 0).float().mean()) - rate) < 0.003
    assert abs(float(y.mean()) - 1.0) < 0.01  # kept elements scaled by 1 / (1 - rate)
    assert torch.equal(dropout(x, 0.2, training=False), x)
    assert torch.equal(dropout(x, 0.0, training=True), x)


def test_cpu_dropout_is_seeded_and_its_gradient_is_its_mask():
    x = torch.randn(64, 48, dtype=torch.bfloat16, requires_grad=True)
    torch.manual_seed(1)
    y = Dropout(0.3).train()(x)
    torch.manual_seed(1)
    assert torch.equal(Dropout(0.3).train()(x), y)  # the torch generator: resumed runs match
    y.float().sum().backward()
    kept = y != 0
    scale = LEVELS / (LEVELS - round(0.3 * LEVELS))
    assert torch.allclose(x.grad.float(), kept.float() * scale, rtol=1e-2)
    assert Dropout(0.3).eval()(x) is x


def test_set_dropout_reaches_every_dropout_but_a_fixed_attention_rate():
    from conftest import tiny_config
    from slms.model import GPT

    for attn, want_attn in ((None, 0.25), (0.0, 0.0)):
        model = GPT(tiny_config(moe=True, attn_dropout=attn))
        model.set_dropout(0.25)
        assert model.cfg.dropout == 0.25
        rates = {m.p for m in model.modules() if isinstance(m, Dropout)}
        assert rates == {0.25}
        assert {b.attn.dropout for b in model.blocks} == {want_attn}


def _train(argv, capsys):
    from slms.cli import main

    assert main(argv) == 0
    return capsys.readouterr().out


@pytest.mark.slow
def test_a_step_budget_adapts_before_the_model_is_built(tmp_path, data_dir, capsys):
    from slms.rundir import RunDir

    out = tmp_path / "run"
    text = _train(["train", "configs/tiny.toml", f"data.path={data_dir}", *TINY,
                   "train.max_steps=6", "train.adapt=true", "--out", str(out)], capsys)
    tokens = json.loads((data_dir / "meta.json").read_text())["splits"]["train"]["tokens"]
    want = choose(tokens, 6 * 4 * 32)  # steps x batch x block
    assert f"adapt: {tokens:,} training tokens" in text and "in 6 steps" in text
    cfg = RunDir(out).read_config()
    assert cfg["model"]["dropout"] == want.dropout
    assert cfg["train"]["weight_decay"] == want.weight_decay
    assert cfg["train"]["max_steps"] == want.steps(6)


def _small_data(tmp_path, stories, tokenizer):
    """~3,000 training tokens: a 10-minute budget on the fake clock (600 steps of 128 tokens)
    allows about 25 passes."""
    from slms.data.prepare import prepare

    data_dir = tmp_path / "small"
    prepare({"train": stories[:8], "val": stories[8:12]}, tokenizer, data_dir, source="test")
    tokens = json.loads((data_dir / "meta.json").read_text())["splits"]["train"]["tokens"]
    return data_dir, tokens


@pytest.mark.slow
def test_a_capped_time_budget_trains_its_passes_and_resumes_with_its_choice(
        tmp_path, stories, tokenizer, capsys, monkeypatch):
    """The budget allows more than MOST_PASSES: once it has settled (the fit after warm-up)
    the run trains MOST_PASSES' worth of steps, its schedule annealed over them; continued
    with the same command (train.resume=auto), it keeps the dropout and steps it chose."""
    from slms.rundir import RunDir
    from slms.train.metrics import read_metrics

    data_dir, tokens = _small_data(tmp_path, stories, tokenizer)
    out = tmp_path / "run"
    argv = ["train", "configs/tiny.toml", f"data.path={data_dir}", *TINY, "model.dropout=0.0",
            "train.max_minutes=10", "train.adapt=true", "train.eval_every=1000",
            "train.early_stop=0", "train.resume=auto", "--out", str(out)]
    train_on_fake_clock(monkeypatch, argv)  # every step takes one "second"
    text = capsys.readouterr().out
    choice = choose(tokens, 600 * 4 * 32)
    steps = max(r["step"] for r in read_metrics(out) if "loss" in r)
    assert choice.capped and steps == choice.steps(600) == math.ceil(MOST_PASSES * tokens / 128)
    assert f"passes in 10 minutes: dropout {choice.dropout:g}" in text
    assert f"training {MOST_PASSES:g} passes ({steps:,} of the 600 steps)" in text
    lrs = [r["lr"] for r in read_metrics(out) if "lr" in r]
    assert lrs[-1] < 0.2 * max(lrs)  # annealed by the last step
    cfg = RunDir(out).read_config()
    assert cfg["model"]["dropout"] == choice.dropout and cfg["train"]["max_steps"] == steps
    train_on_fake_clock(monkeypatch, argv)  # the same command again: nothing left to train
    assert "resumed from" in capsys.readouterr().out
    assert RunDir(out).read_config()["model"]["dropout"] == choice.dropout


@pytest.mark.slow
def test_a_time_budget_within_the_cap_adapts_its_dropout_live(tmp_path, stories, tokenizer,
                                                                capsys, monkeypatch):
    from slms.model.dropout import Dropout
    from slms.rundir import RunDir

    seen = []
    real = Dropout.forward

    def forward(self, x):
        seen.append(self.p)
        return real(self, x)

    monkeypatch.setattr(Dropout, "forward", forward)
    data_dir, tokens = _small_data(tmp_path, stories, tokenizer)
    steps = math.ceil(11 * tokens / 128)  # 11 passes: dropout, not capped
    out = tmp_path / "run"
    train_on_fake_clock(monkeypatch, [
        "train", "configs/tiny.toml", f"data.path={data_dir}", *TINY, "model.dropout=0.0",
        f"train.max_minutes={steps / 60}", "train.adapt=true", "train.eval_every=100000",
        "train.early_stop=0", "--out", str(out)])
    choice = choose(tokens, steps * 128)
    assert choice.dropout > 0 and not choice.capped
    assert f"dropout {choice.dropout:g}, weight decay" in capsys.readouterr().out
    per_step = len(seen) // steps
    assert set(seen[:10 * per_step]) == {0.0} and seen[-1] == choice.dropout  # set live
    assert RunDir(out).read_config()["model"]["dropout"] == choice.dropout


@pytest.mark.slow
def test_a_time_budget_stops_once_validation_stops_improving_and_says_why(
        tmp_path, stories, tokenizer, capsys, monkeypatch):
    """train.early_stop unset (auto) is on under a time budget: on a text so small that the
    model memorises it within tens of steps, the run ends long before its minutes are spent,
    and its last line says where the best was and why it stopped."""
    from slms.config import EARLY_STOP_AUTO
    from slms.rundir import RunDir
    from slms.train.metrics import read_metrics

    data_dir, tokens = _small_data(tmp_path, stories, tokenizer)
    out = tmp_path / "run"
    train_on_fake_clock(monkeypatch, [  # 10 minutes: 600 one-"second" steps
        "train", "configs/tiny.toml", f"data.path={data_dir}", "model.n_layer=1",
        "train.max_minutes=10", "train.eval_every=5", "train.lr=0.003", "--out", str(out)])
    last = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith("early stop")]
    assert last
    evals = [r["step"] for r in read_metrics(out) if "val_loss" in r]
    best = json.loads((RunDir(out).best / "config.json").read_text())["step"]
    assert f"best at step {best}, " in last[0] and f"over its {tokens:,} training tokens" in last[0]
    assert f"train.early_stop={EARLY_STOP_AUTO}" in last[0]
    assert "of 600 fitted to the time budget" in last[0] and "memorised" in last[0]
    assert len([s for s in evals if s > best]) == EARLY_STOP_AUTO and max(evals) < 300


def test_early_stop_is_auto_only_under_a_time_budget():
    from slms.config import EARLY_STOP_AUTO, load_config

    assert load_config(None, ["train.max_minutes=5"]).train.patience == EARLY_STOP_AUTO
    assert load_config(None, []).train.patience == 0
    assert load_config(None, ["train.max_minutes=5", "train.early_stop=0"]).train.patience == 0
    assert load_config(None, ["train.early_stop=3"]).train.patience == 3
