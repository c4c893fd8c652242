"""`slms finetune`: the trainer of `slms train`, started from a base checkpoint, on conversations
whose loss counts only the assistant's tokens.

The fine-tune is an ordinary run: train.init_from names the base checkpoint, data.path the
prepared conversations (`slms.instruct.prepare`, cached by source, tokenizer, context and
packing), and the fine-tuning defaults below suit a few thousand conversations. Everything of
`slms train` holds: best/ on the validation conversations, exact resume (`slms finetune
--resume RUN` or `slms train --resume RUN`), MoE expert metrics, dotted overrides.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from slms.checkpoint import load_checkpoint
from slms.config import RunConfig, run_config_from_dict
from slms.data.prepare import META
from slms.instruct.corpus import DEFAULT_CONVERSATIONS
from slms.instruct.prepare import prepare_chat
from slms.instruct.sources import ChatSource
from slms.rundir import RunDir, resolve
from slms.train.trainer import train

# Small data: a few passes at the base run's own learning rates (they honoured 86% of the
# held-out requests where 0.3x of them honoured 77%: docs/instruct.md, one seed each), a short
# warm-up and frequent evaluation (best/ keeps the best validation loss, so extra epochs cannot
# hurt it).
FINETUNE_TRAIN = {"epochs": 2.0, "warmup_steps": 20, "min_lr_ratio": 0.1, "schedule": "cosine",
                  "eval_every": 50, "checkpoint_every": 100, "log_every": 25}


def base_config(base: str | Path) -> tuple[Path, dict[str, Any]]:
    """(the base checkpoint, the config dict the fine-tune starts from): the base run's
    resolved config when there is one, else the checkpoint's model config with default
    training settings."""
    ckpt = resolve(base)
    run = RunDir.containing(ckpt)
    data: dict[str, Any] = {}
    if run is not None and run.config_file.is_file():
        data = {k: v for k, v in run.read_config().items() if k != "data_dir"}
    if not data:
        model, _, _ = load_checkpoint(ckpt)
        data = {"name": "finetune", "model": dataclasses.asdict(model.cfg)}
    return ckpt, data


def finetune_config(base: str | Path, data_dir: Path | None, overrides: list[str]
                    ) -> tuple[RunConfig, Path]:
    """The fine-tune's RunConfig (before its data is prepared when `data_dir` is None)."""
    ckpt, data = base_config(base)
    tr = dict(data.get("train", {}))
    tr.pop("max_minutes", None)
    tr.update(FINETUNE_TRAIN, init_from=str(ckpt.resolve()), init_step=0, init_total=0,
              resume="never")
    if any(o.startswith(("train.max_steps=", "train.max_minutes=")) for o in overrides):
        tr["epochs"] = 0.0  # a step count or time budget asked for replaces the epochs
    data["train"] = tr
    data["name"] = f"{data.get('name', 'run')}-finetune"
    data["data"] = {**data.get("data", {}), "path": str(data_dir) if data_dir else None}
    return run_config_from_dict(data, overrides), ckpt


def chat_data(source: str, base: Path, cfg: RunConfig, conversations: int, log=print) -> Path:
    """The prepared conversations of `source` for the base's tokenizer and context (cached)."""
    _, tok, _ = load_checkpoint(base)
    pack = cfg.model.document_mask  # without the mask, packed conversations would see each other
    src = Path(source)
    key = {"source": str(src.resolve()) if src.exists() else source, "seed": cfg.data.seed,
           "conversations": conversations if source == "synthetic" else None,
           "tokenizer": tok.sha256, "block_size": cfg.model.block_size, "pack": pack}
    if src.is_file():
        st = src.stat()
        key["content"] = [st.st_size, st.st_mtime_ns]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    out = Path(cfg.data.cache_dir) / f"chat-{src.name}-{digest}"
    if (out / META).is_file():
        log(f"reusing prepared conversations in {out}")
        return out
    log(f"preparing conversations from {source} into {out} ...")
    meta = prepare_chat(ChatSource(source, cfg.data.seed, conversations), tok, out,
                        cfg.model.block_size, pack, log)
    for split, s in meta["splits"].items():
        log(f"{split}: {s['conversations']:,} conversations in {s['rows']:,} rows, "
            f"{s['scored_tokens']:,} of {s['tokens']:,} tokens scored (the assistant's)")
    return out


def finetune(base: str | Path, source: str = "synthetic", out: str | Path | None = None,
             overrides: list[str] | None = None, conversations: int = DEFAULT_CONVERSATIONS,
             log=print) -> Path:
    """Fine-tune the checkpoint (or run) `base` on the conversations of `source`; returns the
    run directory."""
    overrides = overrides or []
    cfg, ckpt = finetune_config(base, None, overrides)  # bad overrides fail before any work
    data_dir = chat_data(source, ckpt, cfg, conversations, log)
    cfg, ckpt = finetune_config(base, data_dir, overrides)
    return train(cfg, out_dir=out, log=log)


def resume_finetune(run_dir: str | Path, overrides: list[str] | None = None, log=print) -> Path:
    """Continue a fine-tune from its newest checkpoint (as `slms train --resume`)."""
    cfg = run_config_from_dict(RunDir(run_dir).read_config(), overrides or [])
    return train(cfg, out_dir=run_dir, resume=run_dir, log=log)
