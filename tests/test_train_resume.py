"""Exact resume, crash-safe checkpoints and preemption, with real signals in subprocesses."""

import json

import pytest
import torch

from slms.checkpoint import CheckpointError, load_checkpoint, load_trainer_state
from slms.cli import main
from train_helpers import TINY, losses, run_cli, val_losses


def _args(data_dir, *extra):
    return ["train", "configs/tiny.toml", f"data.path={data_dir}", *TINY, *extra]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, data_dir):
    """The uninterrupted 8-step reference run (noisy router + dropout: RNG state matters)."""
    out = tmp_path_factory.mktemp("full") / "run"
    assert main(_args(data_dir, "train.max_steps=8", "--out", str(out))) == 0
    return out


@pytest.mark.slow
def test_sigkill_then_resume_gives_bitwise_identical_losses(tmp_path, data_dir, full_run):
    run = tmp_path / "run"
    killed = run_cli(_args(data_dir, "train.max_steps=8", "--out", str(run)),
                     signal_at=("SIGKILL", 4))
    assert killed.returncode == -9, killed.stderr
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4]  # step 4 was logged after checkpoint 3
    assert main(["train", "--resume", str(run)]) == 0
    assert losses(run) == losses(full_run)  # bitwise: floats compared exactly
    assert val_losses(run) == val_losses(full_run)
    a, _, _ = load_checkpoint(run / "checkpoints" / "step-8")
    b, _, _ = load_checkpoint(full_run / "checkpoints" / "step-8")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                  b.state_dict().values(), strict=True))


@pytest.mark.slow
def test_resume_auto_with_bias_router_and_accumulation(tmp_path, data_dir):
    extra = ["model.moe.router=\"bias\"", "train.grad_accum=2", "train.max_steps=5",
             "train.resume=\"auto\""]
    ref = tmp_path / "ref"
    assert main(_args(data_dir, *extra, "--out", str(ref))) == 0
    run = tmp_path / "run"
    killed = run_cli(_args(data_dir, *extra, "--out", str(run)), signal_at=("SIGKILL", 4))
    assert killed.returncode == -9, killed.stderr
    assert main(_args(data_dir, *extra, "--out", str(run))) == 0  # same command again
    assert losses(run) == losses(ref) and len(losses(ref)) == 5
    bias = [load_checkpoint(r / "checkpoints" / "step-5")[0].state_dict()
            ["blocks.0.ffn.router.expert_bias"] for r in (run, ref)]
    assert torch.equal(*bias) and bias[0].abs().sum() > 0


@pytest.mark.slow
def test_kill_during_save_keeps_previous_checkpoint(tmp_path, data_dir, full_run, capsys):
    run = tmp_path / "run"
    killed = run_cli(_args(data_dir, "train.max_steps=8", "--out", str(run)),
                     kill_in_save="step-6")
    assert killed.returncode == -9, killed.stderr
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".")) == ["step-3"]
    assert any(p.name.startswith(".step-6.tmp") for p in ckpts.iterdir())  # the torn write
    load_checkpoint(ckpts / "step-3")
    assert load_trainer_state(ckpts / "step-3")["step"] == 3
    assert main(["train", "--resume", str(run)]) == 0
    assert losses(run) == losses(full_run)
    assert not any(p.name.startswith(".") for p in ckpts.iterdir())


@pytest.mark.slow
def test_resume_falls_back_past_a_corrupted_checkpoint(tmp_path, data_dir, full_run, capsys):
    run = tmp_path / "run"
    assert main(_args(data_dir, "train.max_steps=6", "train.keep_checkpoints=3",
                      "--out", str(run))) == 0
    trainer_pt = run / "checkpoints" / "step-6" / "trainer.pt"
    trainer_pt.write_bytes(trainer_pt.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="trainer.pt is truncated or corrupted"):
        load_trainer_state(trainer_pt.parent)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "train.max_steps=8"]) == 0
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "step-6/trainer.pt is truncated" in warnings[0]
    assert "resumed from" in out and "step-3 (step 3)" in out
    assert [s for s, _ in losses(run)] == list(range(1, 9))
    assert losses(run)[:3] == losses(full_run)[:3]  # later steps: a schedule to 6 steps


def test_keep_checkpoints_and_latest_pointer(tmp_path, data_dir):
    run = tmp_path / "run"
    assert main(_args(data_dir, "train.max_steps=5", "train.checkpoint_every=1",
                      "train.keep_checkpoints=3", "train.eval_every=100", "--out",
                      str(run))) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-3", "step-4",
                                                                       "step-5"]
    assert (run / "latest").read_text().strip() == "checkpoints/step-5"
    assert (run / "best" / "model.safetensors").is_file()


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, data_dir):
    run = tmp_path / "run"
    done = run_cli(_args(data_dir, "train.max_steps=50", "train.checkpoint_every=100",
                         "--out", str(run)), signal_at=("SIGTERM", 3))
    assert done.returncode == 0, done.stderr
    assert "SIGTERM: stopping after this step" in done.stderr
    assert f"checkpoint saved in {run / 'checkpoints' / 'step-4'}" in done.stdout
    assert load_trainer_state(run / "checkpoints" / "step-4")["step"] == 4
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4


def test_resume_puts_back_checkpoints_torn_out_mid_replace(tmp_path, data_dir, capsys):
    """A crash between the two renames of a non-atomic replace leaves best/ and step-6 only as
    .NAME.old-PID copies: resuming puts them back (and uses step-6) before it looks."""
    run = tmp_path / "run"
    assert main(_args(data_dir, "train.max_steps=6", "--out", str(run))) == 0
    (run / "best").rename(run / ".best.old-123")
    (run / "checkpoints" / "step-6").rename(run / "checkpoints" / ".step-6.old-123")
    (run / "checkpoints" / ".step-6.tmp-abc").mkdir()  # the new copy never moved in
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "train.max_steps=7"]) == 0
    assert "step-6 (step 6)" in capsys.readouterr().out
    assert (run / "best" / "model.safetensors").is_file()
    assert not [p for d in (run, run / "checkpoints") for p in d.iterdir()
                if p.name.startswith((".best", ".step"))]
