"""The model card (`README.md`) of an exported directory: the Hub's metadata header, then the
architecture, parameter counts (computed from the model), tokenizer, the data and training
config the checkpoint records, its evaluation, how to load it, and its limits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slms.checkpoint import CONFIG_FILE
from slms.data.prepare import META
from slms.model import GPT
from slms.model.activations import ffn_hidden
from slms.model.info import count_params
from slms.tokenizer import Tokenizer

TRAIN_KEYS = ("max_steps", "batch_size", "grad_accum", "optimizer", "lr", "schedule",
              "weight_decay", "precision", "seed")


def model_card(gpt: GPT, tok: Tokenizer, cls: str | None, checkpoint: Path | None,
               notes: list[str], where: str = "DIR", gguf: str | None = None) -> str:
    """The card's markdown. cls: the stock class (None: the custom `slms` class);
    checkpoint: the directory the model was loaded from (None: a model not saved), whose
    config.json, run and data the card describes; where: the directory (or Hub id) to load;
    gguf: the name of the GGUF file written with it, for llama.cpp."""
    meta = _read_json(checkpoint / CONFIG_FILE) if checkpoint is not None else None
    meta = meta or {}
    data_meta = read_data_meta(checkpoint) if checkpoint is not None else None
    val = recorded_eval(meta, checkpoint) if checkpoint is not None else None
    source = (data_meta or {}).get("source")
    parts = [_header(gpt, cls, source), f"# {gpt.cfg.n_layer}-layer slms language model\n",
             _architecture(gpt, cls), _tokenizer(tok), _training(meta, data_meta),
             _evaluation(val), _usage(cls, where), _llama_cpp(gguf), _limits(gpt, source, notes)]
    return "\n".join(parts)


def _header(gpt: GPT, cls: str | None, source: str | None) -> str:
    tags = ["slms", "text-generation", "causal-lm", "moe" if gpt.cfg.moe else "dense"]
    if source and "tinystories" in source.lower():
        tags.append("tinystories")
    lines = ["---", "library_name: transformers", "license: # fill in the license you choose",
             "pipeline_tag: text-generation", "tags:", *(f"- {t}" for t in tags), "---", ""]
    return "\n".join(lines)


def _architecture(gpt: GPT, cls: str | None) -> str:
    cfg = gpt.cfg
    counts = count_params(gpt)
    kind = (f"`{cls}` (stock transformers)" if cls is not None
            else "`SlmsForCausalLM` (model type `slms`: needs `import slms.hf`)")
    ffn = ffn_hidden(cfg.activation, cfg.mlp_ratio * cfg.n_embd)
    rows = [("class", kind), ("layers", cfg.n_layer), ("width (n_embd)", cfg.n_embd),
            ("heads", f"{cfg.n_head} (head size {cfg.head_dim})"),
            ("feed-forward", f"{cfg.activation}, hidden {ffn}" + (
                f"; MoE: {cfg.moe.n_experts} experts, top-{cfg.moe.top_k}" if cfg.moe else "")),
            ("positions", cfg.positions + (f" (base {cfg.rope_base:g})"
                                           if cfg.positions == "rope" else "")),
            ("norm", cfg.norm + (" + QK-norm" if cfg.qk_norm else "")),
            ("context", f"{cfg.block_size} tokens"), ("vocabulary", f"{cfg.vocab_size:,}"),
            ("embeddings", "tied" if cfg.tie_weights else "untied"),
            ("parameters (total)", f"{counts['params_total']:,}"),
            ("parameters (active per token)", f"{counts['params_active']:,}")]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"## Architecture\n\n| | |\n| --- | --- |\n{table}\n"


def _tokenizer(tok: Tokenizer) -> str:
    special = ", ".join(f"`{t}`" for t in tok.hf.get_added_tokens_decoder().values()
                        if t.special) or "none"
    prefix = ", ".join(f"`{tok.hf.id_to_token(i)}`" for i in tok.prompt_prefix) or "nothing"
    return (f"## Tokenizer\n\nByte-level BPE, {tok.vocab_size:,} tokens "
            f"(`PreTrainedTokenizerFast`); special tokens {special}. Encoding with "
            f"`add_special_tokens=True` puts {prefix} before the text, as in training.\n")


def _training(meta: dict[str, Any], data_meta: dict[str, Any] | None) -> str:
    run = meta.get("run")
    lines = ["## Data and training\n"]
    if data_meta is not None:
        splits = data_meta.get("splits") or {}
        sizes = ", ".join(f"{name}: {s['stories']:,} stories, {s['tokens']:,} tokens"
                          for name, s in splits.items()
                          if isinstance(s, dict) and isinstance(s.get("tokens"), int)
                          and isinstance(s.get("stories"), int))
        lines.append(f"Data: `{data_meta.get('source', '?')}`" + (f" ({sizes})" if sizes else "")
                     + ".\n")
    if not isinstance(run, dict):
        what = (f"imported from `{meta['imported_from']}`" if "imported_from" in meta
                else "no training run recorded in the checkpoint")
        return "\n".join([*lines, f"Training: {what}.\n"])
    train = run.get("train") or {}
    shown = ", ".join(f"{k}={train[k]}" for k in TRAIN_KEYS if k in train)
    step = meta.get("step")
    lines.append(f"Trained with slms for {step if step is not None else '?'} steps "
                 f"({meta.get('tokens_seen', 0):,} tokens seen): {shown}.\n")
    lines.append("The run's config:\n\n```json\n" + json.dumps(
        {k: run[k] for k in ("model", "data", "train") if k in run}, indent=2) + "\n```\n")
    return "\n".join(lines)


def _evaluation(val: dict[str, Any] | None) -> str:
    if val is None:
        return "## Evaluation\n\nNo evaluation is recorded for this checkpoint.\n"
    return (f"## Evaluation\n\nOn the validation split (`val`) of its data, at step "
            f"{val['step']}: {val['bits_per_byte']:.4f} bits per byte, loss {val['loss']:.4f} "
            "nats per token (as `slms train` evaluates: every token of the split).\n")


def recorded_eval(meta: dict[str, Any], checkpoint: Path) -> dict[str, Any] | None:
    """{step, bits_per_byte, loss} of the validation split at the checkpoint's step: from its
    config.json (best/ records it) or its run's metrics.jsonl; None when neither has it."""
    step = meta.get("step")
    val = meta.get("val")
    if isinstance(val, dict) and "bits_per_byte" in val and "loss" in val:
        return {"step": step, "bits_per_byte": val["bits_per_byte"], "loss": val["loss"]}
    from slms.rundir import RunDir

    run = RunDir.containing(checkpoint)
    if run is None or step is None or not run.metrics_file.is_file():
        return None
    for line in run.metrics_file.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and r.get("step") == step and "val_bits_per_byte" in r:
            return {"step": step, "bits_per_byte": r["val_bits_per_byte"],
                    "loss": r["val_loss"]}
    return None


def _usage(cls: str | None, where: str) -> str:
    first = "" if cls is not None else "import slms.hf  # registers model type slms\n"
    need = ("Only `transformers` (and torch) are needed; slms is not." if cls is not None
            else "This model has options no stock class computes: it needs slms installed.")
    return (f"## Use\n\n{need}\n\n```python\n{first}"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"model = AutoModelForCausalLM.from_pretrained({where!r})  # or its Hub id\n"
            f"tok = AutoTokenizer.from_pretrained({where!r})\n"
            'ids = tok("Once upon a time", return_tensors="pt").input_ids\n'
            "out = model.generate(ids, max_new_tokens=100, do_sample=True, top_k=50)\n"
            "print(tok.decode(out[0], skip_special_tokens=True))\n```\n")


def _llama_cpp(gguf: str | None) -> str:
    if gguf is None:
        return ""
    return ("## llama.cpp, Ollama\n\n"
            f"`{gguf}` holds the same model and tokenizer for llama.cpp (with the ChatML chat "
            f"template):\n\n```sh\nllama-cli -m {gguf} -p \"Once upon a time\" -n 100\n```\n\n"
            f"Ollama: a `Modelfile` holding `FROM ./{gguf}`, then `ollama create NAME -f "
            "Modelfile` and `ollama run NAME`.\n")


def _limits(gpt: GPT, source: str | None, notes: list[str]) -> str:
    data = f"`{source}`" if source else "its training data"
    lines = ["## Limits\n",
             f"- A small model ({gpt.cfg.n_layer} layers): it writes text like {data} and "
             "nothing else (a TinyStories model writes children's stories). It knows few "
             "facts and states wrong ones fluently; it was not tuned to follow instructions "
             "or for safety.",
             f"- Its context is {gpt.cfg.block_size} tokens; positions beyond it were never "
             "trained."]
    if gpt.cfg.dropout > 0:
        lines.append(f"- Trained with dropout {gpt.cfg.dropout:g}; the stock config sets "
                     "what of it the class has.")
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def read_data_meta(checkpoint: Path) -> dict[str, Any] | None:
    """The prepared data's meta.json for the run that wrote `checkpoint`, when it is found."""
    from slms.rundir import RunDir

    run = RunDir.containing(checkpoint)
    data_dir = run.data_dir() if run is not None else None
    return _read_json(data_dir / META) if data_dir is not None else None


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`; None when it is missing or not one (a card is best effort)."""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None
