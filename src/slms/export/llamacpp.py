"""`slms export --gguf`: one GGUF file for llama.cpp (and Ollama, LM Studio), written with the
`gguf` package: its GGUFWriter, its tensor-name maps and its quantisers.

The weights go the way llama.cpp's convert_hf_to_gguf.py takes them: slms's weights under the
stock transformers class's names (`slms.export.llama`, `moe`, `gpt2`: the mappings the --hf
export checks), renamed by `gguf.get_tensor_name_map`, with what the converter does per
architecture: for llama (and Mixtral, which llama.cpp runs as llama) and arcee, the q and k
rows of each head permuted from the rotate-half layout to the interleaved one llama.cpp's
rope expects there (`permute`; qwen3 and qwen3moe take rotate-half as it is); the experts
stacked as ffn_{gate,up,down}_exps; GPT-2's Conv1D weights back in nn.Linear's layout. Norms,
biases, the router and position embeddings stay f32 (as the converter keeps them); q8_0
falls back to f16 for a matrix whose rows are not a multiple of its 32-value blocks.

The tokenizer is slms's byte-level BPE as llama.cpp's `gpt2` tokenizer model with the `gpt-2`
pre-tokenizer (the same regex as ByteLevel(use_regex=True)): tokens, token types (special
tokens are control tokens), merges, the ids, and the ChatML template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slms.export import gpt2, llama, moe
from slms.export.arches import DOCUMENT_MASK_NOTE, Arch
from slms.model import GPT
from slms.tokenizer import Tokenizer

# --outtype -> (gguf.LlamaFileType, gguf.GGMLQuantizationType) member names
OUTTYPES = {"f32": ("ALL_F32", "F32"), "f16": ("MOSTLY_F16", "F16"),
            "bf16": ("MOSTLY_BF16", "BF16"), "q8_0": ("MOSTLY_Q8_0", "Q8_0")}
# our arch name -> llama.cpp's (gguf.MODEL_ARCH member), for those llama.cpp runs
GGUF_ARCH = {"llama": "LLAMA", "arcee": "ARCEE", "qwen3": "QWEN3", "gpt2": "GPT2",
             "mixtral": "LLAMA", "qwen3_moe": "QWEN3MOE"}
PERMUTED = ("llama", "arcee", "mixtral")  # llama.cpp's LLM_ARCH_LLAMA/ARCEE rope: interleaved
CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
GGUF_NOTE = {"gpt2": "llama.cpp's GPT-2 GELU is the tanh approximation, slms's the exact one: "
                     "its logits are close to slms's, not equal"}


@dataclass
class Written:
    """What `write` wrote: the file, llama.cpp's architecture and the tensor types used."""

    path: Path
    arch: str
    types: dict[str, int]  # tensor type name -> how many tensors have it
    notes: list[str]  # where llama.cpp computes differently from slms


def why_not(gpt: GPT, arch: Arch | None, reason: str | None) -> str | None:
    """Why llama.cpp cannot run the model (one line), None when it can. arch: the stock class
    that is exact (None: none is, for `reason`)."""
    cfg = gpt.cfg
    if arch is None:
        return f"no llama.cpp architecture computes this model: {reason}"
    if arch.name == "apertus":
        return ("llama.cpp's apertus architecture hard-codes the xIELU activation: it cannot run "
                "relu2 with QK-norm (train with model.activation=swiglu for qwen3)")
    if arch.name not in GGUF_ARCH:
        return f"slms writes no GGUF file for {arch.cls} models yet"
    if arch.name != "gpt2" and cfg.bias:
        return (f"model.bias=true: llama.cpp's {GGUF_ARCH[arch.name].lower()} takes no biases "
                "(train with model.bias=false)")
    if arch.name == "gpt2" and cfg.activation != "gelu":
        return f"model.activation={cfg.activation}: llama.cpp's gpt2 runs GELU only"
    if cfg.moe is not None and not cfg.moe.renormalize:
        return "model.moe.renormalize=false: llama.cpp renormalises the top-k weights"
    if cfg.moe is not None and cfg.moe.every > 1:
        return f"model.moe.every={cfg.moe.every}: every layer of llama.cpp's MoE models is MoE"
    return None


def write(gpt: GPT, tok: Tokenizer, arch: Arch, path: Path, outtype: str = "f32") -> Written:
    """Write `gpt` and `tok` to the GGUF file `path` (arch: the exact stock class, one that
    `why_not` accepts); outtype: one of OUTTYPES for the matrices. Written beside `path` and
    renamed into place: a failure leaves no partial file and keeps an older one."""
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    name = GGUF_ARCH[arch.name]
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[name]])
    try:
        types = _write(writer, gpt, tok, arch, path.stem, outtype)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    notes = ([DOCUMENT_MASK_NOTE.replace("the stock class", "llama.cpp")]
             if gpt.cfg.document_mask else [])
    if arch.name in GGUF_NOTE:
        notes.append(GGUF_NOTE[arch.name])
    return Written(path, writer.arch, types, notes)


def _write(writer: Any, gpt: GPT, tok: Tokenizer, arch: Arch, title: str, outtype: str
           ) -> dict[str, int]:
    import gguf

    writer.add_name(title)
    writer.add_file_type(getattr(gguf.LlamaFileType, OUTTYPES[outtype][0]))
    _hyperparameters(writer, gpt, arch)
    _tokenizer(writer, tok, gpt.cfg.vocab_size)
    types: dict[str, int] = {}
    for key, data in tensors(gpt, arch).items():
        qtype = _qtype(key, data, outtype)
        types[qtype.name] = types.get(qtype.name, 0) + 1
        # quantised arrays are bytes: the writer takes their shape from the byte shape
        writer.add_tensor(key, gguf.quants.quantize(data.float().numpy(), qtype),
                          raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


def tensors(gpt: GPT, arch: Arch) -> dict[str, torch.Tensor]:
    """GGUF tensor name -> fp32 tensor (torch layout), as llama.cpp reads them."""
    import gguf

    hf = _hf_weights(gpt, arch)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[GGUF_ARCH[arch.name]], gpt.cfg.n_layer)
    out = {}
    for key, data in hf.items():
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise RuntimeError(f"gguf has no name for {key} in {arch.name}")
        out[gguf_name] = data.float().contiguous()
    return out


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: each head's rows from rotate-half order
    (pairs i, i + hs/2) to interleaved order (pairs 2i, 2i + 1)."""
    rows = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, rows, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_weights(gpt: GPT, arch: Arch) -> dict[str, torch.Tensor]:
    """slms's weights under the stock class's names, changed as convert_hf_to_gguf does."""
    cfg = gpt.cfg
    if arch.name == "gpt2":
        sd = gpt2.state_dict(gpt)
        return {k: v.t() if k.endswith(CONV1D) else v for k, v in sd.items()}
    sd = (moe if arch.moe else llama).state_dict(gpt, arch)
    out = {}
    for key, data in sd.items():
        if arch.name in PERMUTED and key.endswith(("q_proj.weight", "k_proj.weight")):
            data = permute(data, cfg.n_head)
        if key.endswith("mlp.experts.gate_up_proj"):  # (E, 2H, D): the gate half first
            gate, up = data.chunk(2, dim=1)
            out[key.replace("gate_up_proj", "gate_proj.weight")] = gate
            out[key.replace("gate_up_proj", "up_proj.weight")] = up
        elif key.endswith("mlp.experts.down_proj"):
            out[key + ".weight"] = data
        else:
            out[key] = data
    return out


def _hyperparameters(writer: Any, gpt: GPT, arch: Arch) -> None:
    cfg = gpt.cfg
    if arch.name == "gpt2":
        fields = gpt2.config(gpt)
        writer.add_context_length(cfg.block_size)
        writer.add_embedding_length(cfg.n_embd)
        writer.add_feed_forward_length(fields["n_inner"])
        writer.add_block_count(cfg.n_layer)
        writer.add_head_count(cfg.n_head)
        writer.add_layer_norm_eps(fields["layer_norm_epsilon"])
        return
    fields = (moe if arch.moe else llama).config(gpt, arch)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(fields["intermediate_size"])
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_head)
    writer.add_rope_freq_base(float(cfg.rope_base))
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(fields["rms_norm_eps"])
    if cfg.moe is not None:
        writer.add_expert_count(cfg.moe.n_experts)
        writer.add_expert_used_count(cfg.moe.top_k)
        writer.add_expert_feed_forward_length(moe.expert_hidden(gpt))
        writer.add_expert_weights_norm(True)


def _tokenizer(writer: Any, tok: Tokenizer, vocab_size: int) -> None:
    """llama.cpp's `gpt2` BPE: the tokens by id (padded to the model's vocab with unused
    tokens, as the converter does), their types, the merges, the ids and the chat template."""
    import gguf

    from slms.export.native import IM_END, chat_template

    vocab = tok.hf.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    special = {t.content for t in tok.hf.get_added_tokens_decoder().values() if t.special}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL)
    merges = json.loads(tok.hf.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tok.eos_id)  # a prompt starts after <|endoftext|>
    writer.add_eos_token_id(tok.eos_id)
    writer.add_pad_token_id(tok.eos_id)
    writer.add_add_bos_token(tok.prompt_prefix == [tok.eos_id])
    im_end = tok.hf.token_to_id(IM_END)
    if im_end is not None:
        writer.add_eot_token_id(im_end)  # a chat turn ends there
    template = chat_template(tok)
    if template is not None:
        writer.add_chat_template(template)


def _qtype(name: str, data: torch.Tensor, outtype: str) -> Any:
    """The tensor's GGML type: f32 for vectors, the router and position embeddings; else
    outtype (q8_0: f16 where the rows are not whole blocks)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if data.dim() <= 1 or ".ffn_gate_inp." in name or name.startswith("position_embd."):
        return Q.F32
    qtype = Q[OUTTYPES[outtype][1]]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if data.shape[-1] % block == 0 else Q.F16
