"""A held-out split of one text file, in order: the last N stories are held out, the rest is
training text; shared by `benchmarks/quality.py` and `slms study`, so that their scores are on
the same held-out text.

Every directory written here is keyed by all the inputs that shape it (the file's path, size
and mtime, the held-out count, the separator, the vocabulary, the prefix size), so a changed
input never reuses another's data.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

STORY_END = "\n<|endoftext|>\n"  # how the files written here end each story


def input_key(**inputs: Any) -> str:
    """A short stable hash of `inputs` (JSON-able values)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]


def file_identity(path: Path) -> dict[str, Any]:
    """What names one version of a file: its resolved path, size and mtime."""
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def write_stories(path: Path, stories: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(s + STORY_END for s in stories), encoding="utf-8")
    tmp.replace(path)


def read_stories(path: Path) -> list[str]:
    """The stories of a file written by `write_stories`."""
    from slms.data.sources import split_txt

    return split_txt(path.read_text(encoding="utf-8"), "eot")


def split_text(path: Path, out: Path, val_stories: int, separator: str = "newline") -> Path:
    """A directory out/text-KEY with train.txt and valid.txt: the stories of `path` (split by
    `separator`, as slms.data.sources.split_txt) in order, the last `val_stories` of them in
    valid.txt. Written once per key (the inputs' hash)."""
    from slms.data.sources import split_txt

    path = Path(path)
    key = input_key(file=file_identity(path), val_stories=val_stories, separator=separator)
    text = Path(out) / f"text-{key}"
    if (text / "valid.txt").is_file():
        return text
    stories = split_txt(path.read_text(encoding="utf-8"), separator)
    if not 0 < val_stories < len(stories):
        raise ValueError(f"{path} has {len(stories)} stories; cannot hold out {val_stories} "
                         "of them (choose fewer validation stories)")
    write_stories(text / "train.txt", stories[:-val_stories])
    write_stories(text / "valid.txt", stories[-val_stories:])  # last: it marks the dir done
    return text


def training_prefix(train_txt: Path, out: Path, megabytes: float) -> tuple[Path, int]:
    """(file, stories): the first stories of `train_txt` (a `split_text` train.txt) whose
    UTF-8 text, separators excluded, reaches `megabytes` (all of them if it is shorter), as
    out/prefix-KEY/train.txt."""
    key = input_key(file=file_identity(train_txt), megabytes=megabytes)
    target = Path(out) / f"prefix-{key}" / "train.txt"
    stories = read_stories(train_txt)
    size, n = 0, 0
    while n < len(stories) and size < megabytes * 1e6:
        size += len(stories[n].encode("utf-8"))
        n += 1
    if not target.is_file():
        write_stories(target, stories[:n])
    return target, n


def prepare_held_out(path: Path, out: Path, val_stories: int, vocab_size: int,
                     separator: str = "newline") -> Path:
    """A prepared data directory of `split_text`'s two parts (train and its held-out valid
    split; a byte-level BPE trained on the train part), out/data-KEY, reused only when every
    input is the same."""
    from slms.data.pipeline import train_tokenizer_on
    from slms.data.prepare import META, prepare_source
    from slms.data.sources import Source

    text = split_text(Path(path), Path(out), val_stories, separator)
    key = input_key(file=file_identity(Path(path)), val_stories=val_stories,
                    separator=separator, vocab_size=vocab_size)
    data = Path(out) / f"data-{key}"
    if not (data / META).is_file():
        tok, _ = train_tokenizer_on(Source(str(text)), vocab_size)
        prepare_source(Source(str(text)), tok, data)
    return data
