"""The modern architecture options (rotary positions, RMSNorm, QK-norm, ReLU^2, SwiGLU,
zero-initialised projections, logit soft-capping): shapes, parameters, FLOPs, cached decoding,
the transformers wrapper, and the seed's configurations unchanged."""

import dataclasses

import pytest
import torch

from conftest import assert_cached_decoding_equals_full_forward, assert_rows_decode_as_each_alone
from slms.config import ConfigError, ModelConfig, MoEConfig, load_config
from slms.model import GPT, count_params, flops_per_token
from test_model import counted_flops

BASE = dict(vocab_size=128, block_size=24, n_layer=2, n_head=4, n_embd=32)
OPTIONS = [
    {},
    {"positions": "rope"},
    {"norm": "rmsnorm", "qk_norm": True},
    {"activation": "relu2"},
    {"activation": "swiglu"},
    {"positions": "rope", "norm": "rmsnorm", "qk_norm": True, "activation": "relu2",
     "logit_softcap": 15.0, "tie_weights": False},
    {"activation": "relu2", "moe": MoEConfig(n_experts=4, top_k=2, expert_hidden=48)},
    {"activation": "swiglu", "positions": "rope", "zero_init_proj": True,
     "moe": MoEConfig(n_experts=4, top_k=2, router="topk", expert_hidden=48)},
]


def option_id(options: dict) -> str:
    return ",".join(f"{k}={v}" if k == "activation" else k for k, v in options.items()) or "-"


def model_with(seed: int = 0, **options) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**BASE, **options)).eval()
    with torch.no_grad():  # non-zero norm weights and biases, so that every option shows
        for name, p in model.named_parameters():
            if "norm" in name or name.startswith("ln") or ".ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: option_id(o))
def test_cached_decoding_equals_the_full_forward(options):
    model = model_with(**options)
    seq = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    assert model(seq).logits.shape == (2, 20, 128)
    assert_cached_decoding_equals_full_forward(model, seq, 7)


@pytest.mark.parametrize("options", [*OPTIONS, {"positions": "rope", "document_mask": True}],
                         ids=lambda o: option_id(o))
def test_rows_at_their_own_positions_decode_through_the_one_forward(options):
    assert_rows_decode_as_each_alone(model_with(**options), 128)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: option_id(o))
def test_flops_per_token_counts_every_option(options, monkeypatch):
    model = model_with(**options)
    total, _ = counted_flops(model, 2, 16, monkeypatch)
    assert total == flops_per_token(model.cfg, 16) * 2 * 16


def test_rope_has_no_position_embedding_and_sees_relative_positions():
    model = model_with(positions="rope")
    assert model.wpe is None and "wpe.weight" not in model.state_dict()
    # attention scores depend on relative positions only: one token's rotated q.k with itself
    from slms.model.attention import apply_rope, rope_tables

    q = torch.randn(1, 1, 1, 8)
    scores = []
    for start in (0, 5, 17):
        cos, sin = rope_tables(torch.tensor([start]), 8, 10000.0)
        r = apply_rope(q, cos, sin)
        scores.append(float((r * r).sum()))
    assert scores == pytest.approx([float((q * q).sum())] * 3, rel=1e-5)


def test_swiglu_matches_the_parameters_of_a_two_matrix_mlp():
    plain = count_params(model_with())["params_total"]
    gated = count_params(model_with(activation="swiglu"))["params_total"]
    assert abs(gated - plain) / plain < 0.01
    mlp = model_with(activation="swiglu").blocks[0].ffn
    assert mlp.fc.out_features == 2 * mlp.proj.in_features == 2 * (2 * 128 // 3)


def test_zero_init_projections_make_every_block_the_identity_at_start():
    model = GPT(ModelConfig(**BASE, zero_init_proj=True, positions="rope"))
    for block in model.blocks:
        assert not block.attn.proj.weight.any() and not block.ffn.proj.weight.any()
    x = torch.randn(2, 5, 32)
    for block in model.blocks:
        torch.testing.assert_close(block(x)[0], x)


def test_logit_softcap_bounds_the_logits():
    model = model_with(logit_softcap=2.0)
    with torch.no_grad():
        model.lm_head.weight.mul_(100)
        logits = model(torch.randint(0, 128, (1, 9))).logits
    assert logits.abs().max() <= 2.0 and logits.abs().max() > 1.5


@pytest.mark.parametrize("options", OPTIONS[1:], ids=lambda o: option_id(o))
def test_the_transformers_wrapper_gives_the_same_logits(options, tmp_path, tokenizer):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from slms.hf import export_hf  # importing slms.hf registers the model type

    cfg = dataclasses.replace(ModelConfig(**BASE, **options), vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    export_hf(model, tokenizer, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x).logits, rtol=1e-5, atol=1e-6)
        out = hf.generate(x[:, :4], max_new_tokens=6, do_sample=False)
    assert torch.equal(out, model.generate(x[:, :4], 6, temperature=0))


def test_the_seed_presets_are_unchanged():
    """The seed's shapes keep their exact parameter counts (measured before the options)."""
    counts = {}
    for name in ("seed-moe", "seed-dense"):
        cfg = load_config(f"configs/{name}.toml", ["model.vocab_size=2048"]).model
        counts[name] = count_params(GPT(cfg))["params_total"]
        assert (cfg.positions, cfg.norm, cfg.qk_norm, cfg.zero_init_proj) == (
            "learned", "layernorm", False, False)
    assert counts == {"seed-moe": 54_992_576, "seed-dense": 10_795_520}


@pytest.mark.parametrize("key,value", [("positions", "alibi"), ("norm", "batch"),
                                       ("activation", "tanh"), ("logit_softcap", -1.0)])
def test_bad_option_values_are_refused(key, value):
    with pytest.raises(ConfigError, match=f"model.{key}"):
        ModelConfig(**BASE, **{key: value}).validate()


def test_rmsnorm_weights_follow_the_input_dtype_under_autocast(monkeypatch):
    """Under bf16 autocast q and k reach QK-norm in bf16: its weight is cast to match, so torch
    runs its fused kernel (a float32 weight takes the unfused one, with a warning)."""
    import torch.nn.functional as F

    calls = []
    rms_norm = F.rms_norm
    monkeypatch.setattr(F, "rms_norm", lambda x, shape, w=None, eps=None: (
        calls.append((x.dtype, w.dtype)), rms_norm(x, shape, w, eps))[1])
    model = GPT(ModelConfig(**BASE, norm="rmsnorm", qk_norm=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 128, (2, 8)))[0].float().sum().backward()
    assert {x for x, _ in calls} == {torch.float32, torch.bfloat16}  # the stream, and q and k
    assert all(x == w for x, w in calls)
    assert model.blocks[0].attn.q_norm.weight.grad.dtype == torch.float32


def test_rms_norm_passes_float32_eps_whatever_the_input_dtype(monkeypatch):
    """eps=None is float32's eps passed explicitly (older torch took 2**-7 for bf16 q/k),
    and equals the float32 formula on small bf16 inputs, where 2**-7 would not."""
    import torch.nn.functional as F

    from slms.model import attention

    seen = []
    rms_norm = F.rms_norm
    monkeypatch.setattr(attention.F, "rms_norm",
                        lambda x, shape, w, eps: seen.append(eps) or rms_norm(x, shape, w, eps))
    norm = attention.RMSNorm(16)
    x = (torch.randn(4, 16, generator=torch.Generator().manual_seed(0)) * 0.01).bfloat16()
    got = norm(x).float()
    assert seen == [torch.finfo(torch.float32).eps]
    xf = x.float()
    want = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-2)
