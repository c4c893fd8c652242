"""Text sources: the embedded corpus, local .txt/.jsonl/.parquet files, directories and globs,
and Hugging Face hub datasets. Every source yields whole stories (documents) per split.

A SOURCE string is one of:
  - ``synthetic``: the embedded corpus (see `slms.corpus`);
  - a ``.txt`` file: stories separated by ``<|endoftext|>`` lines (TinyStories' own files;
    ``separator="eot"``), by blank lines (``blank-line``), or one story per line group with
    paragraphs separated by blank lines (``newline``: a single line break ends a story);
  - a ``.jsonl`` or ``.parquet`` file with a text field (``text`` unless told otherwise);
  - a directory or a glob of such files: files whose name contains ``val`` or ``valid`` form
    the validation split, the others the training split;
  - a Hugging Face dataset id (``roneneldan/TinyStories``), loaded with `datasets`
    (``streaming=True`` reads it without downloading it whole).
A source without a validation split gets one carved out: story i goes to validation when a
seeded hash of i falls below ``val_fraction``, so carving streams and is reproducible.
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slms import corpus
from slms.config import MAX_SEED
from slms.ranges import num

EOT_LINE = "<|endoftext|>"
SUFFIXES = (".txt", ".jsonl", ".parquet")
SEPARATORS = ("eot", "blank-line", "newline")
DEFAULT_VAL_FRACTION = 0.05
SPLITS = ("train", "val")


class SourceError(ValueError):
    """A source that cannot be read; the message says what to do."""


@dataclass(frozen=True)
class SourceOptions:
    separator: str = "eot"
    text_field: str = "text"
    streaming: bool = False
    val_fraction: float = num(DEFAULT_VAL_FRACTION, 0, 1, lo_open=True, hi_open=True)
    seed: int = num(0, 0, MAX_SEED)
    stories: int = corpus.DEFAULT_STORIES  # size of the embedded corpus

    def __post_init__(self) -> None:
        if self.separator not in SEPARATORS:
            raise SourceError(f"--separator must be one of {', '.join(SEPARATORS)}")
        if not 0 < self.val_fraction < 1:
            raise SourceError("--val-fraction must be between 0 and 1 (e.g. 0.05)")


# ---------------------------------------------------------------------------------------------
# reading files

# Local text files are decoded with errors="surrogateescape": each byte that is not valid UTF-8
# becomes one lone surrogate U+DC80..U+DCFF (valid UTF-8 never decodes to one), so the bytes a
# story lost can be counted before they are replaced with U+FFFD.
# A lone surrogate of another kind (a JSON escape such as \ud800) is no text either: it is
# replaced and counted the same way.
_ESCAPED = re.compile("[\ud800-\udfff]")


def replace_invalid(text: str) -> tuple[str, int]:
    """(text with each escaped invalid byte replaced by U+FFFD, number of bytes replaced)."""
    if text.isascii():
        return text, 0
    return _ESCAPED.subn("\ufffd", text)


def split_txt(text: str, separator: str = "eot") -> list[str]:
    """Split the text of a .txt source into stories."""
    return list(_iter_txt_lines(iter(text.splitlines(keepends=True)), separator))


def _iter_txt_lines(lines: Iterator[str], separator: str) -> Iterator[str]:
    buf: list[str] = []
    prev_blank = True
    for line in lines:
        bare = line.rstrip("\r\n")
        if separator == "eot":
            end = bare.strip() == EOT_LINE
        elif separator == "blank-line":
            end = not bare.strip()
        else:  # newline: a line that follows a non-blank line directly starts a new story
            end = False
            if bare.strip() and not prev_blank and buf:
                story = "".join(buf).strip()
                if story:
                    yield story
                buf = []
            prev_blank = not bare.strip()
        if end:
            story = "".join(buf).strip()
            if story:
                yield story
            buf = []
        else:
            buf.append(line)
    story = "".join(buf).strip()
    if story:
        yield story


def iter_file(path: Path, opts: SourceOptions) -> Iterator[str]:
    """The stories of one file; bytes that are not valid UTF-8 become U+FFFD; records without
    text are left out."""
    for story in iter_file_escaped(path, opts):
        if story is not None:
            yield replace_invalid(story)[0]


def iter_file_escaped(path: Path, opts: SourceOptions) -> Iterator[str | None]:
    """The stories of one file, invalid UTF-8 bytes kept as lone surrogates
    (`replace_invalid` counts and replaces them); None for each record of a .jsonl/.parquet
    file whose text is null or blank (the caller counts them). A record that is not an object,
    or a text that is neither a string nor null, is a SourceError that names the line (or the
    column's type): such a file is not a text source, and guessing would hide it."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        with path.open(encoding="utf-8", errors="surrogateescape", newline="") as f:
            yield from _iter_txt_lines(f, opts.separator)
    elif suffix == ".jsonl":
        yield from _iter_jsonl(path, opts.text_field)
    elif suffix == ".parquet":
        yield from _iter_parquet(path, opts.text_field)
    else:
        raise SourceError(f"{path}: unsupported file type (use {', '.join(SUFFIXES)})")


def _iter_jsonl(path: Path, field: str) -> Iterator[str | None]:
    with path.open(encoding="utf-8", errors="surrogateescape") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                raise SourceError(f"{path}:{n} is not valid JSON") from None
            if not isinstance(record, dict):
                raise SourceError(f"{path}:{n} is a JSON {_json_kind(record)}, not an object "
                                  f"with a '{field}' field (each line holds one record)")
            if field not in record:
                raise SourceError(f"{path}:{n} has no '{field}' field "
                                  "(choose one with --text-field)")
            yield record_text(record[field], f"{path}:{n}", field)


def _iter_parquet(path: Path, field: str) -> Iterator[str | None]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise SourceError("reading .parquet needs pyarrow: pip install 'slms[data]'") from None
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise SourceError(f"{path} is not a readable parquet file ({e})") from None
    schema = pf.schema_arrow
    if field not in schema.names:
        raise SourceError(f"{path} has no '{field}' column (choose one with --text-field)")
    tp = schema.field(field).type
    if not (pa.types.is_string(tp) or pa.types.is_large_string(tp) or pa.types.is_null(tp)
            or getattr(pa.types, "is_string_view", lambda t: False)(tp)):
        raise SourceError(f"{path}: column '{field}' holds {tp}, not text (choose the text "
                          "column with --text-field)")
    for batch in pf.iter_batches(batch_size=4096, columns=[field]):
        for text in batch.column(0).to_pylist():
            yield None if text is None else (text.strip() or None)


def record_text(value: object, where: str, field: str) -> str | None:
    """A record's text, stripped; None when it is null or blank; a SourceError naming `where`
    when it is another kind of value (a number, a list, ...)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise SourceError(f"{where}: '{field}' is a {_json_kind(value)}, not a string (choose "
                          "the text field with --text-field)")
    return value.strip() or None


def _json_kind(value: object) -> str:
    kinds = {bool: "boolean", int: "number", float: "number", str: "string", list: "list",
             dict: "object", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def _is_val_name(name: str) -> bool:
    name = name.lower()
    return "val" in name or "valid" in name


def in_val(i: int, opts: SourceOptions) -> bool:
    """Seeded, order-preserving carve-out: the i-th story of a source without a val split."""
    x = (i * 0x9E3779B97F4A7C15 + opts.seed * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)  # splitmix64 finaliser
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (x ^ (x >> 31)) / 2**64 < opts.val_fraction


# ---------------------------------------------------------------------------------------------
# sources


class Source:
    """A SOURCE resolved to files or a hub dataset; `iter(split)` streams that split's stories."""

    def __init__(self, source: str | None, opts: SourceOptions | None = None):
        self.name = source or "synthetic"
        self.opts = opts or SourceOptions()
        self.files: dict[str, list[Path]] = {}
        self.hub: str | None = None
        # bytes of invalid UTF-8 replaced with U+FFFD per split, summed over every `iter`
        self.replaced: dict[str, int] = dict.fromkeys(SPLITS, 0)
        # records (of .jsonl / .parquet files and hub datasets) whose text is null or blank,
        # left out, per split, summed over every `iter`
        self.no_text: dict[str, int] = dict.fromkeys(SPLITS, 0)
        if self.name == "synthetic":
            return
        path = Path(self.name)
        if path.is_file():
            self.files = {"train": [path], "val": []}
        elif path.is_dir() or glob.has_magic(self.name):
            found = (path.rglob("*") if path.is_dir() else map(Path, glob.glob(self.name,
                                                                                recursive=True)))
            files = sorted(p for p in found if p.is_file() and p.suffix.lower() in SUFFIXES)
            if not files:
                raise SourceError(f"{self.name} has no {', '.join(SUFFIXES)} files")
            self.files = {"train": [p for p in files if not _is_val_name(p.name)],
                          "val": [p for p in files if _is_val_name(p.name)]}
            if not self.files["train"]:
                raise SourceError(f"{self.name} has only validation files")
        elif path.suffix or self.name.startswith((".", "/", "~")) or self.name.count("/") != 1:
            raise SourceError(f"source '{self.name}' not found: give 'synthetic', a "
                              ".txt/.jsonl/.parquet file, a directory or glob of them, or a "
                              "hub dataset id like user/name")
        else:
            self.hub = self.name

    def iter(self, split: str) -> Iterator[str]:
        if self.name == "synthetic":
            yield from corpus.corpus_splits(self.opts.stories, self.opts.seed,
                                            self.opts.val_fraction)[split]
        elif self.hub is not None:
            yield from self._iter_hub(split)
        elif self.files["val"]:
            for p in self.files[split]:
                for story in self._texts(iter_file_escaped(p, self.opts), split):
                    yield self._replace_invalid(story, split)
        else:  # carve the validation split out of the training files
            want_val = split == "val"
            i = 0
            for p in self.files["train"]:
                for story in iter_file_escaped(p, self.opts):
                    if story is None:  # counted once, in the split of the files it is in
                        self.no_text["train"] += not want_val
                        continue
                    if in_val(i, self.opts) == want_val:
                        yield self._replace_invalid(story, split)
                    i += 1

    def _texts(self, stories: Iterator[str | None], split: str) -> Iterator[str]:
        """The stories, each record without text counted in `no_text[split]`."""
        for story in stories:
            if story is None:
                self.no_text[split] += 1
            else:
                yield story

    def _replace_invalid(self, story: str, split: str) -> str:
        story, n = replace_invalid(story)
        self.replaced[split] += n
        return story

    def _iter_hub(self, split: str) -> Iterator[str]:
        ds = self._hub_dataset()
        names = {"train": ("train",), "val": ("validation", "valid", "val")}[split]
        name = next((n for n in names if n in ds), None)
        if name is not None:
            yield from self._texts(self._hub_texts(ds[name], name), split)
            return
        if "train" not in ds:
            raise SourceError(f"dataset '{self.hub}' has no 'train' split")
        texts = self._hub_texts(ds["train"], "train")
        for i, text in enumerate(texts):  # no validation split: carve one
            if in_val(i, self.opts) == (split == "val"):
                if text is None:
                    self.no_text[split] += 1
                else:
                    yield text

    def _hub_texts(self, records: Any, name: str) -> Iterator[str | None]:
        field = self.opts.text_field
        for i, record in enumerate(records):
            if field not in record:
                raise SourceError(f"dataset '{self.hub}' has no '{field}' field in its {name} "
                                  "split (choose one with --text-field)")
            yield record_text(record[field], f"dataset '{self.hub}' {name}[{i}]", field)

    def _hub_dataset(self):
        try:
            import datasets
        except ImportError:
            raise SourceError(f"'{self.hub}' is not a local file or directory; loading it from "
                              "the Hugging Face hub needs `pip install 'slms[data]'`") from None
        try:
            return datasets.load_dataset(self.hub, streaming=self.opts.streaming)
        except Exception as e:  # network, unknown id, ...: one line for the user
            first = str(e).splitlines()[0] if str(e) else ""
            raise SourceError(f"could not load dataset '{self.hub}' from the hub: "
                              f"{type(e).__name__}: {first}") from None


def load_source(source: str | None, seed: int = 0, stories: int = corpus.DEFAULT_STORIES,
                val_fraction: float = DEFAULT_VAL_FRACTION, **options) -> dict[str, list[str]]:
    """Load a whole SOURCE into {'train': [...], 'val': [...]} (small sources; tests)."""
    opts = SourceOptions(seed=seed, stories=stories, val_fraction=val_fraction, **options)
    src = Source(source, opts)
    return {split: list(src.iter(split)) for split in SPLITS}

