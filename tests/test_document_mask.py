"""model.document_mask: in packed rows a token attends only to earlier tokens of its own
document (documents begin at <|endoftext|>, id 0). A packed row's logits equal each story's
alone (at the same positions: they stay absolute), cached decoding keeps the mask, off changes
nothing, and configs and checkpoints without the key load as before."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from conftest import assert_cached_decoding_equals_full_forward, tiny_config
from slms.checkpoint import load_checkpoint, save_checkpoint
from slms.config import (
    ConfigError,
    ModelConfig,
    MoEConfig,
    load_config,
    model_config_diff,
    model_config_from_dict,
    run_config_from_dict,
)
from slms.model import GPT, flops_per_token
from slms.model.gpt import DOCUMENT_START_ID, document_starts

EOT = DOCUMENT_START_ID
CASES = {
    "learned": {},
    "rope": {"positions": "rope", "norm": "rmsnorm", "qk_norm": True, "activation": "relu2"},
    "rope-moe": {"positions": "rope", "moe": MoEConfig(n_experts=4, top_k=2, router="topk",
                                                       expert_hidden=48)},
}
# a window cut from packed data: the tail of one story, then two whole ones (each begins at
# <|endoftext|>); the segments' (start, end) positions
SEGMENTS = [(0, 5), (5, 13), (13, 24)]


def model_with(seed: int = 0, **options) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=128, block_size=32, n_layer=2, n_head=4, n_embd=32,
                      document_mask=True, **options)
    return GPT(cfg).eval()


def packed_row(B: int = 1, seed: int = 1) -> torch.Tensor:
    row = torch.randint(1, 128, (B, SEGMENTS[-1][1]), generator=torch.Generator().manual_seed(seed))
    for a, _ in SEGMENTS[1:]:
        row[:, a] = EOT
    return row


def alone(model: GPT, seg: torch.Tensor, offset: int) -> torch.Tensor:
    """Logits of `seg` run by itself, at positions offset .. offset + len - 1. Rotary
    attention depends on relative positions only: run at 0. Learned positions: a copy whose
    position table is shifted by `offset`, run at 0 (exactly the embeddings of the offset)."""
    if model.wpe is not None:
        model = copy.deepcopy(model)
        with torch.no_grad():
            table = model.wpe.weight
            table[:table.size(0) - offset] = table[offset:].clone()
    with torch.no_grad():
        return model(seg).logits


@pytest.mark.parametrize("case", CASES)
def test_a_packed_row_equals_each_story_alone(case):
    model = model_with(**CASES[case])
    row = packed_row(B=2)
    with torch.no_grad():
        packed = model(row).logits
    for a, b in SEGMENTS:
        got = alone(model, row[:, a:b], a)
        # learned positions: the same sums in the same order; rotary: cos/sin of other angles
        tol = 1e-6 if model.wpe is not None else 1e-5
        torch.testing.assert_close(packed[:, a:b], got, rtol=tol, atol=tol)


def test_without_the_mask_the_stories_see_each_other():
    on = model_with()
    off = GPT(dataclasses.replace(on.cfg, document_mask=False)).eval()
    off.load_state_dict(on.state_dict())  # no new parameters or buffers
    row = packed_row()
    with torch.no_grad():
        a, b = on(row).logits, off(row).logits
        # one document (<|endoftext|> only first): the mask is the causal one
        one = row[:, 5:13]
        torch.testing.assert_close(on(one).logits, off(one).logits, rtol=1e-6, atol=1e-6)
    # the first story's tail is alike; from the next <|endoftext|> on the masks differ
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=1e-6, atol=1e-6)
    assert (a[:, 5:] - b[:, 5:]).abs().amax(-1).min() > 1e-3


def test_document_starts_and_the_mask():
    idx = torch.tensor([[5, EOT, 7, 8, EOT, 9], [EOT, 1, 2, 3, 4, 5]])
    assert document_starts(idx, torch.arange(6), None).tolist() == [[0, 1, 1, 1, 4, 4], [0] * 6]
    # a cache: positions 10.., the row's last document began at 8 (row 0) and 0 (row 1)
    prev = torch.tensor([8, 0])
    pos = torch.arange(10, 16)
    assert document_starts(idx, pos, prev).tolist() == [[8, 11, 11, 11, 14, 14], [10] * 6]
    # rows at their own positions (a server's slots): row 1 is at 3.., its document began at 2
    pos_BT = torch.stack([pos, torch.arange(3, 9)])
    assert document_starts(idx, pos_BT, torch.tensor([8, 2])).tolist() == [
        [8, 11, 11, 11, 14, 14], [3] * 6]


@pytest.mark.parametrize("case", CASES)
def test_cached_decoding_keeps_the_mask(case):
    model = model_with(**CASES[case])
    seq = packed_row(B=2)
    seq[1, 9] = EOT  # rows with their own boundaries, before and after the prompt's end
    seq[0, 18] = EOT
    assert_cached_decoding_equals_full_forward(model, seq[:, :20], 8)


def test_generation_past_a_generated_end_of_text_keeps_the_mask():
    model = model_with(tie_weights=False)
    with torch.no_grad():  # <|endoftext|> sampled now and then
        model.lm_head.bias[EOT] = 4.0
    prompt = packed_row(B=2)[:, 3:9]

    def sample(use_cache: bool) -> torch.Tensor:
        gen = torch.Generator().manual_seed(3)
        return model.generate(prompt, 20, generator=gen, use_cache=use_cache)

    cached = sample(True)
    assert torch.equal(cached, sample(False))
    new = cached[:, 6:]
    assert bool(((new[:, :-1] == EOT) & (new[:, 1:] != EOT)).any())  # a story after one ended


def test_padded_rows_give_the_real_positions_unchanged():
    model = model_with(moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=48))
    row = packed_row()[:, 5:13]  # one story: <|endoftext|> first, as padded rows hold them
    padded = torch.cat([row, torch.full((1, 6), EOT)], dim=1)  # pads are <|endoftext|> ids
    real = torch.arange(14)[None] < 8
    with torch.no_grad():
        torch.testing.assert_close(model(padded, real_BT=real).logits[:, :8], model(row).logits,
                                   rtol=1e-6, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = model_with().train()
    row = packed_row(B=2)
    x, y = row[:, :-1], row[:, 1:]
    plain = model(x, y).loss
    grads = torch.autograd.grad(plain, list(model.parameters()))
    model.grad_checkpointing = True
    again = model(x, y).loss
    torch.testing.assert_close(again, plain)
    for g, h in zip(grads, torch.autograd.grad(again, list(model.parameters())), strict=True):
        torch.testing.assert_close(g, h)


def test_flops_follow_the_full_attention_convention():
    # the counted convention is full T x T attention, mask or not
    cfg = tiny_config()
    assert flops_per_token(dataclasses.replace(cfg, document_mask=True)) == flops_per_token(cfg)


def test_config_round_trip_and_errors():
    cfg = load_config(None, ["model.document_mask=true", "model.vocab_size=300"])
    assert cfg.model.document_mask is True
    assert run_config_from_dict(cfg.to_dict()) == cfg
    assert load_config(None).model.document_mask is False
    with pytest.raises(ConfigError, match="model.document_mask"):
        load_config(None, ["model.document_mask=3"])
    off = cfg.model.__class__(**{**dataclasses.asdict(cfg.model), "document_mask": False})
    assert model_config_diff(off, cfg.model) == [("model.document_mask", False, True)]


def test_old_configs_and_checkpoints_load_as_before(tmp_path, tokenizer):
    assert tokenizer.eos_id == DOCUMENT_START_ID  # the id slms tokenizers give <|endoftext|>
    torch.manual_seed(0)
    gpt = GPT(tiny_config()).eval()
    save_checkpoint(tmp_path / "ck", gpt, tokenizer)
    f = tmp_path / "ck" / "config.json"
    meta = json.loads(f.read_text())
    del meta["model"]["document_mask"]  # written before the option existed
    f.write_text(json.dumps(meta))
    loaded, _, _ = load_checkpoint(tmp_path / "ck")
    assert loaded.cfg == gpt.cfg and loaded.cfg.document_mask is False
    assert model_config_from_dict(meta["model"]) == gpt.cfg
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, gpt(x).logits)


def test_transformers_export_computes_the_same_logits_and_generation(tmp_path, tokenizer):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from slms.hf import export_hf

    torch.manual_seed(0)
    gpt = GPT(tiny_config(block_size=64, document_mask=True, positions="rope")).eval()
    hf = AutoModelForCausalLM.from_pretrained(export_hf(gpt, tokenizer, tmp_path / "hf")).eval()
    assert hf.config.document_mask is True
    row = torch.randint(1, 300, (2, 24))
    row[:, [0, 9, 17]] = EOT
    with torch.no_grad():
        want = gpt(row).logits
        assert torch.equal(hf(row).logits, want)  # the default cache is left out here
        assert torch.equal(hf(row, use_cache=False).logits, want)
        one = row[:, :9]  # one story: the cache is used and exact
        got = hf.generate(one, max_new_tokens=12, do_sample=False)
        assert got.tolist() == gpt.generate(one, 12, temperature=0, eos_id=EOT).tolist()
        with pytest.raises(ValueError, match="holds one document"):
            hf.generate(row[:, :12], max_new_tokens=4, do_sample=False)
        got = hf.generate(row[:, :12], max_new_tokens=4, do_sample=False, use_cache=False)
        assert got.tolist() == gpt.generate(row[:, :12], 4, temperature=0, eos_id=EOT).tolist()


def test_export_refuses_a_tokenizer_whose_end_of_text_is_another_id(tmp_path, tokenizer):
    pytest.importorskip("transformers")
    from slms.hf import export_hf

    tok = copy.copy(tokenizer)
    tok.eos_id = 5
    with pytest.raises(ValueError, match="splits documents at token id 0"):
        export_hf(GPT(tiny_config(document_mask=True)), tok, tmp_path / "hf")
