"""A held-out split of one text file, in order: the last N stories are validation, the rest
training; a byte-level BPE is trained on the training part and both are prepared. Shared by
`benchmarks/quality.py` and `slms study`, so that their scores are on the same held-out text.
"""

from __future__ import annotations

from pathlib import Path


def split_text(path: Path, out: Path, val_stories: int, separator: str = "newline") -> Path:
    """out/text/train.txt and out/text/valid.txt (stories ended by <|endoftext|> lines): the
    stories of `path` (split by `separator`, as slms.data.sources.split_txt) in order, the last
    `val_stories` of them held out."""
    from slms.data.sources import split_txt

    stories = split_txt(path.read_text(encoding="utf-8"), separator)
    if not 0 < val_stories < len(stories):
        raise ValueError(f"{path} has {len(stories)} stories; cannot hold out {val_stories} "
                         "of them (choose fewer validation stories)")
    text = out / "text"
    text.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.txt", stories[:-val_stories]),
                       ("valid.txt", stories[-val_stories:])):
        (text / name).write_text("".join(f"{s}\n<|endoftext|>\n" for s in part))
    return text


def prepare_held_out(path: Path, out: Path, val_stories: int, vocab_size: int,
                     separator: str = "newline") -> Path:
    """The prepared data directory out/data of `split_text` (reused when already there)."""
    from slms.data.pipeline import train_tokenizer_on
    from slms.data.prepare import prepare_source
    from slms.data.sources import Source

    data = out / "data"
    if not (data / "meta.json").is_file():
        text = split_text(Path(path), Path(out), val_stories, separator)
        tok, _ = train_tokenizer_on(Source(str(text)), vocab_size)
        prepare_source(Source(str(text)), tok, data)
    return data
