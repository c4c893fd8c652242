"""Conversations -> a prepared directory of rows with a loss mask, as `PackedData` reads them.

The padded layout of `slms.data.prepare` (rows of block_size + 1 ids, DIR/{split}.lengths.npy
with each row's real length, pads excluded from every loss), plus DIR/{split}.scored.npy: per
row position, whether that id is a target of the loss (an assistant's content and its closing
<|im_end|>). With `pack`, consecutive conversations share a row while they fit: each begins with
<|endoftext|>, where the document mask starts a new document, so none attends to another (a
model without the document mask gets one conversation per row). A conversation longer than a
row is skipped and counted. The directory is written to a temporary one moved into place when
complete, so an error leaves nothing half written.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from slms.data.prepare import META, token_dtype
from slms.data.sources import SPLITS
from slms.fsutil import atomic_dir
from slms.instruct.sources import ChatSource
from slms.instruct.template import render, require_chat_tokens
from slms.tokenizer import Tokenizer

LOSS_MASK = "assistant"  # meta.json's loss_mask: which targets the rows' scored.npy keeps


def pack_rows(convs: Iterable[tuple[list[int], list[bool]]], width: int, pad_id: int,
              pack: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids (R, width), scored (R, width) bool, lengths (R,)) from rendered conversations, each
    no longer than `width`; in order, several to a row when `pack`."""
    rows: list[tuple[list[int], list[bool]]] = []
    for ids, scored in convs:
        if pack and rows and len(rows[-1][0]) + len(ids) <= width:
            rows[-1][0].extend(ids)
            rows[-1][1].extend(scored)
        else:
            rows.append((list(ids), list(scored)))
    out = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=bool)
    lengths = np.zeros(len(rows), dtype=np.uint32)
    for r, (ids, scored) in enumerate(rows):
        out[r, :len(ids)] = ids
        mask[r, :len(ids)] = scored
        lengths[r] = len(ids)
    return out, mask, lengths


def prepare_chat(source: ChatSource, tok: Tokenizer, out_dir: str | Path, block_size: int,
                 pack: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Render, pack and write both splits of `source` into `out_dir`; returns meta.json's dict.
    Errors in the source (one line each) leave `out_dir` as it was."""
    require_chat_tokens(tok)
    width = block_size + 1
    dtype = token_dtype(tok.vocab_size)
    table = np.asarray(tok.token_bytes())
    splits: dict[str, Any] = {}
    with atomic_dir(out_dir) as tmp:
        for split in SPLITS:
            convs, too_long = [], 0
            for messages in source.iter(split):
                ids, scored = render(tok, messages)
                if len(ids) > width:
                    too_long += 1
                    continue
                if any(scored):
                    convs.append((ids, scored))
            if not convs:
                raise ValueError(f"the {split} split of {source.name} has no conversation that "
                                 f"fits the context of {block_size} tokens ({too_long} longer "
                                 "ones skipped); give more data or shorter conversations")
            ids, scored, lengths = pack_rows(convs, width, tok.eos_id, pack)
            ids.astype(dtype).tofile(tmp / f"{split}.bin")
            np.save(tmp / f"{split}.lengths.npy", lengths)
            np.save(tmp / f"{split}.scored.npy", scored)
            n_tokens = int(lengths.sum())
            splits[split] = {
                "rows": len(ids), "stories": len(convs), "conversations": len(convs),
                "tokens": n_tokens, "real_tokens": n_tokens, "scored_tokens": int(scored.sum()),
                "scored_bytes": int(table[ids[scored]].sum()),
                "bytes": int(table[ids].sum()),  # pads are <|endoftext|>: 0 bytes
                "skipped_too_long": too_long, "skipped_unreadable": source.skipped[split],
                "padded_positions": len(ids) * width}
            if too_long or source.skipped[split]:
                log(f"{split}: skipped {too_long} conversations longer than the context of "
                    f"{block_size} tokens and {source.skipped[split]} entries without a story")
        meta = {"format": "padded", "loss_mask": LOSS_MASK, "packed": pack,
                "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "dtype": dtype.name,
                "tokenizer_sha256": tok.sha256, "source": source.name, "block_size": block_size,
                "splits": splits}
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        tok.save(tmp / "tokenizer.json")
    return meta
