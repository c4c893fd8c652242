"""train.max_minutes (a time budget fixed after a timed probe) and the validation watch
(overfitting warnings, train.early_stop)."""

import math

import pytest

from slms.train.budget import (
    PROBE_STEPS,
    REFIT_SHARES,
    REFIT_STEPS,
    TimeBudget,
    ValidationWatch,
)
from train_helpers import train_on_fake_clock


def fit(b: TimeBudget, seconds: float) -> int | None:
    """One step of one process: its proposal accepted as the trainer does with rank 0's."""
    proposal = b.record(seconds)
    return None if proposal is None else b.accept(proposal)


def test_budget_fixes_the_steps_from_the_probe():
    b = TimeBudget(minutes=1.0)
    times = [3.0, 2.0] + [0.5] * (PROBE_STEPS - 2)  # slow warm-up steps, then 0.5 s each
    got = [fit(b, t) for t in times]
    assert got[:-1] == [None] * (PROBE_STEPS - 1)
    assert got[-1] == PROBE_STEPS + int((60 - sum(times)) / 0.5)
    # refitted after REFIT_STEPS from their second half: the steps got faster (0.4 s)
    more = [fit(b, 0.4) for _ in range(REFIT_STEPS - PROBE_STEPS)]
    assert more[:-1] == [None] * (REFIT_STEPS - PROBE_STEPS - 1)
    spent = sum(times) + 0.4 * (REFIT_STEPS - PROBE_STEPS)
    assert more[-1] == REFIT_STEPS + int((60 - spent) / 0.4)
    assert TimeBudget(minutes=0).record(1.0) is None
    short = TimeBudget(minutes=0.05)  # 3 s: the first fit is final
    assert [fit(short, 0.5) for _ in range(PROBE_STEPS)][-1] == PROBE_STEPS
    assert short.minutes == 0


def test_budget_follows_a_machine_whose_speed_drifts():
    """At a quarter, half and three quarters of the count the speed since the last fit
    refits it; a change of at most MIN_CHANGE keeps the count; then it is fixed for good."""
    b = TimeBudget(minutes=10.0)
    for _ in range(REFIT_STEPS):
        fit(b, 0.5)
    assert b.steps == 1200  # 600 s at 0.5 s
    quarter = math.ceil(REFIT_SHARES[0] * 1200)
    got = {}
    n = REFIT_STEPS
    while b.minutes > 0:
        n += 1
        moved = fit(b, 0.5 if n <= 100 else 0.6)  # 20% slower from step 101 on
        if moved is not None:
            got[n] = moved
    spent = 0.5 * 100 + 0.6 * (quarter - 100)
    first = quarter + math.floor((600 - spent) / 0.6)
    assert list(got)[0] == quarter and got[quarter] == first
    assert len(got) <= len(REFIT_SHARES)  # the later fits at 0.6 s moved it by <= 1%, or once
    assert b.record(0.6) is None  # fitted for good
    steady = TimeBudget(minutes=10.0)
    assert [fit(steady, 0.5) for _ in range(1200)].count(None) == 1200 - 1  # the probe only
    assert steady.minutes == 0


def test_validation_watch_warns_of_overfitting_and_counts_patience():
    w = ValidationWatch(patience=2)
    assert w.update(3.0, 3.2) is None
    assert w.update(2.5, 3.0) is None  # both fell: learning
    warning = w.update(2.0, 3.1)  # train fell, val rose
    assert warning and "overfitting" in warning and "3.0000 -> 3.1000" in warning
    assert not w.should_stop
    w.update(1.5, 3.05)
    assert w.should_stop  # two evaluations without beating 3.0
    assert not ValidationWatch(patience=0, since_best=5).should_stop


@pytest.mark.slow
def test_a_time_budgeted_run_fixes_its_steps_and_resumes_with_them(tmp_path, data_dir,
                                                                    monkeypatch):
    import slms.train.trainer as trainer
    from slms.cli import main
    from slms.rundir import RunDir
    from train_helpers import losses

    clock = iter(range(10**6))  # every perf_counter call advances 1 "second"
    monkeypatch.setenv("SLMS_TUNE", "0")  # no kernel timing (it calls perf_counter too)
    monkeypatch.setattr(trainer.time, "perf_counter", lambda: float(next(clock)))
    out = tmp_path / "run"
    argv = ["train", "configs/tiny.toml", f"data.path={data_dir}", "model.n_layer=1",
            "train.max_minutes=0.5", "train.eval_every=1000", "train.log_every=5",
            "--out", str(out)]
    assert main(argv) == 0
    cfg = RunDir(out).read_config()["train"]
    assert cfg["max_minutes"] == 0.5 and PROBE_STEPS < cfg["max_steps"] < 40
    assert losses(out)[-1][0] == cfg["max_steps"]


def _lrs(run_dir):
    from slms.train.metrics import read_metrics

    return [(r["step"], r["lr"], r["loss"]) for r in read_metrics(run_dir)
            if "tokens_per_s" in r]


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_a_budgeted_run_resumed_after_sigint_trains_as_the_uninterrupted_one(
        tmp_path, data_dir, monkeypatch, schedule):
    """2 minutes at 1 s a step, then 1.5 s from step 60: the budget fits 120 steps, refits to
    100 at step 90. Interrupted at step 81 and resumed (the same command, train.resume=auto):
    the same learning rates, losses and step count as without the interruption (the budget's
    state and the schedule's refits come from the checkpoint, not the 10**9 placeholder)."""
    argv = ["train", "configs/tiny.toml", f"data.path={data_dir}", "model.n_layer=1",
            "model.n_embd=32", "model.n_head=2", "model.block_size=32",
            "model.moe.expert_hidden=32", "train.batch_size=2", f"train.schedule=\"{schedule}\"",
            "train.max_minutes=2", "train.eval_every=1000", "train.checkpoint_every=1000",
            "train.log_every=1", "train.resume=\"auto\""]
    ref, run = tmp_path / "ref", tmp_path / "run"
    train_on_fake_clock(monkeypatch, [*argv, "--out", str(ref)], slow_from=60)
    train_on_fake_clock(monkeypatch, [*argv, "--out", str(run)], interrupt_at=80, slow_from=60)
    assert _lrs(run)[-1][0] == 81
    train_on_fake_clock(monkeypatch, [*argv, "--out", str(run)], slow_from=60)
    want = _lrs(ref)
    assert want[-1][0] == 100
    assert _lrs(run) == want


@pytest.mark.slow
def test_early_stopping_keeps_its_patience_across_a_resume(tmp_path, data_dir, monkeypatch):
    """Interrupted between the evaluations after the best one, the resumed run stops where the
    uninterrupted one does (a fresh watch took its first evaluation for the best)."""
    from slms.rundir import RunDir

    argv = ["train", "configs/tiny.toml", f"data.path={data_dir}", "model.n_layer=1",
            "train.max_steps=60", "train.eval_every=2", "train.early_stop=2", "train.lr=0.3",
            "train.warmup_steps=0", "train.grad_clip=0", "train.resume=\"auto\""]
    ref, run = tmp_path / "ref", tmp_path / "run"
    train_on_fake_clock(monkeypatch, [*argv, "--out", str(ref)])
    stop = max(int(p.name.split("-")[1]) for p in RunDir(ref).checkpoints())
    assert 6 < stop < 60
    train_on_fake_clock(monkeypatch, [*argv, "--out", str(run)], interrupt_at=stop - 4)
    train_on_fake_clock(monkeypatch, [*argv, "--out", str(run)])
    assert max(int(p.name.split("-")[1]) for p in RunDir(run).checkpoints()) == stop


def test_the_overfitting_warning_compares_mean_training_losses():
    w = ValidationWatch(patience=0)
    for loss in (3.0, 2.0, 1.0):
        w.add_train(loss)
    assert w.evaluated(2.5) is None and w.last == (2.0, 2.5)
    for loss in (1.0, 3.5, float("nan")):  # the last step's loss alone fell; the mean rose
        w.add_train(loss)
    assert w.evaluated(2.6) is None and w.last == (2.25, 2.6)
    for loss in (1.5, 2.0):
        w.add_train(loss)
    assert "mean training loss fell 2.2500 -> 1.7500" in w.evaluated(2.7)


@pytest.mark.slow
def test_early_stop_ends_the_run_with_its_best_checkpoint(tmp_path, data_dir, capsys):
    from slms.cli import main
    from slms.rundir import RunDir

    out = tmp_path / "run"
    # lr so high that validation stops improving at once
    argv = ["train", "configs/tiny.toml", f"data.path={data_dir}", "model.n_layer=1",
            "train.max_steps=60", "train.eval_every=2", "train.early_stop=2", "train.lr=0.3",
            "train.warmup_steps=0", "train.grad_clip=0", "--out", str(out)]
    assert main(argv) == 0
    out_text = capsys.readouterr().out
    assert "early stop at step" in out_text
    steps = [int(p.name.split("-")[1]) for p in RunDir(out).checkpoints()]
    assert max(steps) < 60 and (out / "best").is_dir()


@pytest.mark.parametrize("key,value", [("max_minutes", -1), ("early_stop", -2)])
def test_bad_budget_values_are_refused(key, value):
    from slms.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=f"train.{key}"):
        load_config(None, [f"train.{key}={value}"])


@pytest.mark.slow
def test_a_budgeted_run_continuing_another_fits_its_steps_after_init_step(tmp_path, data_dir,
                                                                         monkeypatch):
    """train.init_step with train.max_minutes: the budget's count comes after the start step
    (1 "second" a step, 30 seconds: about 10 + 30 steps), and the timed steps run at the
    continued schedule's lr (not a fresh one, nor one planned over the 10**9 placeholder)."""
    from slms.rundir import RunDir

    argv = ["train", "configs/tiny.toml", f"data.path={data_dir}", "model.n_layer=1",
            "model.n_embd=32", "model.n_head=2", "model.block_size=32",
            "model.moe.expert_hidden=32", "train.batch_size=2", "train.warmup_steps=4",
            "train.eval_every=1000", "train.log_every=1", "train.checkpoint_every=10"]
    src, run = tmp_path / "src", tmp_path / "run"
    train_on_fake_clock(monkeypatch, [*argv, "train.max_steps=40", "train.keep_checkpoints=5",
                              "--out", str(src)])
    train_on_fake_clock(monkeypatch, [*argv, "train.max_minutes=0.5", "train.init_step=10",
                              "train.init_total=40",
                              f"train.init_from={RunDir(src).step_dir(10)}", "--out", str(run)])
    max_steps = RunDir(run).read_config()["train"]["max_steps"]
    got, want = _lrs(run), _lrs(src)
    assert got[0][0] == 11 and got[-1][0] == max_steps and 10 + PROBE_STEPS < max_steps < 45
    assert got[0][1] == want[10][1]  # step 11: the source run's lr there
