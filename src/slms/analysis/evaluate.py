"""Evaluation over a whole split: loss in nats per token, perplexity, bits per byte."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from slms.data.loader import PackedData
from slms.data.prepare import META, read_meta
from slms.dist import Dist
from slms.model import GPT, IGNORE_INDEX, eval_mode, pads_at_end
from slms.rundir import RunDir
from slms.tokenizer import Tokenizer


@torch.no_grad()
def evaluate_batches(model: GPT, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     device: torch.device, autocast: AbstractContextManager | None = None,
                     shard: tuple[int, int] = (0, 1)) -> tuple[float, int]:
    """(summed nats, number of real targets) over (x, y) batches; IGNORE_INDEX targets (pads,
    the short tail window) are not scored.

    shard=(rank, world): this process scores batches rank, rank + world, ...; every process
    runs the same number of forwards (one unscored extra where the batches do not divide
    evenly), as FSDP's collectives need.
    """
    rank, world = shard
    with eval_mode(model):
        total = torch.zeros((), dtype=torch.float64, device=device)
        count, mine, seen, spare = 0, 0, 0, None
        for i, (x, y) in enumerate(batches):
            seen = i + 1
            spare = x if spare is None else spare
            if i % world != rank:
                continue
            mine += 1
            x, y = x.to(device), y.to(device)
            with autocast or nullcontext():
                logits = model(x, real_BT=pad_mask(y)).logits
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(),
                                     ignore_index=IGNORE_INDEX, reduction="sum").double()
            count += int((y != IGNORE_INDEX).sum())
        if spare is not None and mine < -(-seen // world):
            with autocast or nullcontext():
                model(spare.to(device))
    return float(total), count


def pad_mask(y_BT: torch.Tensor) -> torch.Tensor | None:
    """real_BT for rows whose unscored targets are a tail of pads (padded rows, the short last
    window): pads then skip the MoE experts and statistics. None when every target is scored
    or the unscored ones are not a tail (nothing to skip then)."""
    real_BT = y_BT != IGNORE_INDEX
    if bool(real_BT.all()) or not pads_at_end(real_BT):
        return None
    return real_BT


def evaluate(model: GPT, data: PackedData, split: str = "val", batch_size: int = 16,
             block_size: int | None = None, device: torch.device | str = "cpu",
             autocast: AbstractContextManager | None = None, dist: Dist | None = None
             ) -> dict[str, Any]:
    """Loss (nats/token), perplexity and bits per byte over the whole split.

    Bits per byte divides the summed nats by ln 2 and by the UTF-8 bytes of the text scored
    (`PackedData.scored_bytes`), so it compares models with different tokenizers. With `dist`,
    the ranks share the batches and sum their results: every rank returns the same figures.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    block_size = block_size or model.cfg.block_size
    shard = (dist.rank, dist.world) if dist is not None else (0, 1)
    nats, n = evaluate_batches(model, data.eval_batches(batch_size, block_size, split),
                               torch.device(device), autocast, shard)
    if dist is not None:
        nats, n = dist.sum([nats, float(n)], torch.device(device))
        n = round(n)
    loss = nats / max(n, 1)
    n_bytes = data.scored_bytes(split)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": n,
            "bits_per_byte": nats / math.log(2) / n_bytes if n_bytes else float("nan")}


def unigram_loss(data: PackedData, split: str = "val") -> float:
    """Cross entropy (nats/token) of the training split's unigram distribution on `split`
    (targets only, add-one smoothing): the floor a model must clearly beat."""
    V = data.vocab_size
    counts = np.bincount(np.asarray(data.tokens("train")), minlength=V).astype(np.float64) + 1
    logp = np.log(counts / counts.sum())
    targets = np.asarray(data.tokens(split))[1:]
    return float(-logp[targets].mean())


# ---------------------------------------------------------------------------------------------
# `slms eval`: a checkpoint scored on a prepared directory or on any source


def find_run_data(path: str | Path) -> Path | None:
    """The prepared data directory a run trained on (from its run_config.json), if it exists.

    `path` may be the run directory or one of its checkpoint directories."""
    run = RunDir.containing(path)
    data_dir = run.data_dir() if run is not None else None
    return data_dir if data_dir is not None and (data_dir / META).is_file() else None


def prepare_for(source: str, tokenizer: Tokenizer, cache_dir: str | Path = ".cache/slms",
                seed: int = 0, log=None) -> Path:
    """A prepared data directory for `source` tokenized with `tokenizer` (cached by both, and
    a local source by its files' sizes and mtimes, so an edited file is prepared again).

    `log` defaults to stderr: `slms eval --json` prints its result on stdout."""
    import sys

    from slms.data.pipeline import source_fingerprint
    from slms.data.prepare import prepare_source
    from slms.data.sources import Source, SourceOptions

    log = log or (lambda msg: print(msg, file=sys.stderr))
    src_obj = Source(source, SourceOptions(seed=seed))
    src = str(Path(source).resolve()) if Path(source).exists() else source
    content = source_fingerprint(src_obj)
    text = f"{src}\n{tokenizer.sha256}\n{seed}"
    if content is not None:  # hub ids keep their old keys (and caches)
        text += "\n" + json.dumps(content)
    key = hashlib.sha256(text.encode()).hexdigest()[:12]
    out = Path(cache_dir) / f"eval-{Path(source).name or 'source'}-{key}"
    if (out / META).is_file():
        log(f"reusing prepared data in {out} (same source and tokenizer)")
    else:
        prepare_source(src_obj, tokenizer, out)
    return out


def eval_data_dir(checkpoint: str | Path, tokenizer: Tokenizer, data: str | None,
                  cache_dir: str | Path = ".cache/slms") -> Path:
    """The prepared directory to score: `data` if prepared, else `data` prepared as a source
    with the checkpoint's tokenizer, else the run's own data directory."""
    if data is None:
        found = find_run_data(checkpoint)
        if found is None:
            raise FileNotFoundError(f"no data directory recorded for {checkpoint}; "
                                    "pass --data DIR_OR_SOURCE")
        return found
    if (Path(data) / META).is_file():
        meta = read_meta(data)  # a damaged meta.json: one line naming it
        if meta.get("tokenizer_sha256") not in (None, tokenizer.sha256):
            raise ValueError(f"{data} was prepared with another tokenizer than the checkpoint's; "
                             "pass the text source instead so it is tokenized again")
        return Path(data)
    return prepare_for(data, tokenizer, cache_dir)


def eval_checkpoint(checkpoint: str | Path, data: str | None = None, split: str = "val",
                    batch_size: int = 8, device: str = "cpu",
                    cache_dir: str | Path = ".cache/slms") -> dict[str, Any]:
    """Loss, perplexity and bits per byte of a run / checkpoint over a whole split."""
    import slms

    if split not in ("train", "val"):
        raise ValueError(f"--split must be train or val, not {split!r}")
    model, tok = slms.load(checkpoint, device=device)
    data_dir = eval_data_dir(checkpoint, tok, data, cache_dir)
    packed = PackedData(data_dir)
    if packed.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"{data_dir} has a {packed.vocab_size}-token vocab but the model has "
                         f"{model.cfg.vocab_size}")
    out = evaluate(model, packed, split, batch_size=batch_size, device=device)
    return {"checkpoint": str(checkpoint), "data": str(data_dir), "split": split,
            "bytes": packed.scored_bytes(split), **out}
