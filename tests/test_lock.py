"""One writer per directory (#28 item 3): while a process trains a run directory or prepares a
data directory, a second `slms train --out R`, `slms train --resume R` or `slms prepare --out
D` is refused with one line naming the first process, and changes nothing; a holder killed
with SIGKILL leaves no stuck lock."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slms.cli import main
from slms.lock import DirLock, LockedError, data_dir_lock
from slms.rundir import RunDir
from train_helpers import _PRELUDE, TINY, losses

HOLD = """
import sys, time
from pathlib import Path
from slms.lock import DirLock, data_dir_lock
what, path = sys.argv[1:]  # RunDir(path).lock() without importing torch (slms.rundir does)
lock = (DirLock(Path(path) / ".slms.lock", "") if what == "run" else data_dir_lock(path))
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold(what: str, path: Path) -> subprocess.Popen:
    """A process that holds the lock of a run (`what`="run") or data directory until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, what, str(path)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def snapshot(d: Path) -> dict[str, str]:
    """Every file under `d` and a hash of its bytes (but the lock file's: its holder's text)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".slms.lock"}


def prepare_args(tmp_path: Path, data_dir: Path, out: Path, n: int = 60) -> list[str]:
    """`slms prepare` of `n` embedded-corpus stories in a .txt file into `out`."""
    from slms import corpus

    src = tmp_path / f"stories-{n}.txt"
    src.write_text("\n<|endoftext|>\n".join(corpus.generate_stories(n, seed=3)) + "\n")
    return ["prepare", "--source", str(src), "--tokenizer", str(data_dir / "tokenizer.json"),
            "--out", str(out), "--num-proc", "1", "--val-fraction", "0.2"]


def _train(data_dir, *extra):
    return ["train", "configs/tiny.toml", f"data.path={data_dir}", *TINY, "train.max_steps=3",
            *extra]


def test_a_second_lock_is_refused_naming_the_holder_and_freed_by_its_death(tmp_path):
    (tmp_path / "r").mkdir()
    assert RunDir(tmp_path / "r").lock().path.name == ".slms.lock"  # the file HOLD locks
    holder = hold("run", tmp_path / "r")
    try:
        with pytest.raises(LockedError) as e:
            RunDir(tmp_path / "r").lock().acquire()
        line = str(e.value)
        assert f"(pid {holder.pid} on {socket.gethostname()}, `python -c run " in line
        assert "\n" not in line and "wait for it to finish or stop it" in line
    finally:
        kill(holder)
    with RunDir(tmp_path / "r").lock():  # SIGKILL released it
        with pytest.raises(LockedError):  # and it excludes others while held here
            DirLock(tmp_path / "r" / ".slms.lock", "it").acquire()
    with RunDir(tmp_path / "r").lock():  # released on exit, and its file removed
        pass
    assert list((tmp_path / "r").iterdir()) == []


def test_train_out_and_resume_are_refused_while_another_process_writes_the_run(
        tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    assert main(_train(data_dir, "--out", str(run))) == 0
    before = snapshot(run)
    holder = hold("run", run)
    try:
        capsys.readouterr()
        assert main(["train", "--resume", str(run), "train.max_steps=6"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"slms: error: the run directory {run} is being written by "
                              f"another process (pid {holder.pid} on ")
        assert "\n" not in err
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        other = hold("run", fresh)
        try:
            assert main(_train(data_dir, "--out", str(fresh))) == 2
            assert f"(pid {other.pid} on " in capsys.readouterr().err
            assert [p.name for p in fresh.iterdir()] == [".slms.lock"]
        finally:
            kill(other)
    finally:
        kill(holder)
    assert snapshot(run) == before
    assert main(["train", "--resume", str(run), "train.max_steps=6"]) == 0  # not stuck
    assert [s for s, _ in losses(run)] == list(range(1, 7))


def test_prepare_is_refused_while_another_prepares_the_same_directory(tmp_path, data_dir,
                                                                      capsys):
    out = tmp_path / "data"
    args = prepare_args(tmp_path, data_dir, out)
    holder = hold("data", out)
    try:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"the data directory {out} is being written by another process (pid " \
               f"{holder.pid} on " in err
        assert not out.exists()
    finally:
        kill(holder)
    assert main(args) == 0
    assert (out / "meta.json").is_file()
    with data_dir_lock(out):  # released when prepare ended
        pass


@pytest.mark.slow
def test_a_second_train_is_refused_while_the_first_runs_and_the_first_finishes_whole(
        tmp_path, data_dir, capsys):
    """A real `slms train --out R` stopped (SIGSTOP) at step 2 holds R: a second `--out R`
    is refused naming its pid; the first, continued, logs each of its steps once."""
    run = tmp_path / "run"
    code = (_PRELUDE.replace("AT", "2").replace("SIG", repr("SIGSTOP"))
            + "T.train_step = _hooked\nfrom slms.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    first = subprocess.Popen([sys.executable, "-c", code,
                              *_train(data_dir, "train.max_steps=5", "--out", str(run))],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while _state(first.pid) != "T":
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        before = snapshot(run)
        assert main(_train(data_dir, "--out", str(run))) == 2
        assert f"(pid {first.pid} on " in capsys.readouterr().err
        assert snapshot(run) == before
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=600) == 0, first.stderr.read()
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4, 5]


def _state(pid: int) -> str:
    """The process state letter from /proc (T: stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
