"""Crash consistency of `slms prepare` (#28 item 5): SIGKILL at any point leaves the old
dataset whole, or no dataset, never a directory that training reads as complete; the next
prepare puts things right. The prepared data is also checked against meta.json when read
(a .bin of another preparation is refused)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slms.cli import main
from slms.data.loader import PackedData
from test_lock import prepare_args, snapshot

# Where the killed prepare dies (each patch sends SIGKILL to the process itself):
KILLS = {
    # mid-way through the first split's tokens
    "writing": "prep._SplitWriter.add = lambda self, enc: die()",
    # meta.json written in the temporary directory, tokenizer.json not yet
    "meta": "prep.Tokenizer.save = lambda self, path: die()",
    # everything written and fsynced, not yet moved into place
    "swap": "fsutil.replace_dir = lambda new, path: die()",
    # the two-rename fallback (no renameat2): the old moved aside, the new not yet in place
    "between-renames": """
fsutil.exchange = lambda a, b: False
_replace = os.replace
def _first_then_die(a, b):
    _replace(a, b)
    if ".old-" in str(b):
        die()
fsutil.os.replace = _first_then_die
""",
    # moved into place, the process not yet done
    "after-swap": """
_replace_dir = fsutil.replace_dir
def _then_die(new, path):
    _replace_dir(new, path)
    die()
fsutil.replace_dir = _then_die
""",
}
PRELUDE = """
import os, signal, sys
import slms.data.prepare as prep
import slms.fsutil as fsutil
def die():
    os.kill(os.getpid(), signal.SIGKILL)
"""


def killed_prepare(args: list[str], where: str) -> subprocess.CompletedProcess:
    code = PRELUDE + KILLS[where] + "\nfrom slms.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=120)


def loads_as(d: Path) -> dict[str, int] | None:
    """The token counts training would read from `d`, or None if it refuses it."""
    try:
        data = PackedData(d)
    except (ValueError, OSError):
        return None
    return {split: len(data.tokens(split)) for split in ("train", "val")}


@pytest.mark.slow
@pytest.mark.parametrize("where", list(KILLS))
def test_sigkill_during_prepare_leaves_the_old_dataset_or_the_new_never_a_mix(
        tmp_path, data_dir, where):
    out = tmp_path / "data"
    assert main(prepare_args(tmp_path, data_dir, out, n=60)) == 0
    old, old_counts = snapshot(out), loads_as(out)
    new_args = prepare_args(tmp_path, data_dir, out, n=90)
    r = killed_prepare(new_args, where)
    assert r.returncode == -9, r.stderr
    if where == "after-swap":
        assert loads_as(out) not in (None, old_counts)  # the new one, whole
    elif where == "between-renames":
        assert not out.exists() and loads_as(out) is None  # none: training refuses
    else:
        assert snapshot(out) == old and loads_as(out) == old_counts
    assert main(new_args) == 0  # the next prepare repairs and replaces
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".data.")] == []
    counts = loads_as(out)
    meta = json.loads((out / "meta.json").read_text())
    assert counts == {s: meta["splits"][s]["tokens"] for s in ("train", "val")} != old_counts


@pytest.mark.slow
def test_sigkill_of_a_first_prepare_leaves_no_dataset(tmp_path, data_dir):
    out = tmp_path / "data"
    assert killed_prepare(prepare_args(tmp_path, data_dir, out), "swap").returncode == -9
    assert not out.exists()


def test_a_bin_file_of_another_preparation_is_refused(tmp_path, data_dir):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(prepare_args(tmp_path, data_dir, a, n=40)) == 0
    assert main(prepare_args(tmp_path, data_dir, b, n=70)) == 0
    (a / "val.bin").write_bytes((b / "val.bin").read_bytes())
    with pytest.raises(ValueError, match=r"val.bin holds [\d,]+ token ids of uint16 but "
                                         r"meta.json counts [\d,]+: .* or meta.json is not "
                                         r"its own"):
        PackedData(a)
