"""`slms import-seed`: a checkpoint written by the seed's code -> an slms checkpoint directory.

The seed's training script saves `{"epoch", "model": state_dict, "optimizer", "scheduler",
"hyperparameters": {vocab_size, block_size, n_embed, n_heads, n_layers, dropout, n_experts, top_k,
...}, "val_loss", "train_loss"}`; only "model" and "hyperparameters" are used. Its model differs
from slms's defaults in ways the config expresses, so the imported model computes what it
computed before:
attention scores scaled by n_embed^-0.5 (`attn_scale="n_embd"`), one bias-free Linear per head
for q/k/v (fused into `qkv`, `qkv_bias=False`), a gate that softmaxes the top-k logits
(`renormalize=True`), ReLU FFNs, an untied lm_head with a bias. Its `tril` mask buffers are
dropped. Its gate adds noise in evaluation too; slms's `noisy_topk` adds it in training only, so
the imported model computes the seed's eval forward with the noise at zero. Weights pruned with
`torch.nn.utils.prune` (`weight_orig` and `weight_mask`, as the seed's test script handles) are
folded into plain weights.

Its tokenizer (whitespace pre-tokenized BPE, no decoder, specials `<|unknown|>`, `<|im_start|>`,
`<|im_end|>`) is kept as it is, so it decodes as the seed's did. slms needs an `<|endoftext|>`
token (generation stops at it); it is added as one extra id past the seed's vocab, whose
embedding row is zero and whose output logit is -1e9, so it is never produced and leaves every
other probability unchanged. Prompts do not start with it (the tokenizer's post-processor says
so: `Tokenizer.prompt_prefix` is empty), as the seed's did not.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from slms.config import ModelConfig, MoEConfig
from slms.model import GPT
from slms.tokenizer import EOT, Tokenizer, declare_prompt_prefix, hf_from_str

HYPER = ("vocab_size", "block_size", "n_embed", "n_heads", "n_layers")
NEVER_LOGIT = -1e9


class SeedImportError(ValueError):
    """A file that is not a seed checkpoint, or one whose keys do not match its shapes."""


def seed_config(hp: dict[str, Any], moe: bool) -> ModelConfig:
    missing = [k for k in HYPER if k not in hp]
    if missing:
        raise SeedImportError(f"hyperparameters lack {', '.join(missing)}")
    moe_cfg = None
    if moe:
        moe_cfg = MoEConfig(n_experts=int(hp["n_experts"]), top_k=int(hp["top_k"]),
                            router="noisy_topk", renormalize=True, every=1,
                            expert_hidden=4 * int(hp["n_embed"]))
    return ModelConfig(vocab_size=int(hp["vocab_size"]) + 1, block_size=int(hp["block_size"]),
                       n_layer=int(hp["n_layers"]), n_head=int(hp["n_heads"]),
                       n_embd=int(hp["n_embed"]), dropout=float(hp.get("dropout", 0.0)),
                       bias=True, qkv_bias=False, tie_weights=False, activation="relu",
                       mlp_ratio=4, attn_scale="n_embd", moe=moe_cfg)


def convert_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The seed's keys and layouts -> slms's (see the module docstring)."""
    sd = unprune({k: v for k, v in sd.items() if not k.endswith("tril")})
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise SeedImportError(f"seed state dict has no {key}")
        used.add(key)
        return sd[key].float()

    V = cfg.vocab_size - 1
    out: dict[str, torch.Tensor] = {}
    wte = take("token_embedding_table.weight")
    out["wte.weight"] = torch.cat([wte, wte.new_zeros(1, wte.size(1))])
    out["wpe.weight"] = take("position_embedding_table.weight")
    for i in range(cfg.n_layer):
        s, d = f"blocks.{i}.", f"blocks.{i}."
        heads = f"{s}sa_heads.heads."
        qkv = [torch.cat([take(f"{heads}{h}.{name}.weight") for h in range(cfg.n_head)])
               for name in ("query", "key", "value")]
        out[f"{d}attn.qkv.weight"] = torch.cat(qkv)
        out[f"{d}attn.proj.weight"] = take(f"{s}sa_heads.fc.weight")
        out[f"{d}attn.proj.bias"] = take(f"{s}sa_heads.fc.bias")
        for ln in ("ln1", "ln2"):
            for p in ("weight", "bias"):
                out[f"{d}{ln}.{p}"] = take(f"{s}{ln}.{p}")
        if cfg.is_moe_layer(i):
            assert cfg.moe is not None
            for src, dst in (("Wg", "gate"), ("Wnoise", "noise")):
                for p in ("weight", "bias"):
                    out[f"{d}ffn.router.{dst}.{p}"] = take(f"{s}moe.gating.{src}.{p}")
            ex = [f"{s}moe.experts.{e}.net." for e in range(cfg.moe.n_experts)]
            out[f"{d}ffn.experts.w1_EDH"] = torch.stack([take(f"{x}0.weight").T for x in ex])
            out[f"{d}ffn.experts.b1_EH"] = torch.stack([take(f"{x}0.bias") for x in ex])
            out[f"{d}ffn.experts.w2_EHD"] = torch.stack([take(f"{x}2.weight").T for x in ex])
            out[f"{d}ffn.experts.b2_ED"] = torch.stack([take(f"{x}2.bias") for x in ex])
        else:
            for src, dst in (("0", "fc"), ("2", "proj")):
                for p in ("weight", "bias"):
                    out[f"{d}ffn.{dst}.{p}"] = take(f"{s}ffwd.net.{src}.{p}")
    for p in ("weight", "bias"):
        out[f"ln_f.{p}"] = take(f"ln_f.{p}")
    head_w, head_b = take("lm_head.weight"), take("lm_head.bias")
    if head_w.size(0) != V:
        raise SeedImportError(f"lm_head has {head_w.size(0)} rows but vocab_size is {V}")
    out["lm_head.weight"] = torch.cat([head_w, head_w.new_zeros(1, head_w.size(1))])
    out["lm_head.bias"] = torch.cat([head_b, head_b.new_full((1,), NEVER_LOGIT)])
    extra = sorted(set(sd) - used)
    if extra:
        raise SeedImportError(f"unexpected keys in the seed state dict: {extra[:4]}")
    return {k: v.contiguous() for k, v in out.items()}


def unprune(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`X_orig` and `X_mask` (torch.nn.utils.prune's reparametrisation) -> `X = X_orig * X_mask`."""
    out = {}
    for key, value in sd.items():
        if key.endswith("_mask") and key[:-5] + "_orig" in sd:
            continue
        if key.endswith("_orig") and key[:-5] + "_mask" in sd:
            key, value = key[:-5], value * sd[key[:-5] + "_mask"]
        out[key] = value
    return out


def seed_tokenizer(path: str | Path) -> Tokenizer:
    """The seed's tokenizer as it is, plus `<|endoftext|>` as one extra special id."""
    from tokenizers import AddedToken

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"seed tokenizer {path} not found")
    try:
        hf = hf_from_str(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # not a tokenizer: one line naming the file
        raise ValueError(f"{path} is not a usable tokenizer file: {e}") from None
    if hf.token_to_id(EOT) is None:
        hf.add_special_tokens([AddedToken(EOT, special=True)])
    declare_prompt_prefix(hf, [])  # the seed's prompts start with their first word
    return Tokenizer(hf)


class Dropped:
    """Stands for every object of a checkpoint that is not data torch's weights-only loader
    knows: built and filled without running any code of the object's class."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass


def load_weights_only(path: Path) -> Any:
    """torch.load(weights_only=True), with any other global of the file replaced by `Dropped`.

    The seed's checkpoints hold its OneCycleLR state, which torch < 2.4 saved with a bound
    method (pytorch/pytorch#123775): a global the weights-only loader refuses, although the
    weights and hyperparameters are plain data. Standing in inert objects for such globals
    loads the data and still runs none of the file's code (torch's loader refuses os and sys
    globals before any stand-in applies).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        if not unsafe:
            raise
    with torch.serialization.safe_globals([(Dropped, name) for name in unsafe]):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_seed(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"seed checkpoint {path} not found")
    try:
        ck = load_weights_only(path)
    except Exception as e:
        raise SeedImportError(f"{path} cannot be loaded as a seed checkpoint "
                              f"({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(ck, dict) or "model" not in ck or "hyperparameters" not in ck:
        raise SeedImportError(f"{path} is not a seed checkpoint (needs 'model' and "
                              "'hyperparameters')")
    sd, hp = ck["model"], ck["hyperparameters"]
    if not (isinstance(sd, dict) and isinstance(hp, dict)
            and all(isinstance(v, torch.Tensor) for v in sd.values())
            and all(isinstance(v, (int, float, str, bool)) for v in hp.values())):
        raise SeedImportError(f"{path} is not a seed checkpoint ('model' must be a state dict "
                              "of tensors, 'hyperparameters' a dict of numbers)")
    return sd, hp


def import_seed(seed_path: str | Path, tokenizer_path: str | Path, out: str | Path
                ) -> tuple[GPT, Tokenizer, Path]:
    from slms.checkpoint import save_checkpoint

    sd, hp = load_seed(seed_path)
    moe = any(re.search(r"\.moe\.", k) for k in sd)
    cfg = seed_config(hp, moe)
    tok = seed_tokenizer(tokenizer_path)
    if tok.vocab_size != cfg.vocab_size:
        raise SeedImportError(f"the tokenizer has {tok.vocab_size - 1} tokens but the seed "
                              f"model's vocab_size is {cfg.vocab_size - 1}")
    model = GPT(cfg)
    model.load_state_dict(convert_state_dict(sd, cfg), strict=True)
    path = save_checkpoint(out, model.eval(), tok, {"imported_from": str(seed_path)})
    return model, tok, path
