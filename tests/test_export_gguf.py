"""`slms export --gguf`: the GGUF file read back with the gguf package's reader holds every
weight of the model (checked against slms's own modules, q and k unpermuted where llama.cpp
wants them permuted), the hyper-parameters and the tokenizer; transformers' GGUF loader gives
slms's logits; llama.cpp, where it is installed, slms's greedy tokens. Models llama.cpp
cannot run are one line, and nothing but an older GGUF file is overwritten.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

gguf = pytest.importorskip("gguf")

from conftest import tiny_config  # noqa: E402
from slms.checkpoint import save_checkpoint  # noqa: E402
from slms.cli import main  # noqa: E402
from slms.config import MoEConfig  # noqa: E402
from slms.model import GPT  # noqa: E402

ROPE = {"positions": "rope", "norm": "rmsnorm", "activation": "swiglu", "bias": False}


def experts(**options) -> MoEConfig:
    return MoEConfig(n_experts=4, top_k=2, expert_hidden=48, bias=False, **options)


# name: (ModelConfig options, llama.cpp's architecture)
CASES = {
    "llama": ({**ROPE, "attn_scale": "n_embd"}, "llama"),
    "arcee": ({**ROPE, "activation": "relu2", "tie_weights": False}, "arcee"),
    "qwen3": ({**ROPE, "qk_norm": True}, "qwen3"),
    "mixtral": ({**ROPE, "moe": experts()}, "llama"),
    "qwen3-moe": ({**ROPE, "qk_norm": True, "moe": experts(router="topk")}, "qwen3moe"),
    "gpt2": ({"activation": "gelu", "qkv_bias": False}, "gpt2"),
}
TEXT = "Once upon a time, a little cat\nsaw a dog."
GREEDY = 32


def perturbed(**options) -> GPT:
    """A tiny model with every weight moved off its initial value (norm weights off one,
    biases off zero), so that a dropped or misplaced tensor shows."""
    torch.manual_seed(0)
    gpt = GPT(tiny_config(**options)).eval()
    with torch.no_grad():
        for p in gpt.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return gpt


def export(tmp_path, name: str, gpt: GPT, tokenizer, *extra: str) -> int:
    save_checkpoint(tmp_path / f"{name}-ck", gpt, tokenizer)
    return main(["export", str(tmp_path / f"{name}-ck"), "--gguf", str(tmp_path / f"{name}.gguf"),
                 *extra])


def read(path) -> tuple[dict[str, torch.Tensor], dict[str, object], dict[str, str]]:
    """(tensors as fp32 torch tensors in torch layout, metadata values, tensor type names)."""
    reader = gguf.GGUFReader(path)
    tensors, types = {}, {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = [int(n) for n in reversed(t.shape)]
        tensors[t.name] = torch.from_numpy(data.copy()).float().reshape(shape)
        types[t.name] = t.tensor_type.name
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        meta[key] = value
    return tensors, meta, types


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf's LlamaModel.permute (interleaved rows back to rotate-half)."""
    return w.reshape(n_head, -1, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected(gpt: GPT, arch: str) -> dict[str, torch.Tensor]:
    """What the file must hold, from slms's modules, in llama.cpp's names (q and k as slms
    has them: the caller unpermutes)."""
    cfg, C = gpt.cfg, gpt.cfg.n_embd
    fold = math.sqrt(cfg.head_dim / C) if cfg.attn_scale == "n_embd" else 1.0
    out = {"token_embd.weight": gpt.wte.weight, "output_norm.weight": gpt.ln_f.weight}
    if not cfg.tie_weights:
        out["output.weight"] = gpt.lm_head.weight
    if arch == "gpt2":
        out |= {"position_embd.weight": gpt.wpe.weight, "output_norm.bias": gpt.ln_f.bias}
    for i, block in enumerate(gpt.blocks):
        p = f"blk.{i}."
        out[p + "attn_norm.weight"], out[p + "ffn_norm.weight"] = block.ln1.weight, block.ln2.weight
        q, k, v = block.attn.qkv.weight.split(C)
        out[p + "attn_output.weight"] = block.attn.proj.weight
        if arch == "gpt2":
            out[p + "attn_qkv.weight"] = torch.cat([q * fold, k, v])
            out[p + "attn_qkv.bias"] = torch.zeros(3 * C)  # qkv_bias false: zeros
            out |= {p + "attn_output.bias": block.attn.proj.bias,
                    p + "attn_norm.bias": block.ln1.bias, p + "ffn_norm.bias": block.ln2.bias,
                    p + "ffn_up.weight": block.ffn.fc.weight, p + "ffn_up.bias": block.ffn.fc.bias,
                    p + "ffn_down.weight": block.ffn.proj.weight,
                    p + "ffn_down.bias": block.ffn.proj.bias}
            continue
        out |= {p + "attn_q.weight": q * (1.0 if cfg.qk_norm else fold), p + "attn_k.weight": k,
                p + "attn_v.weight": v}
        if cfg.qk_norm:
            out[p + "attn_q_norm.weight"] = block.attn.q_norm.weight * fold
            out[p + "attn_k_norm.weight"] = block.attn.k_norm.weight
        if cfg.moe is not None:
            w1, w2 = block.ffn.experts.w1_EDH, block.ffn.experts.w2_EHD
            H = w2.size(1)
            out |= {p + "ffn_gate_inp.weight": block.ffn.router.gate.weight,
                    p + "ffn_gate_exps.weight": w1[:, :, :H].transpose(1, 2),
                    p + "ffn_up_exps.weight": w1[:, :, H:].transpose(1, 2),
                    p + "ffn_down_exps.weight": w2.transpose(1, 2)}
        elif cfg.activation == "swiglu":
            gate, up = block.ffn.fc.weight.chunk(2)
            out |= {p + "ffn_gate.weight": gate, p + "ffn_up.weight": up,
                    p + "ffn_down.weight": block.ffn.proj.weight}
        else:
            out |= {p + "ffn_up.weight": block.ffn.fc.weight,
                    p + "ffn_down.weight": block.ffn.proj.weight}
    return {k: v.detach().float() for k, v in out.items()}


@pytest.mark.parametrize("case", CASES)
def test_the_file_holds_every_weight_hyperparameter_and_the_tokenizer(tmp_path, tokenizer,
                                                                      capsys, case):
    options, arch = CASES[case]
    gpt = perturbed(**options)
    assert export(tmp_path, case, gpt, tokenizer) == 0
    out = capsys.readouterr().out
    assert f"llama.cpp architecture {arch}," in out and "llama-cli -m " in out
    tensors, meta, types = read(tmp_path / f"{case}.gguf")
    want = expected(gpt, arch)
    assert set(tensors) == set(want)
    for name, t in tensors.items():
        if arch in ("llama", "arcee") and name.endswith(("attn_q.weight", "attn_k.weight")):
            t = unpermute(t, gpt.cfg.n_head)
        assert torch.equal(t, want[name]), name
    assert set(types.values()) == {"F32"}
    cfg = gpt.cfg
    assert meta["general.architecture"] == arch
    assert meta[f"{arch}.block_count"] == cfg.n_layer
    assert meta[f"{arch}.context_length"] == cfg.block_size
    assert meta[f"{arch}.embedding_length"] == cfg.n_embd
    assert meta[f"{arch}.attention.head_count"] == cfg.n_head
    if arch != "gpt2":
        assert meta[f"{arch}.rope.freq_base"] == cfg.rope_base
        assert meta[f"{arch}.attention.layer_norm_rms_epsilon"] == torch.finfo(torch.float32).eps
        assert meta[f"{arch}.attention.head_count_kv"] == cfg.n_head
    if cfg.moe is not None:
        assert meta[f"{arch}.expert_count"] == cfg.moe.n_experts
        assert meta[f"{arch}.expert_used_count"] == cfg.moe.top_k
    vocab = {i: t for t, i in tokenizer.hf.get_vocab(with_added_tokens=True).items()}
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.tokens"] == [vocab[i] for i in range(cfg.vocab_size)]
    control = [i for i, t in enumerate(meta["tokenizer.ggml.token_type"])
               if t == gguf.TokenType.CONTROL]
    assert control == sorted(tokenizer.hf.get_added_tokens_decoder())
    merges = json.loads(tokenizer.hf.to_str())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m)
                                             for m in merges]
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        assert meta[f"tokenizer.ggml.{key}"] == tokenizer.eos_id
    assert meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.chat_template"].count("<|im_start|>") == 2


def test_outtypes_round_the_matrices_and_keep_vectors_in_f32(tmp_path, tokenizer):
    gpt = perturbed(**CASES["qwen3-moe"][0])
    save_checkpoint(tmp_path / "ck", gpt, tokenizer)
    f32, _, _ = read(_export_as(tmp_path, "f32"))
    for outtype in ("f16", "bf16", "q8_0"):
        tensors, meta, types = read(_export_as(tmp_path, outtype))
        assert meta["general.file_type"] == {"f16": 1, "bf16": 32, "q8_0": 7}[outtype]
        for name, t in tensors.items():
            want = f32[name]
            if want.dim() == 1 or ".ffn_gate_inp." in name:
                assert types[name] == "F32" and torch.equal(t, want), name
            elif outtype == "q8_0":
                # 32-value blocks, one f16 scale d = max|x| / 127 each: the error is at most
                # d / 2, plus 127 times the scale's own rounding (2^-11 of it)
                assert types[name] == "Q8_0", name
                blocks = want.reshape(-1, 32)
                err = (t.reshape(-1, 32) - blocks).abs().max(dim=1).values
                d = blocks.abs().max(dim=1).values / 127
                assert (err <= d * (0.5 + 127 * 2**-11) + 1e-8).all(), name
                assert (err > 0).any()  # rounded, not stored as they are
            else:
                dtype = torch.float16 if outtype == "f16" else torch.bfloat16
                assert types[name] == outtype.upper(), name
                assert torch.equal(t, want.to(dtype).float()), name


def test_the_cli_offers_the_outtypes_the_writer_has():
    from slms.commands.export import OUTTYPES
    from slms.export.llamacpp import OUTTYPES as WRITTEN

    assert OUTTYPES == tuple(WRITTEN)


def _export_as(tmp_path, outtype: str):
    out = tmp_path / f"model-{outtype}.gguf"
    assert main(["export", str(tmp_path / "ck"), "--gguf", str(out), "--outtype", outtype]) == 0
    return out


# name: (ModelConfig options, the text the one error line must hold)
REFUSED = {
    "apertus": ({**ROPE, "activation": "relu2", "qk_norm": True}, "xIELU"),
    "biases": ({**ROPE, "bias": True}, "model.bias=true: llama.cpp's llama takes no biases"),
    "gpt2-relu": ({"activation": "relu"}, "model.activation=relu: llama.cpp's gpt2 runs GELU"),
    "moe-every-2": ({**ROPE, "qk_norm": True, "moe": experts(router="topk", every=2)},
                    "model.moe.every=2"),
    "softcap": ({**ROPE, "logit_softcap": 30.0}, "no llama.cpp architecture computes this "
                "model: model.logit_softcap=30"),
    "ernie": ({**ROPE, "moe": experts(router="bias")}, "Ernie4_5_MoeForCausalLM"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_model_llama_cpp_cannot_run_is_one_line_and_no_file(tmp_path, tokenizer, capsys,
                                                              case):
    options, named = REFUSED[case]
    assert export(tmp_path, case, perturbed(**options), tokenizer) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slms: error: --gguf: ") and named in lines[0]
    assert captured.out == "" and not (tmp_path / f"{case}.gguf").exists()


def test_only_an_older_gguf_file_is_overwritten(tmp_path, tokenizer, capsys):
    gpt = perturbed(**CASES["qwen3"][0])
    save_checkpoint(tmp_path / "ck", gpt, tokenizer)
    weights = (tmp_path / "ck" / "model.safetensors").read_bytes()
    (tmp_path / "notes.txt").write_text("mine")
    for target, error in (("notes.txt", "exists and is not a GGUF file"),
                          ("ck", "is a directory"),
                          ("ck/model.gguf", "inside the checkpoint being exported"),
                          ("notes.txt/model.gguf", "notes.txt")):
        assert main(["export", str(tmp_path / "ck"), "--gguf", str(tmp_path / target)]) == 2
        assert error in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == weights
    assert main(["export", str(tmp_path / "ck"), "--gguf", str(tmp_path / "m.gguf")]) == 0
    assert main(["export", str(tmp_path / "ck"), "--gguf", str(tmp_path / "m.gguf"),
                 "--outtype", "f16"]) == 0  # an older GGUF: replaced
    assert read(tmp_path / "m.gguf")[1]["general.file_type"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "m.gguf", "notes.txt"]
    assert main(["export", str(tmp_path / "ck")]) == 2
    assert "--hf DIR (transformers) and/or --gguf FILE" in capsys.readouterr().err


def test_hf_and_gguf_together_and_the_card_names_the_file(tmp_path, tokenizer, capsys):
    pytest.importorskip("transformers")
    gpt = perturbed(**CASES["qwen3"][0])
    save_checkpoint(tmp_path / "ck", gpt, tokenizer)
    assert main(["export", str(tmp_path / "ck"), "--hf", str(tmp_path / "hf"), "--gguf",
                 str(tmp_path / "hf" / "model.gguf")]) == 0
    out = capsys.readouterr().out
    assert "Qwen3ForCausalLM" in out and "llama.cpp architecture qwen3" in out
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "llama-cli -m model.gguf" in card and "FROM ./model.gguf" in card


# Shapes transformers' GGUF loader can read back: it takes Qwen3's head_dim and Qwen3-MoE's
# expert width from its config defaults (128 and 768), not from the file.
WIDE = {"n_embd": 256, "n_head": 2}
LOADABLE = {
    "llama": {**ROPE, "attn_scale": "n_embd"},
    "qwen3": {**ROPE, **WIDE, "qk_norm": True},
    "qwen3-moe": {**ROPE, **WIDE, "qk_norm": True,
                  "moe": MoEConfig(n_experts=4, top_k=2, expert_hidden=1152, bias=False,
                                   router="topk")},
}


@pytest.mark.slow
@pytest.mark.parametrize("case", LOADABLE)
def test_transformers_gguf_loader_gives_slms_logits(tmp_path, tokenizer, case):
    transformers = pytest.importorskip("transformers")
    gpt = perturbed(**LOADABLE[case])
    assert export(tmp_path, case, gpt, tokenizer) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=f"{case}.gguf").eval()
    x = torch.randint(1, 300, (2, 24), generator=torch.Generator().manual_seed(3))
    x[:, 0] = tokenizer.eos_id
    with torch.no_grad():
        want = gpt(x).logits
        assert (model(x).logits - want).abs().max() <= 1e-4
    assert want.std() > 0.05


@pytest.mark.slow
@pytest.mark.parametrize("case", ["qwen3", "qwen3-moe"])
def test_llama_cpp_gives_slms_greedy_tokens(tmp_path, tokenizer, case):
    """Runs where llama-cpp-python is installed (CI does not build it)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    gpt = perturbed(**CASES[case][0], block_size=64)
    assert export(tmp_path, case, gpt, tokenizer) == 0
    llm = llama_cpp.Llama(model_path=str(tmp_path / f"{case}.gguf"), n_ctx=gpt.cfg.block_size,
                          verbose=False)
    ids = llm.tokenize(TEXT.encode(), add_bos=True, special=False)
    assert ids == tokenizer.encode_prompt(TEXT)
    want = gpt.generate(torch.tensor([ids]), GREEDY, temperature=0)[0, len(ids):].tolist()
    got = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        got.append(token)
        if len(got) == len(want):
            break
    assert got == want and len(got) == GREEDY


def test_without_the_gguf_package_the_error_names_the_extra(tmp_path, tokenizer, capsys,
                                                            monkeypatch):
    import importlib.util

    save_checkpoint(tmp_path / "ck", perturbed(**CASES["qwen3"][0]), tokenizer)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real(name, *a))
    assert main(["export", str(tmp_path / "ck"), "--gguf", str(tmp_path / "m.gguf")]) == 2
    assert "pip install 'slms[gguf]'" in capsys.readouterr().err
