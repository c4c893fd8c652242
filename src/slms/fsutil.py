"""Crash-safe file system writes: a file or a directory is replaced whole or not at all.

A directory is filled under a temporary sibling name, fsynced, and moved into place. An existing
one is replaced in one atomic step where the OS allows (Linux renameat2 RENAME_EXCHANGE);
elsewhere with two renames, whose crash window `recover` repairs.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace the file at `path` with `text`: after a crash it holds the old text or the new,
    whole, and the new survives a power loss once this returns."""
    path = Path(path)
    # os.open with mode 0o666 honours the umask (mkstemp would make the file private)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w",
                       encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# errors that mean "this kernel / filesystem cannot exchange": fall back to two renames (EPERM:
# some container seccomp profiles deny syscalls they do not know)
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM}


@functools.cache
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.4
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange(a: str | Path, b: str | Path) -> bool:
    """Atomically swap two existing paths; False (nothing done) where the OS or filesystem
    cannot, so the caller falls back."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def replace_dir(new: Path, path: Path) -> None:
    """Move the complete directory `new` to `path`, replacing any directory there: in one atomic
    step where the OS allows; else `path` is missing for a moment, which `recover` repairs."""
    if not path.exists():
        os.replace(new, path)
    elif exchange(new, path):
        shutil.rmtree(new, ignore_errors=True)  # `new` now names the old checkpoint
    else:
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(new, path)  # a crash before this line leaves only `old`: see recover()
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(path.parent)


def siblings(path: Path, kind: str) -> list[Path]:
    """The `.NAME.old-*` or `.NAME.tmp-*` siblings of `path`, oldest first."""
    if not path.parent.is_dir():
        return []
    found = []
    for p in path.parent.iterdir():
        if p.name.startswith(f".{path.name}.{kind}-"):
            try:
                found.append((p.lstat().st_mtime_ns, p))
            except FileNotFoundError:  # removed meanwhile by the writer that owned it
                pass
    return [p for _, p in sorted(found)]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover(path: str | Path) -> None:
    """Repair what a crash while replacing `path` left (call where nothing else writes it): a
    missing `path` gets back its newest `.NAME.old-*` copy; once `path` exists its stale
    `.NAME.old-*` / `.NAME.tmp-*` siblings are removed."""
    path = Path(path)
    olds = siblings(path, "old")
    if olds and not path.exists():
        os.replace(olds.pop(), path)
        fsync_dir(path.parent)
    if path.exists():
        for p in olds + siblings(path, "tmp"):
            _remove(p)


_LEFTOVER = re.compile(r"^\.(.+)\.(old|tmp)-[\w-]+$")


def tidy(parent: str | Path) -> None:
    """On resume (no writer running): `recover` every entry of `parent` with leftovers, then
    drop the temp files and directories of writes that never finished."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    for name in sorted({m.group(1) for p in parent.iterdir() if (m := _LEFTOVER.match(p.name))}):
        recover(parent / name)
        for p in siblings(parent / name, "tmp"):
            _remove(p)


def disk_full(e: BaseException) -> bool:
    """Whether `e` says the disk is full, whatever library raised it."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    text = str(e)
    return "os error 28" in text or "No space left" in text


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A temporary sibling directory to fill; when the block ends without an error its files
    are fsynced and it replaces `path` (`replace_dir`), else it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)  # a crash in an earlier replace may have left `path` missing
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        for f in tmp.iterdir():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        replace_dir(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(e) and not isinstance(e, OSError):
            # safetensors, torch.save and tokenizers report a full disk in their own types
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise


def read_json(path: Path, then: str, error: type[Exception] = ValueError) -> Any:
    """The JSON in `path`; a damaged file raises `error` with one line: what is wrong, then
    `then` (what to do)."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is corrupted ({e}){then}") from None
