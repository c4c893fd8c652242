"""Hugging Face integration: `slms export --hf`, then transformers' Auto classes give the slms
model's logits, loss and greedy generation (with the KV cache), and its tokenizer."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import slms  # noqa: E402,F401  (registers model_type slms)
from conftest import tiny_config  # noqa: E402
from slms.cli import main  # noqa: E402
from slms.config import MoEConfig  # noqa: E402
from slms.model import GPT  # noqa: E402
from slms.train.checkpoint import save_checkpoint  # noqa: E402

CASES = {  # name: (ModelConfig overrides)
    "dense-tied": {},
    "dense-untied": {"tie_weights": False},
    "moe-tied": {"moe": MoEConfig(n_experts=4, top_k=2, expert_hidden=64)},
    "moe-untied-bias-router": {"tie_weights": False,
                               "moe": MoEConfig(n_experts=4, top_k=2, router="bias")},
}


def export(tmp_path, tokenizer, **kw) -> tuple[GPT, torch.nn.Module]:
    """(slms model, the model transformers loads from its `slms export --hf` directory)."""
    torch.manual_seed(0)
    gpt = GPT(tiny_config(block_size=64, **kw)).eval()
    save_checkpoint(tmp_path / "ck", gpt, tokenizer)
    assert main(["export", str(tmp_path / "ck"), "--hf", str(tmp_path / "hf")]) == 0
    return gpt, AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()


@pytest.mark.parametrize("case", CASES)
def test_export_then_from_pretrained_gives_slms_logits(tmp_path, tokenizer, case):
    gpt, hf = export(tmp_path, tokenizer, **CASES[case])
    assert type(hf).__name__ == "SlmsForCausalLM"
    assert (hf.model.lm_head.weight is hf.model.wte.weight) == gpt.cfg.tie_weights
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        assert torch.equal(hf(x).logits, gpt(x).logits)
        # labels are shifted inside, as in every transformers causal LM
        want = gpt(x[:, :-1], x[:, 1:]).loss
        assert torch.allclose(hf(x, labels=x).loss, want, atol=1e-6)


@pytest.mark.parametrize("case", ["dense-tied", "moe-untied-bias-router"])
def test_greedy_generate_equals_slms_and_uses_the_cache(tmp_path, tokenizer, case):
    gpt, hf = export(tmp_path, tokenizer, **CASES[case])
    lengths: list[int] = []
    hf.model.register_forward_pre_hook(lambda _m, args: lengths.append(args[0].shape[1]))
    prompt = torch.randint(0, 300, (2, 7))
    want = gpt.generate(prompt, 30, temperature=0, eos_id=tokenizer.eos_id)
    got = hf.generate(prompt, max_new_tokens=30, do_sample=False)
    assert got.tolist() == want.tolist()
    # the prompt once, then one new token per step: generate() used the KV cache
    assert lengths[0] == 7 and set(lengths[1:]) == {1}
    assert len(lengths) == want.shape[1] - 7


def test_padding_is_a_clear_error(tmp_path, tokenizer):
    _, hf = export(tmp_path, tokenizer)
    x = torch.randint(0, 300, (2, 5))
    mask = torch.ones_like(x)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="padding"):
        hf(x, attention_mask=mask)


def test_auto_tokenizer_round_trips_text(tmp_path, tokenizer):
    export(tmp_path, tokenizer)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Once upon a time,  a cat\nsaw a dog.\t<|endoftext|>"
    ids = tok(text)["input_ids"]
    assert ids == tokenizer.encode_prompt(text) == [tokenizer.eos_id, *tokenizer.encode(text)]
    assert tok(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
    assert tok.decode(ids[1:]) == text
    assert tok.eos_token == tok.bos_token == "<|endoftext|>"
    assert tok.eos_token_id == tokenizer.eos_id


def test_import_slms_registers_without_importing_transformers(tmp_path, tokenizer):
    export(tmp_path, tokenizer)
    code = ("import sys, slms\n"
            "assert 'transformers' not in sys.modules\n"
            "from transformers import AutoConfig\n"
            f"print(type(AutoConfig.from_pretrained({str(tmp_path / 'hf')!r})).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "SlmsConfig"


def test_export_without_transformers_is_one_line(tmp_path, tokenizer, monkeypatch, capsys):
    import importlib.util

    save_checkpoint(tmp_path / "ck", GPT(tiny_config()), tokenizer)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    assert main(["export", str(tmp_path / "ck"), "--hf", str(tmp_path / "hf")]) == 2
    assert "pip install 'slms[hf]'" in capsys.readouterr().err


def test_tokenizer_files_from_before_the_prefix_declaration_export_it(tmp_path, tokenizer):
    from slms.tokenizer import Tokenizer

    old = Tokenizer.from_str(tokenizer.to_str())
    old.hf.post_processor = None  # as tokenizer.json files written by earlier slms versions
    old = Tokenizer(old.hf)
    export(tmp_path, old)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok("Once upon")["input_ids"] == old.encode_prompt("Once upon")
    assert old.hf.post_processor is None  # the declaration went on a copy
