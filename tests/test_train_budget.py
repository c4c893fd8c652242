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
    assert cfg["max_minutes"] == 0 and PROBE_STEPS < cfg["max_steps"] < 40
    assert losses(out)[-1][0] == cfg["max_steps"]


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
