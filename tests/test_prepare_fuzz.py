"""`slms prepare` fuzzed with hypothesis (#28 item 2c): on arbitrary stories (any unicode,
special tokens' text, empty and blank stories, lone surrogates) and on arbitrary bytes in a
source file, prepare either writes a consistent dataset (meta.json's counts are the .bin
files', and the tokens decode back to the stories) or refuses with one line and writes
nothing. The tokenizer's own round trip is fuzzed in test_tokenizer.py. Bounded for CI
(derandomize); SLMS_FUZZ_EXAMPLES raises the count."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slms.cli import main
from slms.data.loader import PackedData
from slms.data.prepare import PrepareOptions, prepare
from slms.tokenizer import EOT, SPECIAL_TOKENS, Tokenizer

EXAMPLES = int(os.environ.get("SLMS_FUZZ_EXAMPLES", "0")) or None
FUZZ = settings(max_examples=EXAMPLES or 40, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])
story = st.text(max_size=60) | st.lists(
    st.sampled_from(["a", " ", "\n", "\u00e9", "\U0001f600", "\ud800", "", *SPECIAL_TOKENS]),
    max_size=6).map("".join)
stories = st.lists(story, max_size=6)
piece = st.binary(max_size=40) | st.lists(
    st.sampled_from([b"Once", b" ", b"\n", b"\n\n", EOT.encode(), b"\xff", b"\xc3",
                     "\u00e9".encode(), b"\x00", b"\\ud800"]), max_size=10).map(b"".join)
json_line = piece.map(lambda b: json.dumps({"text": b.decode("utf-8", "surrogateescape")},
                                           ensure_ascii=True).encode()) \
    | st.sampled_from([b'{"text": null}', b"7", b'{"text": 3}', b"[", b'"x"', b"{}"]) | piece
# a source file's bytes, by suffix: stories (arbitrary bytes) between separators, or .jsonl lines
source_bytes = st.fixed_dictionaries({
    ".txt": st.lists(piece, max_size=10).map(lambda ps: b"\n<|endoftext|>\n".join(ps)),
    ".jsonl": st.lists(json_line, max_size=10).map(b"\n".join)})


def check_consistent(out: Path, meta: dict, want: dict[str, list[str]] | None) -> None:
    """meta.json on disk is `meta`; its counts are the .bin files'; the loader reads it; with
    `want` (the stories kept), the tokens decode to them, each followed by <|endoftext|>."""
    assert json.loads((out / "meta.json").read_text()) == meta
    data = PackedData(out)
    tok = Tokenizer.from_file(out / "tokenizer.json")
    for split in ("train", "val"):
        ids = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])
        counts = meta["splits"][split]
        assert counts["tokens"] == ids.size == len(data.tokens(split)) > 0
        if want is not None:
            assert counts["stories"] == len(want[split])
            assert counts["bytes"] == sum(len(s.encode()) for s in want[split])
            assert tok.decode(ids.tolist()) == "".join(s + EOT for s in want[split])


def test_prepare_of_arbitrary_stories_is_consistent_or_one_line(tokenizer, tmp_path):
    n = [0]

    @FUZZ
    @given(train=stories, val=stories)
    def one(train: list[str], val: list[str]) -> None:
        n[0] += 1
        out = tmp_path / f"out-{n[0]}"
        try:
            meta = prepare({"train": train, "val": val}, tokenizer, out,
                           opts=PrepareOptions(num_proc=1))
        except ValueError as e:
            assert "\n" not in str(e) and str(e)
            if "lone surrogate" in str(e):
                assert any("\ud800" in s for s in train + val)
            else:
                assert "split has no stories" in str(e) and not (any(train) and any(val)), e
            assert not out.exists()
            return
        kept = {"train": [s for s in train if s], "val": [s for s in val if s]}
        check_consistent(out, meta, kept)

    one()


def test_prepare_of_arbitrary_bytes_in_a_file_is_consistent_or_one_line(
        tokenizer, data_dir, tmp_path, capsys):
    n = [0]

    @settings(FUZZ, max_examples=EXAMPLES or 25)
    @given(raw=source_bytes, suffix=st.sampled_from([".txt", ".jsonl"]))
    def one(raw: dict[str, bytes], suffix: str) -> None:
        n[0] += 1
        src, out = tmp_path / f"src-{n[0]}{suffix}", tmp_path / f"out-{n[0]}"
        src.write_bytes(raw[suffix])
        code = main(["prepare", "--source", str(src), "--tokenizer",
                     str(data_dir / "tokenizer.json"), "--out", str(out), "--num-proc", "1",
                     "--val-fraction", "0.5"])
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("slms: error: ")]
        if code == 0:
            check_consistent(out, json.loads((out / "meta.json").read_text()), None)
        else:
            assert code == 2 and len(lines) == 1, err
            assert "Traceback" not in err
            assert not out.exists()

    one()


def test_a_lone_surrogate_in_a_source_names_its_story(tokenizer, tmp_path):
    stories = [f"story {i}" for i in range(5)]
    stories[3] = "a\ud800b"
    with pytest.raises(ValueError, match=r"^in story 4 of the train split, character 1 is a "
                                         r"lone surrogate \(U\+D800\)"):
        prepare({"train": stories, "val": ["v"]}, tokenizer, tmp_path / "out",
                opts=PrepareOptions(num_proc=2))  # from a worker process
    assert not (tmp_path / "out").exists()
