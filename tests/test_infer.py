"""Generation: KV cache vs recomputation at every step, greedy stability, batch vs row by row,
seeded sampling, streaming text."""

import pytest
import torch

import slms.model.gpt as gpt_module
import slms.model.moe_dispatch as moe_dispatch
from conftest import assert_cached_decoding_equals_full_forward, tiny_config
from slms.infer.generate import Sampling, generate_text, prompt_ids, stream_text
from slms.model import GPT, native


def _model(moe: bool, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config(moe=moe, **kw)).eval()


def _step_logits(model, x, n, monkeypatch, **kw) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Generate n tokens; also return the logits every sampling step saw."""
    seen: list[torch.Tensor] = []
    real = gpt_module.sample_next

    def spy(logits_BV, *a, **k):
        seen.append(logits_BV.clone())
        return real(logits_BV, *a, **k)

    monkeypatch.setattr(gpt_module, "sample_next", spy)
    out = model.generate(x, n, **kw)
    monkeypatch.setattr(gpt_module, "sample_next", real)
    return out, seen


@pytest.mark.parametrize("moe", [False, True])
def test_cached_logits_equal_recomputation_at_every_step(moe, monkeypatch):
    model = _model(moe)
    x = torch.randint(0, 300, (2, 6))
    monkeypatch.setenv("SLMS_NATIVE", "1")  # the kernels without timing them (timing calls decode)
    decoded = []
    decode = moe_dispatch.native_decode
    monkeypatch.setattr(moe_dispatch, "native_decode",
                        lambda *a: (decoded.append(a[0].shape[0]), decode(*a))[1])
    gen = torch.Generator().manual_seed(1)
    a, cached = _step_logits(model, x, 20, monkeypatch, temperature=1.0, generator=gen,
                             use_cache=True)
    decoded_cached = list(decoded)
    gen = torch.Generator().manual_seed(1)
    b, full = _step_logits(model, x, 20, monkeypatch, temperature=1.0, generator=gen,
                           use_cache=False)
    assert torch.equal(a, b) and len(cached) == len(full) == 20
    if moe and native.ops() is not None:
        # the decode steps (2 rows each) ran the C++ decode kernel in every MoE layer
        assert decoded_cached.count(2) == 19 * len(model.moe_layers())
    for step, (lc, lf) in enumerate(zip(cached, full, strict=True)):
        torch.testing.assert_close(lc, lf, rtol=1e-4, atol=1e-5, msg=f"step {step}")
    # and each step's logits are those of one full forward over the sequence so far
    for step in range(20):
        ref = model(a[:, :6 + step]).logits[:, -1]
        torch.testing.assert_close(cached[step], ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("moe", [False, True])
def test_greedy_is_identical_across_runs_and_ignores_the_seed(moe):
    model = _model(moe)
    x = torch.randint(0, 300, (1, 4))
    runs = [model.generate(x, 16, temperature=0, generator=torch.Generator().manual_seed(s))
            for s in (0, 1, 2)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


def test_generation_is_unaffected_by_train_mode():
    model = _model(True, dropout=0.3)
    x = torch.randint(0, 300, (1, 4))
    a = model.generate(x, 10, temperature=0)
    model.train()  # generate switches to eval (no dropout, no router noise) and back
    b = model.generate(x, 10, temperature=0)
    assert torch.equal(a, b) and model.training


@pytest.mark.slow
@pytest.mark.parametrize("moe", [False, True])
def test_batch_equals_row_by_row_with_per_row_stopping(moe):
    model = _model(moe, seed=3)
    x = torch.randint(0, 300, (4, 5))
    free = model.generate(x, 12, temperature=0)
    eos = int(free[1, 5 + 3])  # row 1's fourth new token ends its story
    batch = model.generate(x, 12, temperature=0, eos_id=eos)
    for i in range(4):
        row = model.generate(x[i:i + 1], 12, temperature=0, eos_id=eos)[0]
        n = row.numel()
        assert torch.equal(batch[i, :n], row)
        assert (batch[i, n:] == eos).all()  # a stopped row is filled with eos
    assert (batch[1, 8:] == eos).all()


def test_seeded_sampling_is_deterministic_and_depends_on_the_seed(tokenizer):
    model = _model(True, block_size=64)
    ids = prompt_ids(tokenizer, "Once upon a time", 64, 20)
    s = Sampling(max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.95,
                 repetition_penalty=1.2, seed=7)
    a = "".join(stream_text(model, tokenizer, ids, s))
    b = "".join(stream_text(model, tokenizer, ids, s))
    c = "".join(stream_text(model, tokenizer, ids, Sampling(20, 1.0, 50, 0.95, 1.2, seed=8)))
    assert a == b and a != c and a


def test_streamed_pieces_join_to_the_decoded_text(tokenizer):
    model = _model(False)
    s = Sampling(max_new_tokens=15, temperature=0)
    ids = prompt_ids(tokenizer, "The dog", 32, 15)
    pieces = list(stream_text(model, tokenizer, ids, s))
    new = model.generate(torch.tensor([ids]), 15, temperature=0,
                         eos_id=tokenizer.eos_id)[0, len(ids):].tolist()
    new = new[:new.index(tokenizer.eos_id)] if tokenizer.eos_id in new else new
    assert "".join(pieces) == tokenizer.decode(new)
    assert generate_text(model, tokenizer, "The dog", s) == "".join(pieces)


def test_top_p_and_top_k_keep_only_allowed_tokens():
    from slms.model.sampling import sample_next

    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0, -2.0]])
    gen = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, 1.0, top_p=0.7, generator=gen)) for _ in range(200)}
    assert picks == {0}  # p(0) ~ 0.71 already covers 0.7
    picks = {int(sample_next(logits, 1.0, top_k=2, generator=gen)) for _ in range(200)}
    assert picks == {0, 1}
    # repetition penalty: a seen token's positive logit is divided
    assert int(sample_next(logits, 0, repetition_penalty=2.0,
                           history_BT=torch.tensor([[0]]))) == 1


def test_left_truncation_keeps_the_start_token(tokenizer):
    prompt = "Once upon a time there was a little dog who liked to run in the park every day."
    ids = tokenizer.encode(prompt)
    warned = []
    got = prompt_ids(tokenizer, prompt, 24, 16, truncate="left", warn=warned.append)
    assert got == [tokenizer.eos_id, *ids[-7:]] and len(got) == 24 - 16
    assert warned == ["warning: prompt truncated to its last 7 tokens"]
    with pytest.raises(ValueError, match="no room for the prompt"):
        prompt_ids(tokenizer, prompt, 24, 23, truncate="left")


def test_cached_generation_equals_uncached_with_a_capacity_factor():
    """With moe.capacity_factor > 0, a cached decoding step (one token per row) would get
    capacity 0 and zero MoE outputs if capacity applied outside training."""
    from slms.config import MoEConfig

    torch.manual_seed(0)
    moe = MoEConfig(n_experts=4, top_k=2, expert_hidden=64, capacity_factor=1.0)
    model = GPT(tiny_config(moe=moe)).eval()
    seq = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(1))
    assert_cached_decoding_equals_full_forward(model, seq, 4)


@pytest.mark.parametrize("temperature,penalty", [(1e-300, 1.0), (5e-324, 1.0), (1.0, 1e-300),
                                                 (1e-300, 5e-324), (1e300, 1e300)])
def test_extreme_finite_sampling_values_sample_a_token(temperature, penalty):
    """Settings that overflowed float32 logits to inf/nan (found by the server fuzz test)
    sample a token; a near-zero temperature is the argmax (a penalty < 1 favours the seen
    token, and one that makes its logit overflow leaves it the best)."""
    from slms.model.sampling import sample_next

    logits = torch.tensor([[1.0, 3.0, -2.0, 0.5]])
    history = torch.tensor([[1]])
    gen = torch.Generator().manual_seed(0)
    token = int(sample_next(logits, temperature, repetition_penalty=penalty,
                            history_BT=history, generator=gen))
    assert 0 <= token < 4
    if temperature < 1e-100:
        assert token == 1
