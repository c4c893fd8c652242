"""`slms export --hf`: a transformers directory, in a stock class where one is exact
(`slms.export.arches`), else in the custom `slms` class of `slms.hf`; both with the tokenizer
(and its chat template), generation_config.json and a model card. `slms export --gguf`: a
GGUF file for llama.cpp (`slms.export.llamacpp`) where llama.cpp runs that stock class."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from slms.export import llamacpp, native
from slms.export.arches import DOCUMENT_MASK_NOTE, Arch, choose, forced
from slms.export.card import model_card
from slms.model import GPT
from slms.tokenizer import Tokenizer


@dataclass
class Exported:
    """What was written: the stock class (None: the custom one), why not a stock one (when
    chosen automatically), the caveats the card lists, and the checked logit difference."""

    out: Path
    arch: Arch | None
    reason: str | None = None
    notes: list[str] = field(default_factory=list)
    max_diff: float | None = None


def check_out(out: Path, checkpoint: Path | None = None) -> None:
    """ValueError (one line) when writing to `out` would overwrite slms's own files: a
    checkpoint (its config.json, weights), a run directory, or the checkpoint exported."""
    from slms.checkpoint import CONFIG_FILE
    from slms.rundir import RunDir

    if out.exists() and not out.is_dir():
        raise ValueError(f"--hf {out} is a file, not a directory; give a directory to write")
    if checkpoint is not None and out.resolve() == checkpoint.resolve():
        raise ValueError(f"--hf {out} is the checkpoint being exported; choose another directory")
    run = RunDir(out)
    if run.config_file.exists() or run.checkpoints_dir.is_dir() or run.best.is_dir():
        raise ValueError(f"--hf {out} is an slms run directory; choose another directory")
    config = out / CONFIG_FILE
    if config.is_file():
        try:
            meta = json.loads(config.read_text())
        except (OSError, ValueError):
            meta = None
        if not isinstance(meta, dict) or isinstance(meta.get("model"), dict):
            raise ValueError(f"--hf {out} holds an slms checkpoint (or a config.json that is "
                             "not a transformers one); choose another directory")


GGUF_MAGIC = b"GGUF"


def check_gguf_out(out: Path, checkpoint: Path | None = None) -> None:
    """ValueError (one line) when writing the GGUF file `out` would overwrite anything but an
    older GGUF file: a directory, or any other file (a checkpoint's weights, say). A missing
    directory is made (the --hf directory, say, written in the same call)."""
    if out.is_dir():
        raise ValueError(f"--gguf {out} is a directory; give the name of the file to write")
    if checkpoint is not None and out.resolve().parent == checkpoint.resolve():
        raise ValueError(f"--gguf {out} is inside the checkpoint being exported; choose "
                         "another place")
    if out.exists():
        try:
            with out.open("rb") as f:
                magic = f.read(len(GGUF_MAGIC))
        except OSError as e:
            raise ValueError(f"--gguf {out} cannot be read ({e.strerror}); choose another "
                             "name") from None
        if magic != GGUF_MAGIC:
            raise ValueError(f"--gguf {out} exists and is not a GGUF file; choose another name")


def gguf_arch(gpt: GPT, arch: str | None = None) -> Arch:
    """The stock class whose llama.cpp architecture the GGUF file takes (`--arch` as for
    --hf); ValueError (one line) when llama.cpp cannot run the model."""
    if arch is None:
        chosen, reason = choose(gpt.cfg)
    else:
        chosen, reason = forced(gpt.cfg, arch), "--arch slms: the custom class"
    why = llamacpp.why_not(gpt, chosen, reason)
    if why is not None:
        raise ValueError(f"--gguf: {why}")
    assert chosen is not None
    return chosen


def export_gguf(gpt: GPT, tok: Tokenizer, out: str | Path, arch: Arch, outtype: str = "f32",
                checkpoint: Path | None = None) -> llamacpp.Written:
    """Write the GGUF file `out` for `arch` (from `gguf_arch`)."""
    out = Path(out)
    check_gguf_out(out, checkpoint)
    _check_document_ids(gpt, tok)
    return llamacpp.write(gpt, tok, arch, out, outtype)


def export_model(gpt: GPT, tok: Tokenizer, out: str | Path, arch: str | None = None,
                 checkpoint: Path | None = None, gguf: str | None = None) -> Exported:
    """Write `gpt` and `tok` to `out`. arch: a class `--arch` forces ("slms": the custom one;
    None: the simplest exact class, else the custom one). ValueError (one line) for a forced
    class that would not be exact. gguf: the name of a GGUF file written beside, for the card."""
    out = Path(out)
    check_out(out, checkpoint)
    if arch is None:
        chosen, reason = choose(gpt.cfg)
    else:
        chosen, reason = forced(gpt.cfg, arch), None
    if chosen is None:
        result = _custom(gpt, tok, out, reason)
    else:
        result = _native(gpt, tok, out, chosen)
    card = model_card(gpt, tok, chosen.cls if chosen else None, checkpoint, result.notes,
                      where=str(out), gguf=gguf)
    (out / "README.md").write_text(card)
    return result


def _native(gpt: GPT, tok: Tokenizer, out: Path, arch: Arch) -> Exported:
    _check_document_ids(gpt, tok)
    model = native.build(gpt, arch, tok.eos_id)
    diff = native.check(gpt, model, arch)
    native.save(model, tok, gpt.cfg.block_size, out)
    notes = [DOCUMENT_MASK_NOTE] if gpt.cfg.document_mask else []
    return Exported(out, arch, notes=notes, max_diff=diff)


def _custom(gpt: GPT, tok: Tokenizer, out: Path, reason: str | None) -> Exported:
    from slms.hf import export_hf

    export_hf(gpt, tok, out)
    native.save_tokenizer(tok, gpt.cfg.block_size, out)  # the same files, with the template
    notes = [f"Exported in the custom class because {reason}."] if reason else []
    return Exported(out, None, reason=reason, notes=notes)


def _check_document_ids(gpt: GPT, tok: Tokenizer) -> None:
    from slms.model.gpt import DOCUMENT_START_ID
    from slms.tokenizer import EOT

    if gpt.cfg.document_mask and tok.eos_id != DOCUMENT_START_ID:
        raise ValueError(f"model.document_mask splits documents at token id {DOCUMENT_START_ID}"
                         f" but this tokenizer's {EOT} is {tok.eos_id}; it cannot be exported")
