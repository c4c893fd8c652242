"""Data parallel training on 2 gloo processes equals 1 process with the same global batch."""

import socket

import pytest
import torch
import torch.multiprocessing as mp

from slms.checkpoint import load_checkpoint
from slms.config import load_config
from slms.train.trainer import train
from train_helpers import dist_worker, losses, val_losses

BASE = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=32",
        "model.moe.expert_hidden=32", "model.moe.router=\"topk\"", "train.batch_size=4",
        "train.max_steps=4", "train.log_every=1", "train.eval_every=4",
        "train.checkpoint_every=4", "train.warmup_steps=1", "train.lr=3e-3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_dir):
    """1 process, 2 accumulation steps: the same global batch as 2 processes x 1."""
    out = tmp_path_factory.mktemp("single") / "run"
    cfg = load_config("configs/tiny.toml", [f"data.path={data_dir}", *BASE, "train.grad_accum=2"])
    train(cfg, out_dir=out, log=lambda *a: None)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one(tmp_path, data_dir, single, parallel):
    out = tmp_path / "run"
    overrides = [f"data.path={data_dir}", *BASE, f"train.parallel=\"{parallel}\"",
                 "train.threads=1"]
    mp.spawn(dist_worker, args=(2, _free_port(), overrides, str(out)), nprocs=2, join=True)
    got = load_checkpoint(out / "checkpoints" / "step-4")[0].state_dict()
    ref = load_checkpoint(single / "checkpoints" / "step-4")[0].state_dict()
    for name, w in ref.items():
        torch.testing.assert_close(got[name], w, rtol=1e-4, atol=1e-5, msg=name)
    for (s1, l1), (s2, l2) in zip(losses(out), losses(single), strict=True):
        assert s1 == s2 and abs(l1 - l2) < 1e-5
    assert (out / "best" / "model.safetensors").is_file()
    # the ranks shared the validation batches and summed them: the loss of the whole split
    val, val_ref = val_losses(out), val_losses(single)
    assert len(val) == len(val_ref) == 1 and val[0][0] == val_ref[0][0]
    assert val[0][1] == pytest.approx(val_ref[0][1], rel=1e-5)
