"""From a source to a tokenizer and a prepared data directory, building and caching what is missing.

`data.path` may be a prepared directory (meta.json + .bin files), any SOURCE that
`slms.data.sources` reads, or absent: then the embedded corpus is generated, a tokenizer is
trained on it, and both are prepared into a cache keyed by everything that shapes the result
(local files by their size and mtime too, so an edited file is prepared again).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from slms.config import DataConfig
from slms.data.prepare import META, prepare_source
from slms.data.sources import Source, SourceError, SourceOptions
from slms.tokenizer import Tokenizer, train_tokenizer

HELD_OUT_STORIES = 1000  # validation stories used to report a tokenizer's bytes per token


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / META).is_file()


def byte_sample(stories: Iterator[str], max_bytes: int, seed: int) -> list[str]:
    """A seeded uniform sample of about `max_bytes` of stories from a stream.

    The first `max_bytes` of stories size the reservoir (stories of average length); the rest of
    the stream then competes for its slots, so memory stays near `max_bytes`."""
    head: list[str] = []
    size = 0
    for s in stories:
        head.append(s)
        size += len(s.encode("utf-8"))
        if size >= max_bytes:
            break
    k = len(head)
    rng = random.Random(seed)
    for i, s in enumerate(stories, start=k):
        j = rng.randint(0, i)
        if j < k:
            head[j] = s
    return head


def train_tokenizer_on(source: Source, vocab_size: int, max_train_bytes: int | None = None
                       ) -> tuple[Tokenizer, dict[str, Any]]:
    """Train a byte-level BPE on the training split (or a seeded sample of it); report bytes
    per token on held-out validation stories."""
    stories: Iterator[str] | list[str] = source.iter("train")
    if max_train_bytes:
        stories = byte_sample(stories, max_train_bytes, source.opts.seed)
    seen = [0]
    tok = train_tokenizer(_counted(stories, seen), vocab_size=vocab_size)
    if not seen[0]:
        raise SourceError(f"{source.name} has no stories to train a tokenizer on (its train "
                          "split is empty: is it the right file, separator and --text-field?)")
    held_out = list(itertools.islice(source.iter("val"), HELD_OUT_STORIES))
    n_bytes = sum(len(s.encode("utf-8")) for s in held_out)
    n_tokens = sum(len(ids) for ids in tok.encode_batch(held_out)) if held_out else 0
    return tok, {"held_out_stories": len(held_out),
                 "bytes_per_token": n_bytes / n_tokens if n_tokens else float("nan")}


def _counted(stories: Iterable[str], seen: list[int]) -> Iterator[str]:
    for s in stories:
        seen[0] += 1
        yield s


def files_fingerprint(files: list[Path]) -> list[list[Any]]:
    """[absolute path, size, mtime_ns] of each file, sorted: it changes when a file is edited,
    added or removed, without reading the files."""
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return sorted(out)


def source_fingerprint(source: Source) -> list[list[Any]] | None:
    """The content key of a local source (the files it reads); None for the embedded corpus and
    hub datasets, whose keys stay their names."""
    files = [f for split in ("train", "val") for f in source.files.get(split, [])]
    return files_fingerprint(files) if files else None


def resolve_data(cfg: DataConfig, seed: int = 0, log=print) -> Path:
    """A prepared data directory for `cfg` (prepared into the cache when needed)."""
    if cfg.path is not None and is_prepared(cfg.path):
        return Path(cfg.path)
    name = cfg.path or "synthetic"
    source = Source(name, SourceOptions(seed=seed, stories=cfg.stories))
    key: dict[str, Any] = {
        "source": str(Path(name).resolve()) if Path(name).exists() else name,
        "stories": cfg.stories if name == "synthetic" else None, "seed": seed,
        "vocab_size": cfg.vocab_size, "tokenizer": cfg.tokenizer}
    content = source_fingerprint(source)
    if content is not None:  # only local sources: hub / synthetic caches keep their keys
        key["content"] = content
    if cfg.tokenizer is not None and Path(cfg.tokenizer).is_file():
        key["tokenizer_file"] = files_fingerprint([Path(cfg.tokenizer)])
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    out = Path(cfg.cache_dir) / f"{Path(name).name}-{digest}"
    if is_prepared(out):
        log(f"reusing prepared data in {out} (same source and tokenizer)")
        return out
    log(f"preparing data from {name} into {out} ...")
    if cfg.tokenizer is not None:
        tok = Tokenizer.from_file(cfg.tokenizer)
    else:
        log(f"training a {cfg.vocab_size}-token byte-level BPE on {name}")
        tok, _ = train_tokenizer_on(source, cfg.vocab_size)
    prepare_source(source, tok, out)
    return out
