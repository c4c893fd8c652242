"""One writer per directory: an exclusive lock on a file, held while a process writes a run
directory (`slms train`) or a prepared data directory (`slms prepare`).

The lock is `fcntl.flock` on an open file, which the kernel releases when the process ends
however it ends (SIGKILL, a crash, a power loss): a dead writer never leaves it stuck (the
file it leaves behind means nothing by itself; a clean exit removes it). The holder writes
its pid, host, command and start time into the file, so that the process refused can name
it. Where `fcntl` does not
exist (Windows) there is no lock.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]


class LockedError(ValueError):
    """Another process holds the lock (its message names that process). A ValueError: the
    command line reports it as one line, as it does a user's mistake."""


class DirLock:
    """An exclusive lock on the file `path` (created if missing, in a directory that must
    exist), taken at once or refused."""

    def __init__(self, path: str | Path, what: str):
        self.path, self.what = Path(path), what
        self.fd: int | None = None

    def acquire(self) -> DirLock:
        """Take the lock, or raise LockedError naming its holder (`what`: what is locked, for
        the message)."""
        if fcntl is None:
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise LockedError(f"{self.what} is being written by another process "
                                  f"({holder(self.path)}): wait for it to finish or stop it, "
                                  "then run this again") from None
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, self.path):
                break
            os.close(fd)  # locked a file its holder removed as it let go: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, `{_command()}`, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        """Let go, removing the file while still holding it (whoever opened it meanwhile
        sees it gone once they lock it, and retries on a new one)."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                self.path.unlink(missing_ok=True)
            finally:
                os.close(fd)  # closing the only descriptor releases the flock

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *_exc: object) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def holder(path: Path) -> str:
    """What the lock file says of the process holding it."""
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        text = ""
    return text.splitlines()[0] if text else "it has not said which yet"


def _command() -> str:
    argv = [Path(sys.argv[0]).name if sys.argv else "python", *sys.argv[1:]]
    argv[0] = {"__main__.py": "slms", "-c": "python -c"}.get(argv[0], argv[0])  # python -m slms
    line = " ".join(argv)
    return line if len(line) <= 80 else line[:77] + "..."


def data_dir_lock(data_dir: str | Path) -> DirLock:
    """The lock of a prepared data directory: a file beside it (.NAME.lock), since the
    directory itself is replaced whole when prepare finishes."""
    d = Path(data_dir)
    return DirLock(d.with_name(f".{d.name}.lock"), f"the data directory {data_dir}")
