"""Batches from packed token streams.

Training batches are a pure function of (seed, step, rank, micro-step): resuming at step s
reproduces the same batches without saving loader state. Evaluation walks the whole split in
order, so its loss is deterministic and every token after the first is scored exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from slms.config import MAX_BLOCK_SIZE, MAX_VOCAB_SIZE
from slms.constants import IGNORE_INDEX
from slms.data.prepare import META, read_meta
from slms.tokenizer import Tokenizer


class PackedData:
    """A prepared data directory: memory-mapped token streams (or padded rows) and meta.json."""

    def __init__(self, data_dir: str | Path):
        self.dir = Path(data_dir)
        self.meta = read_meta(self.dir)
        check_meta(self.dir, self.meta)
        self.padded = self.meta.get("format") == "padded"
        dtype = np.dtype(self.meta["dtype"])
        self._perm_key: tuple[int, int] | None = None
        self._perm = np.empty(0, dtype=np.int64)
        self.splits: dict[str, np.ndarray] = {}
        self.lengths: dict[str, np.ndarray] = {}
        # fine-tuning rows (slms.instruct.prepare): which row positions are loss targets
        self.scored: dict[str, np.ndarray] = {}
        for split in ("train", "val"):
            path = self.dir / f"{split}.bin"
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: prepare the data with `slms prepare`")
            row = dtype.itemsize * (self.meta["block_size"] + 1 if self.padded else 1)
            size = path.stat().st_size
            if size == 0 or size % row:
                raise ValueError(f"{path} holds {size:,} bytes, not a whole number of "
                                 f"{'rows' if self.padded else 'token ids'} of {row} bytes: it "
                                 "is truncated or damaged; prepare the data again")
            check_count(path, size // row, self.meta, split)
            data = np.memmap(path, dtype=dtype, mode="r")
            if self.padded:
                data = data.reshape(-1, self.meta["block_size"] + 1)
                self.lengths[split] = np.load(self.dir / f"{split}.lengths.npy")
                if self.meta.get("loss_mask"):
                    self.scored[split] = np.load(self.dir / f"{split}.scored.npy",
                                                 mmap_mode="r")
            self.splits[split] = data

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def train_tokens(self) -> int:
        """The training split's tokens, as meta.json counts them (pads excluded)."""
        return int(self.meta["splits"]["train"]["tokens"])

    def tokens(self, split: str) -> np.ndarray:
        """The packed token stream of a split (packed layout)."""
        if self.padded:
            raise ValueError(f"{self.dir} holds padded rows, not a token stream")
        return self.splits[split]

    def train_batch(self, batch_size: int, block_size: int, seed: int, step: int,
                    rank: int = 0, micro: int = 0, micro_per_step: int = 1
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) windows of `block_size` tokens at seeded random offsets; y is x shifted by one.
        Packed windows are drawn with replacement: an "epoch" of them is a token budget, not an
        exact pass.

        Padded layout: real passes over the rows, each in its own seeded order; micro-batch
        `micro` of `micro_per_step` per step takes the next `batch_size` rows. Targets past a
        story's end are IGNORE_INDEX."""
        data = self.splits["train"]
        if self.padded:
            return self.train_rows(batch_size, block_size, seed, step, micro, micro_per_step)[:2]
        rng = np.random.default_rng([seed, step, rank, micro])
        if len(data) < block_size + 1:
            raise ValueError(f"training split has {len(data)} tokens, fewer than block_size+1 "
                             f"({block_size + 1}); use a smaller model.block_size or more data")
        starts = rng.integers(0, len(data) - block_size, size=batch_size)
        return self._checked(windows(data, starts, block_size), "train")

    def _checked(self, xy: tuple[torch.Tensor, torch.Tensor], split: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch whose ids are all below vocab_size (a damaged file holds others; the model's
        embedding would fail on them with an IndexError): checked per batch, which costs a
        max over it, not a pass over the whole file."""
        top = int(xy[0].max()) if xy[0].numel() else 0
        if top >= self.vocab_size:
            raise ValueError(f"{self.dir / f'{split}.bin'} holds token id {top:,}, beyond the "
                             f"{self.vocab_size:,}-token vocab of {META}: the file is damaged; "
                             "prepare the data again")
        return xy

    def train_rows(self, batch_size: int, block_size: int, seed: int, step: int, micro: int = 0,
                   micro_per_step: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The padded layout's (x, y, real) of `train_batch`; real (B, T) bool marks the inputs
        whose target is a real token (each row's real positions, then pads). With a loss mask
        real and scored differ: a user's tokens are real inputs with no target."""
        first = ((step * micro_per_step + micro) * batch_size)
        rows = self._pass_rows(seed, first, batch_size)
        x, y = self._rows(rows, "train", block_size)
        n_targets = torch.from_numpy(self.lengths["train"][rows].astype(np.int64)) - 1
        return x, y, torch.arange(block_size)[None, :] < n_targets[:, None]

    def _pass_rows(self, seed: int, first: int, n: int) -> np.ndarray:
        """Rows first .. first+n-1 of the sequence of passes over the training rows (pass p in
        the order of a permutation seeded by (seed, p))."""
        n_rows = len(self.splits["train"])
        i = np.arange(first, first + n)
        out = np.empty(n, dtype=np.int64)
        for p in np.unique(i // n_rows):
            here = i // n_rows == p
            out[here] = self._permutation(seed, int(p), n_rows)[i[here] % n_rows]
        return out

    def _permutation(self, seed: int, p: int, n_rows: int) -> np.ndarray:
        if self._perm_key != (seed, p):  # one pass's order, kept while its rows are drawn
            self._perm = np.random.default_rng([seed, p]).permutation(n_rows)
            self._perm_key = (seed, p)
        return self._perm

    def scored_bytes(self, split: str) -> int:
        """UTF-8 bytes of the text that evaluation scores, for bits per byte: the split's bytes
        (packed: every token but the split's first is scored, a difference of a few bytes), or
        in the padded layout those of the kept tokens (a truncated story's tail is not
        scored). Prepared data without that count gets it from the rows and tokenizer.json."""
        stats = self.meta["splits"][split]
        if not self.padded:
            return int(stats["bytes"])
        if "scored_bytes" not in stats:
            stats["scored_bytes"] = self._count_scored_bytes(split)
        return int(stats["scored_bytes"])

    def _count_scored_bytes(self, split: str) -> int:
        table = np.asarray(Tokenizer.from_file(self.dir / "tokenizer.json").token_bytes())
        rows, lengths = self.splits[split], self.lengths[split]
        total = 0
        for a in range(0, len(rows), 1024):
            r = np.asarray(rows[a:a + 1024], dtype=np.int64)
            kept = np.arange(1, r.shape[1])[None, :] < lengths[a:a + 1024, None]
            total += int(table[r[:, 1:]][kept].sum())
        return total

    def _rows(self, rows: np.ndarray, split: str, block_size: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        width = self.splits[split].shape[1]
        if block_size != width - 1:
            raise ValueError(f"{self.dir} holds rows of {width - 1} tokens + 1; set "
                             f"model.block_size={width - 1} or prepare again with --block-size")
        t = torch.from_numpy(np.asarray(self.splits[split][rows], dtype=np.int64))
        x, y = t[:, :-1].clone(), t[:, 1:].clone()
        n_targets = torch.from_numpy(self.lengths[split][rows].astype(np.int64)) - 1
        y[torch.arange(block_size)[None, :] >= n_targets[:, None]] = IGNORE_INDEX
        if split in self.scored:  # targets outside the assistant's turns are not scored
            scored = torch.from_numpy(np.asarray(self.scored[split][rows][:, 1:], dtype=bool))
            y[~scored] = IGNORE_INDEX
        return self._checked((x, y), split)

    def eval_batches(self, batch_size: int, block_size: int, split: str = "val"
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches covering the whole split in order; every real target is scored exactly once
        and no pad is (the short tail window and pad positions have IGNORE_INDEX targets)."""
        if not self.padded:
            for xy in eval_windows(self.splits[split], batch_size, block_size):
                yield self._checked(xy, split)
            return
        n = len(self.splits[split])
        for start in range(0, n, batch_size):
            yield self._rows(np.arange(start, min(start + batch_size, n)), split, block_size)


def check_meta(data_dir: Path, meta: dict) -> None:
    """meta.json's vocab size, token dtype and row width must be sane and agree with each
    other and with the directory's tokenizer.json, before anything is sized from them."""
    where = f"{data_dir / META}"
    fix = "prepare the data again with `slms prepare`"

    def whole(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    vocab = meta.get("vocab_size")
    if not whole(vocab) or not 1 <= vocab <= MAX_VOCAB_SIZE:
        raise ValueError(f"{where}: vocab_size {vocab!r} is not a vocab size between 1 and "
                         f"{MAX_VOCAB_SIZE:,}; {fix}")
    dtype = meta.get("dtype")
    if dtype not in ("uint16", "uint32"):
        raise ValueError(f"{where}: dtype {dtype!r} must be uint16 or uint32; {fix}")
    if vocab > np.iinfo(dtype).max + 1:
        raise ValueError(f"{where}: vocab_size {vocab:,} does not fit its {dtype} token ids; "
                         f"{fix}")
    eos = meta.get("eos_id")
    if eos is not None and (not whole(eos) or not 0 <= eos < vocab):
        raise ValueError(f"{where}: eos_id {eos!r} is not a token id below vocab_size "
                         f"{vocab:,}; {fix}")
    if meta.get("format") not in (None, "packed", "padded"):
        raise ValueError(f"{where}: format {meta.get('format')!r} must be packed or padded; "
                         f"{fix}")
    block = meta.get("block_size")
    if meta.get("format") == "padded" and (not whole(block) or not 1 <= block <= MAX_BLOCK_SIZE):
        raise ValueError(f"{where}: block_size {block!r} must be between 1 and "
                         f"{MAX_BLOCK_SIZE:,} for padded rows; {fix}")
    splits = meta.get("splits")
    if not isinstance(splits, dict) or not all(isinstance(splits.get(k), dict)
                                               for k in ("train", "val")):
        raise ValueError(f"{where} has no train and val split counts; {fix}")
    tok_file = data_dir / "tokenizer.json"
    if tok_file.is_file():
        n = Tokenizer.from_file(tok_file).vocab_size
        if n != vocab:
            raise ValueError(f"{where} says vocab_size {vocab:,} but {tok_file} has {n:,} "
                             f"tokens: they were not prepared together; {fix}")


def check_count(path: Path, found: int, meta: dict, split: str) -> None:
    """The ids (packed) or rows (padded) of a split's file must be as many as meta.json counts:
    a file cut at a whole id, or a meta.json whose dtype is not the file's, is refused rather
    than read as other data (data prepared before the counts were recorded is not checked)."""
    padded = meta.get("format") == "padded"
    unit = "rows" if padded else "token ids"
    expected = meta["splits"][split].get("rows" if padded else "tokens")
    if isinstance(expected, int) and not isinstance(expected, bool) and found != expected:
        raise ValueError(f"{path} holds {found:,} {unit} of {meta['dtype']} but {META} counts "
                         f"{expected:,}: the file is truncated or damaged, or {META} is not "
                         "its own; prepare the data again")


def windows(data: np.ndarray, starts: np.ndarray, block_size: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    chunks = np.stack([np.asarray(data[s:s + block_size + 1], dtype=np.int64) for s in starts])
    t = torch.from_numpy(chunks)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def eval_windows(data: np.ndarray, batch_size: int, block_size: int
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    n_targets = len(data) - 1
    starts = list(range(0, n_targets, block_size))
    for i in range(0, len(starts), batch_size):
        group = starts[i:i + batch_size]
        x = torch.zeros(len(group), block_size, dtype=torch.long)
        y = torch.full((len(group), block_size), IGNORE_INDEX, dtype=torch.long)
        for row, s in enumerate(group):
            chunk = torch.from_numpy(np.asarray(data[s:s + block_size + 1], dtype=np.int64))
            n = len(chunk) - 1
            x[row, :n] = chunk[:-1]
            y[row, :n] = chunk[1:]
        yield x, y
