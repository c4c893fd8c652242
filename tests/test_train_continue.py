"""A new run that continues another at a step (train.init_from + train.init_step): the source
run's batches and learning-rate schedule from that step on, with the weights of its checkpoint
(the study's upcycled variant starts this way)."""

import math

import pytest

from slms.cli import main
from slms.config import ConfigError, load_config
from slms.rundir import RunDir
from slms.train.metrics import read_metrics

ARGS = ["train", "configs/tiny.toml", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
        "model.block_size=32", "model.moe.expert_hidden=32", "model.moe.router=\"topk\"",
        "train.batch_size=2",
        "train.warmup_steps=4", "train.eval_every=1000", "train.log_every=1",
        "train.threads=1"]


def _steps(run_dir):
    return {r["step"]: (r["lr"], r["loss"]) for r in read_metrics(run_dir)
            if "tokens_per_s" in r}


@pytest.fixture(scope="module")
def source(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("continue") / "source"
    assert main([*ARGS, f"data.path={data_dir}", "train.max_steps=30",
                 "train.checkpoint_every=10", "train.keep_checkpoints=10",
                 "--out", str(out)]) == 0
    return out


def test_a_continued_run_follows_the_source_runs_batches_and_schedule(source, data_dir,
                                                                     tmp_path):
    out = tmp_path / "continued"
    ckpt = RunDir(source).step_dir(10)
    assert main([*ARGS, f"data.path={data_dir}", "train.max_steps=30",
                 f"train.init_from={ckpt}", "train.init_step=10", "train.init_total=30",
                 "--out", str(out)]) == 0
    want, got = _steps(source), _steps(out)
    assert sorted(got) == list(range(11, 31))
    assert [got[s][0] for s in got] == [want[s][0] for s in got]  # the same learning rates
    # step 11's loss is the checkpoint's weights on the source run's 11th batch; later steps
    # differ (the optimizer state is new)
    assert got[11][1] == want[11][1]
    assert got[20][1] != want[20][1]


def test_a_continued_run_given_another_length_refits_the_schedule_there(source, data_dir,
                                                                       tmp_path):
    out = tmp_path / "shorter"
    assert main([*ARGS, f"data.path={data_dir}", "train.max_steps=20",
                 f"train.init_from={RunDir(source).step_dir(10)}", "train.init_step=10",
                 "train.init_total=30", "--out", str(out)]) == 0
    want, got = _steps(source), _steps(out)
    lr = load_config("configs/tiny.toml").train.lr
    assert sorted(got) == list(range(11, 21))
    assert got[11][0] == pytest.approx(want[11][0], rel=0.05)  # continuous where it starts
    # the cosine's progress goes on from where the source was at step 10 (warm-up 4 steps of
    # 30) to 1 at step 20; logged step s ran at the factor of 0-based step s - 1 (floor 0)
    p10 = (10 - 4) / (30 - 4)
    p19 = p10 + (1 - p10) * (19 - 10) / (20 - 10)
    assert got[20][0] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * p19)))
    lrs = [got[s][0] for s in sorted(got)]
    assert lrs == sorted(lrs, reverse=True)


def test_init_step_needs_init_from():
    with pytest.raises(ConfigError, match="train.init_from"):
        load_config("configs/tiny.toml", ["train.init_step=10"])
