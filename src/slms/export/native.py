"""A stock transformers model holding an slms model's weights, checked against slms's logits,
and the tokenizer and generation files beside it.

The stock model is built in this process and written with its own `save_pretrained`, so the
safetensors keys are the class's on-disk names in the installed transformers, whatever
conversions it applies when saving.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from slms.export import gpt2, llama, moe
from slms.export.arches import Arch
from slms.model import GPT
from slms.model.gpt import DOCUMENT_START_ID
from slms.tokenizer import Tokenizer

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# the largest |logit difference| the export accepts, relative to the largest |logit| (>= 1):
# fp32 sums in another order differ by about 1e-6 of it
CHECK_TOLERANCE = 1e-4


def build(gpt: GPT, arch: Arch, eos_id: int) -> Any:
    """The `arch.cls` model (eval mode, fp32) computing `gpt`'s function."""
    import transformers

    cls = getattr(transformers, arch.cls)
    fields, weights = _mapped(gpt, arch)
    legacy_theta = fields.pop("rope_theta", None)
    # no pad_token_id in the model config (Apertus defaults to 3): the embedding would make
    # that row a frozen padding row when fine-tuned; generation_config has one
    if arch.moe and not moe.grouped_mm_aligned(gpt):
        fields["experts_implementation"] = "eager"
    config = cls.config_class(**fields, bos_token_id=eos_id, eos_token_id=eos_id,
                              pad_token_id=None)
    if legacy_theta is not None:
        config.rope_theta = legacy_theta  # written beside rope_parameters: 4.x reads it
    model = cls(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if gpt.cfg.tie_weights else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{arch.cls} does not take slms's mapped weights (missing "
                           f"{sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})")
    if gpt.cfg.tie_weights:
        model.tie_weights()
    for key, value in (("bos_token_id", eos_id), ("eos_token_id", eos_id),
                       ("pad_token_id", eos_id)):
        setattr(model.generation_config, key, value)
    return model.eval()


def _mapped(gpt: GPT, arch: Arch) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config fields, weights) of `gpt` for `arch`, by the module that maps its family."""
    if arch.name == "gpt2":
        return gpt2.config(gpt), gpt2.state_dict(gpt)
    family = moe if arch.moe else llama
    return family.config(gpt, arch), family.state_dict(gpt, arch)


def max_logit_diff(gpt: GPT, model: Any, tokens: int = 24) -> float:
    """max |logits(model) - logits(gpt)| / max(1, max |logits(gpt)|) on a fixed random
    sequence of one document (no <|endoftext|>), in fp32."""
    cfg = gpt.cfg
    g = torch.Generator().manual_seed(0)
    low = DOCUMENT_START_ID + 1 if cfg.vocab_size > 1 else 0
    x = torch.randint(low, cfg.vocab_size, (2, min(tokens, cfg.block_size)), generator=g)
    was = gpt.training
    gpt.eval()
    try:
        with torch.no_grad():
            want = gpt(x.to(gpt.device)).logits.float().cpu()
            got = model(x).logits.float()
    finally:
        gpt.train(was)
    return float((got - want).abs().max() / want.abs().max().clamp(min=1.0))


def check(gpt: GPT, model: Any, arch: Arch) -> float:
    """The relative logit difference; ValueError (one line) when it is above tolerance: the
    installed transformers computes the class differently from what this export assumes."""
    import transformers

    diff = max_logit_diff(gpt, model)
    if diff > CHECK_TOLERANCE:
        raise ValueError(f"{arch.cls} of transformers {transformers.__version__} does not "
                         f"reproduce slms's logits (relative difference {diff:.1e}); export "
                         "with --arch slms")
    return diff


def chat_template(tok: Tokenizer) -> str | None:
    """The Jinja chat template of the `<|im_start|>role\\ncontent<|im_end|>\\n` format
    (slms's server renders chats this way), after the tokenizer's prompt prefix; None when the
    tokenizer lacks either special token."""
    if tok.hf.token_to_id(IM_START) is None or tok.hf.token_to_id(IM_END) is None:
        return None
    prefix = "".join(tok.hf.id_to_token(i) for i in tok.prompt_prefix)
    return (prefix + "{% for message in messages %}" + IM_START + "{{ message['role'] }}\n"
            "{{ message['content'] }}" + IM_END + "\n{% endfor %}"
            "{% if add_generation_prompt %}" + IM_START + "assistant\n{% endif %}")


def save_tokenizer(tok: Tokenizer, max_len: int, out: Path) -> None:
    """The PreTrainedTokenizerFast of `slms.hf.hf_tokenizer`, with the chat template."""
    from slms.hf import hf_tokenizer

    fast = hf_tokenizer(tok, max_len)
    template = chat_template(tok)
    if template is not None:
        fast.chat_template = template
    fast.save_pretrained(out)


def save(model: Any, tok: Tokenizer, max_len: int, out: Path) -> None:
    """config.json, model.safetensors, generation_config.json and the tokenizer into `out`."""
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # a bar for one shard of a small model is noise
    try:
        model.save_pretrained(out)
    finally:
        if shown:
            logging.enable_progress_bar()
    experts = getattr(model.config, "_experts_implementation", None)
    if experts is not None:  # not saved by transformers: where it loads, it must be asked for
        path = out / "config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | {
            "experts_implementation": experts}, indent=2, sort_keys=True) + "\n")
    save_tokenizer(tok, max_len, out)
