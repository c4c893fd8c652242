"""Hugging Face `transformers` integration: `SlmsConfig`, `SlmsForCausalLM`, export.

Importing this module registers them with `AutoConfig` / `AutoModelForCausalLM` (`register`,
the way transformers documents for a custom model), so after `import slms.hf` a directory written
by `export_hf` loads with `AutoModelForCausalLM.from_pretrained(OUT)` and generates with
`generate()` and its KV cache.
The wrapped module is a plain `slms.model.GPT` under `model.`; nothing is reimplemented here.

Supports transformers 4.40+ and 5.x: the cache keyword is `cache` in 5.x and
`past_key_values` before; both are accepted, and the output uses the installed name.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DynamicCache,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from slms.config import ModelConfig, model_config_from_dict
from slms.model import GPT, IGNORE_INDEX
from slms.model.gpt import DOCUMENT_START_ID
from slms.tokenizer import EOT, SPECIAL_TOKENS, Tokenizer, declare_prompt_prefix

_TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
# The output field (and generate()'s keyword) holding the KV cache was renamed in 5.x.
_CACHE_FIELD = ("cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__
                else "past_key_values")
_MODEL_FIELDS = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "tie_weights"]
# SlmsConfig's fields and defaults are ModelConfig's (a config made without arguments, as
# transformers does, gets a 2048-token vocab)
_MODEL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)
                   if f.name in _MODEL_FIELDS} | {"vocab_size": 2048}


class SlmsConfig(PretrainedConfig):
    """The `ModelConfig` fields (moe as a dict or None); `tie_weights` is HF's
    `tie_word_embeddings`."""

    model_type = "slms"
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer",
                     "num_attention_heads": "n_head", "max_position_embeddings": "block_size"}

    def __init__(self, tie_word_embeddings: bool = True, use_cache: bool = True,
                 **kwargs: Any):
        for name, default in _MODEL_DEFAULTS.items():
            setattr(self, name, kwargs.pop(name, default))
        self.moe = dict(self.moe) if self.moe is not None else None
        self.use_cache = use_cache  # 5.x's base config no longer has it
        # Passed on (not only set) because 4.x's base __init__ would reset it to its default.
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **kwargs: Any) -> SlmsConfig:
        d = dataclasses.asdict(cfg)
        tie = d.pop("tie_weights")
        return cls(**d, tie_word_embeddings=tie, **kwargs)

    def to_model_config(self) -> ModelConfig:
        d = {k: getattr(self, k) for k in _MODEL_FIELDS}
        d["tie_weights"] = bool(self.tie_word_embeddings)
        return model_config_from_dict(d)


class _LayerCache:
    """One layer's view of a transformers `Cache`, shaped like `slms.model.attention.KVCache`
    (`starts` and `append`; its rows are in step), so slms attention runs unchanged on
    generate()'s cache."""

    # document_mask: a transformers cache keeps no document state; forward lets one hold a
    # single document only (`_cache_keeps_one_document`), so every row's begins at 0
    doc_start = None

    def __init__(self, cache: Any, layer_idx: int):
        self.cache = cache
        self.layer_idx = layer_idx

    def starts(self, rows: int) -> list[int]:
        return [self.cache.get_seq_length(self.layer_idx)] * rows

    def append(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(k, v, self.layer_idx)


class SlmsForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = SlmsConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _supports_cache_class = True  # 4.x: hand generate() a DynamicCache, not legacy tuples
    # Trainer passes num_items_in_batch (the label count of the whole accumulation step) and
    # then leaves the loss undivided by the accumulation steps: forward normalises by it.
    accepts_loss_kwargs = True
    # 5.x maps each tied target to its source; 4.x lists the targets.
    _tied_weights_keys = ({"model.lm_head.weight": "model.wte.weight"} if _TRANSFORMERS_5
                          else ["model.lm_head.weight"])

    def __init__(self, config: SlmsConfig):
        super().__init__(config)
        self.model = GPT(config.to_model_config())
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        # GPT initialises itself (with its scaled residual projections); re-initialising here
        # would only undo that. Loaded checkpoints overwrite every parameter anyway.
        pass

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        model._reset_runtime_state()
        return loaded

    def _reset_runtime_state(self) -> None:
        # transformers builds the model on the meta device and loads only the saved tensors:
        # the MoE statistics and the bias router's non-persistent load counter stay on meta.
        self.model.reset_moe_state()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.wte

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.wte = value

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.lm_head

    def set_output_embeddings(self, value: torch.nn.Module) -> None:
        self.model.lm_head = value

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                cache: Any = None, past_key_values: Any = None, use_cache: bool | None = None,
                labels: torch.LongTensor | None = None, logits_to_keep: int = 0,
                num_items_in_batch: torch.Tensor | int | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast:
        """input_ids (B, T): the tokens not yet in the cache. labels (B, T) are shifted inside,
        as in every transformers causal LM. The loss includes the MoE router losses (zero in
        eval mode). Without num_items_in_batch it is the mean over this batch's targets; with
        it (Trainer, gradient accumulation) see `_loss_over_items`."""
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("SlmsForCausalLM takes input_ids, not inputs_embeds")
        if attention_mask is not None and not bool(attention_mask.all()):
            # slms attention has no padding mask: padded rows would attend to pad tokens and
            # shift positions, silently changing the output.
            raise ValueError("slms models do not support padding (attention_mask has zeros); "
                             "generate each prompt separately or give equal-length prompts")
        cache = cache if cache is not None else past_key_values
        asked = use_cache is not None or cache is not None
        if use_cache is None:
            use_cache = bool(self.config.use_cache) and not self.training
        if self.config.document_mask and (use_cache or cache is not None):
            use_cache = _cache_keeps_one_document(input_ids, cache, asked)
        if use_cache and cache is None:
            cache = DynamicCache()
        caches = ([_LayerCache(cache, i) for i in range(self.config.n_layer)]
                  if cache is not None else None)
        targets = None
        if labels is not None:
            targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        summed = targets is not None and num_items_in_batch is not None
        out = self.model(input_ids, None if summed else targets, caches=caches,
                         last_only=labels is None and logits_to_keep == 1)
        if summed:
            loss = _loss_over_items(out.logits, targets, out.aux_loss, num_items_in_batch)
        else:
            loss = out.loss + out.aux_loss if out.loss is not None else None
        logits = out.logits
        if logits_to_keep > 1:
            logits = logits[:, -logits_to_keep:]
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      **{_CACHE_FIELD: cache if use_cache else None})

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """GenerationMixin.generate with the MoE statistics off for the call, as in
        `GPT.generate`: they cost a softmax and an entropy per step, and generated tokens
        would mix into the training statistics."""
        with self.model.paused_stats():
            return super().generate(*args, **kwargs)


def _cache_keeps_one_document(input_ids: torch.Tensor, cache: Any, asked: bool) -> bool:
    """document_mask models: whether a cache may be used for this call. It may when the
    cached sequence stays one document (<|endoftext|> only as its first token), since the
    cache cannot carry where documents begin. Otherwise a cache the caller asked for (or
    holds) is an error; a default one is left out, and the logits are exact without it."""
    past = cache.get_seq_length() if cache is not None else 0
    if not bool((input_ids[:, 0 if past else 1:] == DOCUMENT_START_ID).any()):
        return True
    if asked:
        raise ValueError("this document_mask model's KV cache holds one document: the input "
                         "has <|endoftext|> after the first cached token; generate from one "
                         "story's prompt (stop at <|endoftext|>) or pass use_cache=False")
    return False


def _loss_over_items(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, aux: torch.Tensor,
                     num_items: torch.Tensor | int) -> torch.Tensor:
    """This micro-batch's part of an accumulation step's loss: its summed cross entropy over
    the step's `num_items` targets, plus its router losses (a per-micro-batch mean) weighted
    by its share of those targets. Summed over the step's micro-batches this is the step's
    mean loss, however the targets fall into micro-batches.

    The share counts the targets the loss scores (labels shifted). The Trainer counts the same
    since transformers PR #46204 (in 5.24; our loss_type is ForCausalLM), so the sum is exact.
    Earlier versions count the unshifted labels, one more per row whose first is not -100: both
    terms then carry one factor (scored / counted), the under-scaling transformers' own causal
    LMs have there, and an accumulated step still equals one batch of all its rows.
    """
    ce_sum = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="sum")
    n_items = (targets_BT != IGNORE_INDEX).sum()
    return (ce_sum + aux * n_items) / num_items


def register() -> None:
    """Register model_type `slms` with AutoConfig and AutoModelForCausalLM (idempotent)."""
    AutoConfig.register("slms", SlmsConfig, exist_ok=True)
    AutoModelForCausalLM.register(SlmsConfig, SlmsForCausalLM, exist_ok=True)


def from_gpt(gpt: GPT, eos_id: int | None = None) -> SlmsForCausalLM:
    """A SlmsForCausalLM holding a copy of `gpt`'s weights."""
    ids = {} if eos_id is None else {"eos_token_id": eos_id, "bos_token_id": eos_id,
                                     "pad_token_id": eos_id}
    config = SlmsConfig.from_model_config(gpt.cfg, **ids)
    model = SlmsForCausalLM(config)
    model.model.load_state_dict(gpt.state_dict())
    if eos_id is not None:
        for k, v in ids.items():
            setattr(model.generation_config, k, v)
    return model.eval()


def hf_tokenizer(tok: Tokenizer, max_len: int) -> PreTrainedTokenizerFast:
    """The slms tokenizer as a PreTrainedTokenizerFast; <|endoftext|> is bos and eos, and text
    is encoded after the same prompt prefix as slms's (declared on a copy when the tokenizer
    file predates the declaration)."""
    hf = tok.hf
    if hf.post_processor is None:
        from tokenizers import Tokenizer as HFTokenizer

        hf = HFTokenizer.from_str(hf.to_str())
        declare_prompt_prefix(hf, tok.prompt_prefix)
    return PreTrainedTokenizerFast(tokenizer_object=hf, eos_token=EOT, bos_token=EOT,
                                   unk_token=SPECIAL_TOKENS[1], model_max_length=max_len,
                                   clean_up_tokenization_spaces=False)


def export_hf(gpt: GPT, tok: Tokenizer, out: str | Path) -> Path:
    """Write a `save_pretrained` directory (safetensors weights, config, tokenizer) to `out`."""
    out = Path(out)
    if gpt.cfg.document_mask and tok.eos_id != DOCUMENT_START_ID:
        raise ValueError(f"model.document_mask splits documents at token id {DOCUMENT_START_ID}"
                         f" but this tokenizer's {EOT} is {tok.eos_id}; it cannot be exported")
    model = from_gpt(gpt, tok.eos_id)
    model.save_pretrained(out, safe_serialization=True)
    hf_tokenizer(tok, gpt.cfg.block_size).save_pretrained(out)
    return out


# `import slms.hf` is the documented way to make model_type `slms` loadable by the Auto classes.
register()
