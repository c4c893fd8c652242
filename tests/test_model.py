import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from slms.config import ModelConfig, MoEConfig
from slms.model import GPT, IGNORE_INDEX, count_params, flops_per_token
from slms.model.gpt import MLP
from slms.model.moe import MoE


def test_loss_equals_hand_computed_cross_entropy():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    x = torch.randint(0, 300, (2, 10))
    y = torch.randint(0, 300, (2, 10))
    y[1, 6:] = IGNORE_INDEX  # padding never counts
    out = model(x, y)
    logp = out.logits.log_softmax(-1)
    nats = [-logp[b, t, y[b, t]] for b in range(2) for t in range(10) if y[b, t] != IGNORE_INDEX]
    assert len(nats) == 16
    assert out.loss.item() == pytest.approx(torch.stack(nats).mean().item(), rel=1e-6)


def test_initial_loss_is_near_uniform():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    x, y = torch.randint(0, 300, (2, 4, 32))
    assert model(x, y).loss.item() == pytest.approx(math.log(300), abs=0.1)


def test_moe_one_expert_top1_equals_dense_mlp():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, n_embd=32, n_head=4, n_layer=1)
    mlp = MLP(cfg)
    moe = MoE(32, MoEConfig(n_experts=1, top_k=1, router="topk"), hidden=128, activation="relu")
    with torch.no_grad():
        moe.experts.w1_EDH[0].copy_(mlp.fc.weight.T)
        moe.experts.b1_EH[0].copy_(mlp.fc.bias)
        moe.experts.w2_EHD[0].copy_(mlp.proj.weight.T)
        moe.experts.b2_ED[0].copy_(mlp.proj.bias)
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(moe(x)[0], mlp(x)[0], rtol=1e-5, atol=1e-6)


def test_causal_no_future_leak():
    torch.manual_seed(0)
    model = GPT(tiny_config(moe=True)).eval()
    x = torch.randint(0, 300, (1, 12))
    x2 = x.clone()
    x2[0, 8:] = (x2[0, 8:] + 1) % 300
    torch.testing.assert_close(model(x).logits[:, :8], model(x2).logits[:, :8])


@pytest.mark.parametrize("moe", [False, True])
def test_kv_cache_matches_full_recomputation(moe):
    torch.manual_seed(0)
    model = GPT(tiny_config(moe=moe)).eval()
    x = torch.randint(0, 300, (2, 20))
    full = model(x).logits
    caches = model.new_caches(2, 20)
    parts = [model(x[:, :9], caches=caches).logits]
    parts += [model(x[:, t:t + 1], caches=caches).logits for t in range(9, 15)]
    parts += [model(x[:, 15:], caches=caches).logits]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-5)


def test_generate_greedy_cache_equals_no_cache_and_stops_at_eos():
    torch.manual_seed(0)
    model = GPT(tiny_config(moe=True)).eval()
    x = torch.randint(0, 300, (3, 5))
    a = model.generate(x, 12, temperature=0)
    b = model.generate(x, 12, temperature=0, use_cache=False)
    assert torch.equal(a, b) and a.shape == (3, 17)
    eos = int(a[0, 7])  # the token row 0 produces third: use it as "end of text"
    c = model.generate(x, 12, temperature=0, eos_id=eos)
    assert (c[0, 7:] == eos).all()


def test_generate_seeded_sampling_is_deterministic():
    model = GPT(tiny_config(moe=True)).eval()
    x = torch.zeros(1, 1, dtype=torch.long)
    a = model.generate(x, 10, top_k=20, generator=torch.Generator().manual_seed(5))
    b = model.generate(x, 10, top_k=20, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_context_overflow_is_a_clear_error():
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match="context"):
        model.generate(torch.zeros(1, 30, dtype=torch.long), 5)


def test_param_counts_against_hand_count():
    cfg = tiny_config(moe=True, tie_weights=True)
    counts = count_params(GPT(cfg))
    C, V, T, H, E, K = 32, 300, 32, 64, 4, 2
    attn = 3 * C * C + 3 * C + C * C + C
    ln = 2 * C
    expert = C * H + H + H * C + C
    router = 2 * (C * E + E)  # gate + noise
    block_total = attn + 2 * ln + E * expert + router
    total = V * C + T * C + 2 * block_total + ln  # tied lm_head has no bias
    assert counts["params_total"] == total
    assert counts["params_active"] == total - 2 * (E - K) * expert


def test_seed_moe_true_parameter_count():
    from slms.config import load_config

    cfg = load_config("configs/seed-moe.toml").model
    with torch.device("meta"):
        counts = count_params(GPT(cfg))
    assert counts["params_total"] == 54_992_576  # the seed's README says "134.6M"
    assert counts["params_active"] == 17_151_680


def counted_flops(model: GPT, B: int, T: int, monkeypatch: pytest.MonkeyPatch
                  ) -> tuple[int, int]:
    """(all, attention bmm) FLOPs that torch's FlopCounterMode counts in one training forward +
    backward of B x T random tokens. Attention runs the math path, whose q @ k^T and att @ v
    are bmm's over the full T x T matrix (CPU's fused kernel is not counted); the C++ MoE
    kernels are off (custom ops are not counted either), and so is kernel timing (its runs
    would be counted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from slms.model import native

    monkeypatch.setattr(native, "_tried", True)  # native.ops() returns _ops without building
    monkeypatch.setattr(native, "_ops", None)
    monkeypatch.setenv("SLMS_TUNE", "0")
    x = torch.randint(0, model.cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model.train()(x, x)
        (out.loss + out.aux_loss).backward()
    return counter.get_total_flops(), counter.get_flop_counts()["Global"][torch.ops.aten.bmm]


@pytest.mark.parametrize("moe,T", [
    (None, 16), (None, 8),
    (MoEConfig(n_experts=4, top_k=2, expert_hidden=64, router="noisy_topk"), 16),
    (MoEConfig(n_experts=4, top_k=2, router="topk", every=2), 16),  # layer 0 dense, 1 MoE
])
def test_flops_per_token_equals_the_counted_flops(moe, T, monkeypatch):
    """flops_per_token is what torch counts in a training step, to the FLOP: 6 x matmul weights
    (router matmuls and top_k experts included) + 12 L C T for attention, counted non-causal
    (PaLM's convention), which is what the math path computes."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=128, block_size=16, n_layer=2, n_head=4, n_embd=32, moe=moe)
    B = 2
    total, attention = counted_flops(GPT(cfg), B, T, monkeypatch)
    assert attention == 12 * cfg.n_layer * cfg.n_embd * T * B * T  # the full T x T, both ways
    assert total == flops_per_token(cfg, context=T) * B * T


def test_dropout_only_in_training():
    model = GPT(tiny_config(dropout=0.5, moe=True))
    x = torch.randint(0, 300, (2, 8))
    model.eval()
    assert torch.equal(model(x).logits, model(x).logits)
    model.train()
    assert not torch.equal(model(x).logits, model(x).logits)


def test_seed_attention_scale_is_expressible():
    torch.manual_seed(0)
    cfg = tiny_config(attn_scale="n_embd")
    model = GPT(cfg).eval()
    attn = model.blocks[0].attn
    x = torch.randn(1, 6, 32)
    q, k, v = attn.qkv(x).split(32, dim=2)
    q, k, v = (t.view(1, 6, 4, 8).transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-1, -2)) * 32 ** -0.5
    scores = scores.masked_fill(torch.ones(6, 6).triu(1).bool(), float("-inf"))
    y = (F.softmax(scores, -1) @ v).transpose(1, 2).reshape(1, 6, 32)
    torch.testing.assert_close(attn(x), attn.proj(y))


def test_pads_skipping_the_experts_change_nothing_at_real_positions():
    """Rows padded at their end: with real_BT the pads skip the MoE experts, and the logits at
    real positions and the loss are those of the full computation."""
    torch.manual_seed(0)
    model = GPT(tiny_config(moe=True)).eval()
    x = torch.randint(0, 300, (3, 20))
    y = torch.randint(0, 300, (3, 20))
    for row, n in enumerate((20, 12, 5)):
        y[row, n:] = IGNORE_INDEX
    real = y != IGNORE_INDEX
    full = model(x, y)
    skipped = model(x, y, real_BT=real)
    torch.testing.assert_close(skipped.logits[real], full.logits[real], rtol=1e-5, atol=1e-5)
    assert skipped.loss.item() == pytest.approx(full.loss.item(), rel=1e-6)
    real[1, 3] = False  # a hole before a real position: not rows padded at their end
    with pytest.raises(ValueError, match="real positions first"):
        model(x, y, real_BT=real)
