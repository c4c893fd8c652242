import os
import random
import shutil
import subprocess
import sys
import time

import pytest
import torch

import slms
from conftest import tiny_config
from slms import fsutil
from slms.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from slms.fsutil import atomic_write_text, exchange
from slms.model import GPT
from slms.rundir import resolve
from slms.train.state import tidy_run_dir


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_identical_logits(tmp_path, tokenizer, tie):
    torch.manual_seed(0)
    model = GPT(tiny_config(moe=True, tie_weights=tie)).eval()
    save_checkpoint(tmp_path / "ck", model, tokenizer, {"step": 3})
    loaded, tok, meta = load_checkpoint(tmp_path / "ck")
    x = torch.randint(0, 300, (2, 16))
    assert torch.equal(model(x).logits, loaded(x).logits)
    assert meta["step"] == 3 and tok.sha256 == tokenizer.sha256
    assert (loaded.lm_head.weight is loaded.wte.weight) == tie


def test_load_resolves_run_directories(tmp_path, tokenizer):
    model = GPT(tiny_config())
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "step-10", model, tokenizer)
    save_checkpoint(run / "checkpoints" / "step-2", model, tokenizer)
    assert resolve(run) == run / "checkpoints" / "step-10"
    save_checkpoint(run / "best", model, tokenizer)
    assert resolve(run) == run / "best"
    m, tok = slms.load(run)
    assert isinstance(m, GPT) and not m.training


def test_corrupted_checkpoint_is_a_clear_error(tmp_path, tokenizer):
    save_checkpoint(tmp_path / "ck", GPT(tiny_config()), tokenizer)
    weights = tmp_path / "ck" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated or corrupted"):
        load_checkpoint(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="not found"):
        resolve(tmp_path / "nothing")


def test_failed_save_keeps_previous_checkpoint(tmp_path, tokenizer, monkeypatch):
    model = GPT(tiny_config())
    save_checkpoint(tmp_path / "ck", model, tokenizer, {"step": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(tokenizer), "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "ck", model, tokenizer, {"step": 2})
    _, _, meta = load_checkpoint(tmp_path / "ck")
    assert meta["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp dir left


# ---------------------------------------------------------------------------------------------
# crash safety of the directory replace (best/ is rewritten in place on every new best)


class _Crash(BaseException):
    """A process dying mid-save: nothing after it runs except the `except BaseException` paths."""


def _weights(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)[0].state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.values(), b.values(), strict=True))


def test_atomic_write_text_replaces_and_leaves_no_temp(tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    f = tmp_path / "latest"
    atomic_write_text(f, "checkpoints/step-3\n")
    atomic_write_text(f, "checkpoints/step-6\n")
    assert f.read_text() == "checkpoints/step-6\n"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]
    assert {f.stat().st_ino, tmp_path.stat().st_ino} <= set(synced)  # durable on return


def test_exchange_swaps_two_directories(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "f").write_text("a")
    (tmp_path / "b" / "f").write_text("b")
    if not exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here: save_checkpoint uses two renames")
    assert (tmp_path / "a" / "f").read_text() == "b" and (tmp_path / "b" / "f").read_text() == "a"


@pytest.mark.parametrize("repair", ["recover", "resume", "next-save"])
def test_crash_between_the_fallback_renames_keeps_best(tmp_path, tokenizer, monkeypatch, repair):
    run, best = tmp_path / "run", tmp_path / "run" / "best"
    torch.manual_seed(0)
    old_model, new_model = GPT(tiny_config()), GPT(tiny_config())
    save_checkpoint(best, old_model, tokenizer, {"step": 1})
    monkeypatch.setattr(fsutil, "exchange", lambda a, b: False)  # a filesystem without it
    real_replace, calls = os.replace, []

    def die_on_second_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # best/ has been moved aside, the new one not yet moved in
            raise _Crash
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", die_on_second_rename)
    with pytest.raises(_Crash):
        save_checkpoint(best, new_model, tokenizer, {"step": 2})
    monkeypatch.setattr(os, "replace", real_replace)
    assert not best.exists()  # the crash window
    assert _same(_weights(resolve(run)), old_model.state_dict())  # readers find the old copy
    if repair == "recover":
        fsutil.recover(best)
    elif repair == "resume":
        tidy_run_dir(run, step=1)
    else:
        save_checkpoint(best, new_model, tokenizer, {"step": 2})
    expected = new_model if repair == "next-save" else old_model
    assert _same(_weights(best), expected.state_dict())
    assert [p.name for p in run.iterdir()] == ["best"]  # no .best.old-* / .best.tmp-* left


def _dies_at(fn, ops: list[str], n: int):
    """`fn` counted in `ops`; the n-th counted call (of any function) crashes instead."""
    def step(*args, **kwargs):
        ops.append(fn.__name__)
        if len(ops) == n:
            raise _Crash
        return fn(*args, **kwargs)
    return step


def test_crash_at_any_step_of_a_replace_leaves_a_whole_best(tmp_path, tokenizer, monkeypatch):
    """Die at the 1st, 2nd, ... filesystem step of a save (rename, exchange, removal) until one
    save completes: after each crash best/ loads, unrepaired, as the old or the new checkpoint."""
    if not _exchange_works(tmp_path):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here: see the fallback test above")
    best = tmp_path / "run" / "best"
    torch.manual_seed(0)
    models = [GPT(tiny_config()), GPT(tiny_config())]
    save_checkpoint(best, models[0], tokenizer)
    for n in range(1, 20):
        before, ops = _weights(best), []
        with monkeypatch.context() as m:
            for owner, name in ((os, "replace"), (fsutil, "exchange"), (shutil, "rmtree")):
                m.setattr(owner, name, _dies_at(getattr(owner, name), ops, n))
            try:
                save_checkpoint(best, models[n % 2], tokenizer)
                finished = True
            except _Crash:
                finished = False
        after = _weights(best)  # raises if a crash left best/ missing or torn
        assert _same(after, before) or _same(after, models[n % 2].state_dict()), ops
        if finished:
            break
    assert finished and n > 1


_SAVE_LOOP = """
import sys
import torch
from slms.config import ModelConfig
from slms.model import GPT
from slms.tokenizer import Tokenizer
from slms.checkpoint import save_checkpoint

torch.set_num_threads(1)
tok = Tokenizer.from_file(sys.argv[2])
model = GPT(ModelConfig(vocab_size=300, block_size=32, n_layer=2, n_head=4, n_embd=32))
for i in range(1, 10**6):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(i)
    save_checkpoint(sys.argv[1], model, tok, {"step": i})
    print(i, flush=True)
"""


def _exchange_works(tmp_path) -> bool:
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    return exchange(tmp_path / "x", tmp_path / "y")


def test_sigkill_while_saving_best_leaves_a_whole_best(tmp_path, tokenizer):
    """A process rewriting best/ in a loop is SIGKILLed at a random moment: best/ (after the
    recovery a resume runs) is one whole checkpoint, never missing or mixed."""
    best = tmp_path / "run" / "best"
    tokenizer.save(tmp_path / "tok.json")
    args = [sys.executable, "-c", _SAVE_LOOP, str(best), str(tmp_path / "tok.json")]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # best/ has been replaced twice
            assert proc.stdout.readline(), "the save loop died"
        time.sleep(random.uniform(0, 0.05))
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    if _exchange_works(tmp_path):
        assert (best / "model.safetensors").is_file()  # atomic: best/ never went missing
    fsutil.recover(best)
    model, _, meta = load_checkpoint(best)
    assert all(bool((p == meta["step"]).all()) for p in model.parameters())
