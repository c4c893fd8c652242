"""Tokenize a source into DIR/{train,val}.bin + DIR/meta.json, streaming, with bounded memory.

Layouts:
  - ``packed`` (default): the stories of a split are concatenated, each followed by the
    end-of-text id, so no position is padding.
  - ``padded``: the seed's layout, one story per row of block_size + 1 ids (truncated, or padded
    with end-of-text ids); DIR/{split}.lengths.npy holds each row's real length so the loader
    can exclude pad positions from every loss. meta.json's `scored_bytes` counts the text
    bytes of the kept tokens (a truncated story's tail is never scored), for bits per byte.
    A row starts with an end-of-text id, as every story follows one in the packed layout:
    the first word is scored, and generation prompts (which start after one) look like
    training rows.
Token ids are uint16 when the vocab fits, else uint32. Output is written to a temporary
directory moved into place at the end (`slms.fsutil.atomic_dir`): an interrupted run leaves
nothing that looks complete, and the data it replaces stays whole until then.
"""

from __future__ import annotations

import json
import random
import sys
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm import tqdm

from slms.data.encode import EncodedChunk, Encoder, resolve_num_proc
from slms.data.sources import SPLITS, Source
from slms.fsutil import atomic_dir, read_json
from slms.lock import data_dir_lock
from slms.tokenizer import NotTextError, Tokenizer

META = "meta.json"
CHUNK = 1000  # stories per encode_batch call / per task handed to a worker

# UTF-8 text that was decoded as cp1252 somewhere upstream (TinyStories has some), then the
# typographic characters themselves, both mapped to plain ASCII as the rest of the dataset is.
MOJIBAKE = {
    "\u00e2\u20ac\u2122": "'", "\u00e2\u20ac\u02dc": "'", "\u00e2\u20ac\u0153": '"',
    "\u00e2\u20ac\u009d": '"', "\u00e2\u20ac\u201d": "-", "\u00e2\u20ac\u201c": "-",
    "\u00e2\u20ac\u00a6": "...", "\u00c2\u00a0": " ", "\u00c3\u00a9": "\u00e9",
}
TYPOGRAPHIC = {"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2014": "-",
               "\u2013": "-", "\u2026": "...", "\u00a0": " "}


def fix_text(text: str) -> str:
    """Repair known mojibake, map typographic punctuation to ASCII, normalise to NFC."""
    for table in (MOJIBAKE, TYPOGRAPHIC):
        for bad, good in table.items():
            if bad in text:
                text = text.replace(bad, good)
    return unicodedata.normalize("NFC", text)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass(frozen=True)
class PrepareOptions:
    layout: str = "packed"  # packed | padded
    block_size: int = 1080  # padded layout only
    fix_text: bool = False
    dedupe: bool = False
    num_proc: int | str = "auto"  # worker processes, or auto (see slms.data.encode)
    train_count: int | None = None
    val_count: int | None = None
    seed: int = 0
    # replace an output directory that holds data prepared with another tokenizer, or other
    # files (the same tokenizer's data is always replaced: re-preparing is normal)
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.layout not in ("packed", "padded"):
            raise ValueError("--layout must be packed or padded")
        resolve_num_proc(self.num_proc)
        if self.block_size < 2:
            raise ValueError("--block-size must be >= 2")


class _Hygiene:
    """--fix-text and --dedupe, with the counts that go into meta.json."""

    def __init__(self, opts: PrepareOptions):
        self.opts = opts
        self.seen: set[int] = set()
        self.counts = {"fixed": 0, "dropped_empty": 0, "dropped_duplicate": 0}

    def __call__(self, stories: Iterable[str]) -> Iterator[str]:
        for s in stories:
            if self.opts.fix_text:
                fixed = fix_text(s).strip()
                self.counts["fixed"] += fixed != s
                s = fixed
            if not s:
                self.counts["dropped_empty"] += 1
                continue
            if self.opts.dedupe:
                h = hash(s)
                if h in self.seen:
                    self.counts["dropped_duplicate"] += 1
                    continue
                self.seen.add(h)
            yield s


def reservoir(stories: Iterable[str], count: int, seed: int) -> list[str]:
    """A seeded uniform sample of `count` stories from a stream, kept in stream order."""
    rng = random.Random(seed)
    keep: list[tuple[int, str]] = []
    for i, s in enumerate(stories):
        if i < count:
            keep.append((i, s))
        else:
            j = rng.randint(0, i)
            if j < count:
                keep[j] = (i, s)
    return [s for _, s in sorted(keep)]


def _chunks(stories: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for s in stories:
        chunk.append(s)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _SplitWriter:
    """Appends encoded chunks to DIR/{split}.bin in the layout of `opts`; `stats()` is the
    split's entry in meta.json."""

    def __init__(self, f: BinaryIO, tok: Tokenizer, opts: PrepareOptions, dtype: np.dtype):
        self.f, self.eos_id, self.dtype = f, tok.eos_id, dtype
        self.padded = opts.layout == "padded"
        self.width = opts.block_size + 1
        self.token_bytes = np.asarray(tok.token_bytes()) if self.padded else None
        self.n_stories = self.n_tokens = self.n_bytes = self.n_truncated = self.cut_bytes = 0
        self.lo: int | None = None
        self.hi = 0
        self.row_lengths: list[np.ndarray] = []

    def add(self, enc: EncodedChunk) -> None:
        if self.padded:
            self._add_rows(enc)
        else:
            enc.ids.tofile(self.f)
        lo, hi = int(enc.lengths.min()), int(enc.lengths.max())
        self.lo = lo if self.lo is None else min(self.lo, lo)
        self.hi = max(self.hi, hi)
        self.n_stories += len(enc.lengths)
        self.n_tokens += enc.ids.size
        self.n_bytes += enc.n_bytes

    def _add_rows(self, enc: EncodedChunk) -> None:
        """One row per story: end-of-text, then its ids (eos included) cut or padded to width."""
        n_S = len(enc.lengths)
        starts_S = np.cumsum(enc.lengths) - enc.lengths
        story_N = np.repeat(np.arange(n_S), enc.lengths)
        pos_N = np.arange(enc.ids.size) - starts_S[story_N]  # position within its story
        kept_N = pos_N < self.width - 1  # the row's first position is the leading eos
        rows = np.full((n_S, self.width), self.eos_id, dtype=self.dtype)
        rows[story_N[kept_N], pos_N[kept_N] + 1] = enc.ids[kept_N]
        rows.tofile(self.f)
        assert self.token_bytes is not None
        self.cut_bytes += int(self.token_bytes[enc.ids[~kept_N]].sum())  # never scored
        self.n_truncated += int((enc.lengths > self.width - 1).sum())
        self.row_lengths.append(np.minimum(enc.lengths + 1, self.width).astype(np.uint32))

    def stats(self) -> dict[str, Any]:
        n, tokens = self.n_stories, self.n_tokens
        stats: dict[str, Any] = {
            "stories": n, "tokens": tokens, "bytes": self.n_bytes,
            "bytes_per_token": self.n_bytes / tokens,
            "tokens_per_story": {"mean": tokens / n, "min": self.lo, "max": self.hi},
        }
        if self.padded:
            stats |= {"rows": n, "truncated_stories": self.n_truncated,
                      "scored_bytes": self.n_bytes - self.cut_bytes,
                      "real_tokens": int(sum(int(r.sum()) for r in self.row_lengths)),
                      "padded_positions": n * self.width}
        return stats

    def lengths(self) -> np.ndarray:
        """(rows,) uint32, the real length of each padded row."""
        return np.concatenate([np.zeros(0, np.uint32), *self.row_lengths])


def _write_split(stories: Iterable[str], tok: Tokenizer, out: Path, split: str,
                 opts: PrepareOptions, dtype: np.dtype, bar: tqdm,
                 encoder: Encoder) -> dict[str, Any]:
    t0 = time.perf_counter()
    with (out / f"{split}.bin").open("wb") as f:
        writer = _SplitWriter(f, tok, opts, dtype)
        try:
            for enc in encoder.map(_chunks(stories, CHUNK)):
                writer.add(enc)
                elapsed = max(time.perf_counter() - t0, 1e-9)
                bar.update(len(enc.lengths))
                bar.set_postfix(split=split, mb_s=f"{writer.n_bytes / 2**20 / elapsed:.1f}")
        except NotTextError as e:  # chunks come back in order: this one's first story is next
            story = writer.n_stories + e.text + 1
            raise ValueError(e.line(f"in story {story:,} of the {split} split, character "
                                    f"{e.at}")) from None
    if writer.n_stories == 0:
        raise ValueError(f"the {split} split has no stories (for a source without a validation "
                         "split, raise --val-fraction or add a file named *valid*)")
    if opts.layout == "padded":
        np.save(out / f"{split}.lengths.npy", writer.lengths())
    return writer.stats()


def check_out_dir(out: Path, tok: Tokenizer, overwrite: bool) -> None:
    """Refuse to replace what is not this tokenizer's prepared data (unless `overwrite`)."""
    if overwrite or not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; choose another --out")
    meta_file = out / META
    if not meta_file.is_file():
        if any(out.iterdir()):
            raise FileExistsError(f"{out} holds files that are not prepared data (no {META}); "
                                  "choose another --out or pass --overwrite to replace them")
        return
    try:
        old = json.loads(meta_file.read_text()).get("tokenizer_sha256")
    except (ValueError, AttributeError):
        old = None
    if old is None and (out / "tokenizer.json").is_file():  # data older than the hash
        try:
            old = Tokenizer.from_file(out / "tokenizer.json").sha256
        except ValueError:
            pass
    if old != tok.sha256:
        raise FileExistsError(f"{out} holds data prepared with another tokenizer (sha256 "
                              f"{str(old)[:12]}, this one {tok.sha256[:12]}); choose another "
                              "--out or pass --overwrite")


def _stderr(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def prepare_source(source: Source, tok: Tokenizer, out_dir: str | Path,
                   opts: PrepareOptions | None = None,
                   log: Callable[[str], None] = _stderr) -> dict[str, Any]:
    """Tokenize both splits of `source` into `out_dir`; returns the meta dict.

    `out_dir` is replaced when complete; it is refused (FileExistsError) when it holds data
    prepared with another tokenizer or other files, unless `opts.overwrite`, and (LockedError)
    while another process prepares it. Warnings (invalid UTF-8 replaced) go to `log`."""
    opts = opts or PrepareOptions()
    Path(out_dir).parent.mkdir(parents=True, exist_ok=True)
    with data_dir_lock(out_dir):  # one writer: a second prepare of out_dir is refused
        return _prepare_locked(source, tok, Path(out_dir), opts, log)


def _prepare_locked(source: Source, tok: Tokenizer, out_dir: Path, opts: PrepareOptions,
                    log: Callable[[str], None]) -> dict[str, Any]:
    check_out_dir(out_dir, tok, opts.overwrite)
    dtype = token_dtype(tok.vocab_size)
    num_proc = resolve_num_proc(opts.num_proc)
    with atomic_dir(out_dir) as tmp, Encoder(tok, dtype, num_proc) as encoder:
        splits: dict[str, Any] = {}
        hygiene: dict[str, Any] = {}
        with tqdm(desc="prepare", unit="story", unit_scale=True, dynamic_ncols=True,
                  mininterval=1.0) as bar:
            for split in SPLITS:
                clean = _Hygiene(opts)
                replaced = getattr(source, "replaced", {}).get(split, 0)
                no_text = getattr(source, "no_text", {}).get(split, 0)
                stories: Iterable[str] = clean(source.iter(split))
                count = opts.train_count if split == "train" else opts.val_count
                if count is not None:
                    stories = reservoir(stories, count, opts.seed)
                splits[split] = _write_split(stories, tok, tmp, split, opts, dtype, bar, encoder)
                replaced = getattr(source, "replaced", {}).get(split, 0) - replaced
                no_text = getattr(source, "no_text", {}).get(split, 0) - no_text
                hygiene[split] = clean.counts | {"replaced_bytes": replaced,
                                                 "no_text": no_text}
                if no_text:
                    log(f"warning: {no_text:,} records of the {split} split of {source.name} "
                        "have no text (null or blank); they were left out")
                if replaced:
                    log(f"warning: the {split} split of {source.name} has {replaced:,} bytes "
                        "that are not valid UTF-8; each was replaced by U+FFFD (convert the "
                        "source to UTF-8 to keep them)")
        meta = {
            "format": opts.layout, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
            "dtype": dtype.name, "tokenizer_sha256": tok.sha256, "source": source.name,
            "block_size": opts.block_size if opts.layout == "padded" else None,
            "fix_text": opts.fix_text, "dedupe": opts.dedupe, "hygiene": hygiene,
            "splits": splits,
        }
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        tok.save(tmp / "tokenizer.json")
    return meta


class _ListSource(Source):
    def __init__(self, splits: dict[str, list[str]], name: str):
        super().__init__(None)
        self.name = name
        self.lists = splits

    def iter(self, split: str) -> Iterator[str]:
        yield from self.lists.get(split, [])


def prepare(splits: dict[str, list[str]], tok: Tokenizer, out_dir: str | Path,
            source: str = "", opts: PrepareOptions | None = None) -> dict[str, Any]:
    """`prepare_source` for stories already in memory."""
    return prepare_source(_ListSource(splits, source), tok, out_dir, opts)


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / META
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: prepare the data first with `slms prepare`")
    meta = read_json(path, "; prepare the data again with `slms prepare`")
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is not a meta.json written by `slms prepare`; prepare the "
                         "data again")
    return meta
