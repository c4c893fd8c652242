"""Hugging Face integration: `slms export --hf`, then transformers' Auto classes give the slms
model's logits, loss and greedy generation (with the KV cache), and its tokenizer."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import slms.hf  # noqa: E402,F401  (registers model_type slms)
from conftest import tiny_config  # noqa: E402
from slms.checkpoint import save_checkpoint  # noqa: E402
from slms.cli import main  # noqa: E402
from slms.config import MoEConfig  # noqa: E402
from slms.hf import from_gpt  # noqa: E402
from slms.model import GPT  # noqa: E402

CASES = {  # name: (ModelConfig overrides)
    "dense-tied": {},
    "dense-untied": {"tie_weights": False},
    "moe-tied": {"moe": MoEConfig(n_experts=4, top_k=2, expert_hidden=64)},
    "moe-untied-bias-router": {"tie_weights": False,
                               "moe": MoEConfig(n_experts=4, top_k=2, router="bias")},
}


def export(tmp_path, tokenizer, **kw) -> tuple[GPT, torch.nn.Module]:
    """(slms model, the model transformers loads from its `slms export --hf --arch slms`
    directory)."""
    torch.manual_seed(0)
    gpt = GPT(tiny_config(block_size=64, **kw)).eval()
    save_checkpoint(tmp_path / "ck", gpt, tokenizer)
    # --arch slms: the custom class these tests are about (plain `export` of a model that maps
    # to a stock class writes that class: tests/test_export_native.py)
    assert main(["export", str(tmp_path / "ck"), "--hf", str(tmp_path / "hf"),
                 "--arch", "slms"]) == 0
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


def test_generate_switches_moe_statistics_off_for_the_call(tokenizer):
    torch.manual_seed(0)
    gpt = GPT(tiny_config(moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=64))).eval()
    hf = from_gpt(gpt, tokenizer.eos_id)
    layers = hf.model.moe_layers()
    prompt = torch.randint(0, 300, (2, 5))
    got = hf.generate(prompt, max_new_tokens=10, do_sample=False)
    assert got.tolist() == gpt.generate(prompt, 10, temperature=0,
                                        eos_id=tokenizer.eos_id).tolist()
    assert all(m.stats.calls == 0 and m.track_stats for m in layers)
    with pytest.raises(ValueError, match="context"):  # past block_size 32, mid-generation
        hf.generate(prompt, max_new_tokens=40, do_sample=False)
    assert all(m.stats.calls == 0 and m.track_stats for m in layers)
    with torch.no_grad():
        hf(prompt)  # a plain forward still records
    assert all(m.stats.calls == 1 for m in layers)


# Rows as (row, positions) set to -100 in the labels. For the MoE model (deterministic topk
# router, z-loss only: the balancing loss is not a sum over tokens, so no split reproduces it)
# both micro-batches hold as many targets, as its per-micro-batch router loss is weighted by them.
ACCUMULATION_CASES = {
    "dense": ({}, [(0, slice(0, 10)), (3, slice(5, 8))]),
    "moe-z-loss": ({"moe": MoEConfig(n_experts=4, top_k=2, expert_hidden=64, router="topk",
                                     aux_loss_coef=0.0, z_loss_coef=0.1)},
                   [(0, slice(0, 10)), (2, slice(0, 10))]),
}


def trainer_step(tmp_path, gpt: GPT, rows: list[dict], batch: int, accumulation: int
                 ) -> dict[str, torch.Tensor]:
    """The parameters after one SGD step of transformers' Trainer on `rows`, taken in order."""
    from transformers import Trainer, TrainingArguments

    model = from_gpt(gpt)
    args = TrainingArguments(
        output_dir=str(tmp_path / f"b{batch}-g{accumulation}"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, max_steps=1, use_cpu=True, report_to=[],
        save_strategy="no", logging_strategy="no", lr_scheduler_type="constant",
        max_grad_norm=0.0, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=rows,
                      optimizers=(torch.optim.SGD(model.parameters(), lr=0.5), None))
    trainer.train()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("case", ACCUMULATION_CASES)
def test_trainer_gradient_accumulation_equals_one_large_batch(tmp_path, monkeypatch, case):
    pytest.importorskip("accelerate")
    import inspect

    from torch.utils.data import SequentialSampler
    from transformers import Trainer

    if "num_items_in_batch" not in inspect.signature(Trainer.compute_loss).parameters:
        pytest.skip("this transformers' Trainer averages micro-batch means (before 4.46)")
    monkeypatch.setattr(Trainer, "_get_train_sampler",
                        lambda self, *a: SequentialSampler(self.train_dataset))
    overrides, masked = ACCUMULATION_CASES[case]
    torch.manual_seed(0)
    gpt = GPT(tiny_config(vocab_size=64, block_size=16, **overrides))
    x = torch.randint(0, 64, (4, 16))
    labels = x.clone()
    for row, positions in masked:
        labels[row, positions] = -100
    rows = [{"input_ids": x[i], "labels": labels[i]} for i in range(4)]
    before = {k: v.detach().clone() for k, v in from_gpt(gpt).named_parameters()}
    want = trainer_step(tmp_path, gpt, rows, batch=4, accumulation=1)
    got = trainer_step(tmp_path, gpt, rows, batch=2, accumulation=2)
    assert not torch.allclose(want["model.wte.weight"], before["model.wte.weight"])
    for name, w in want.items():
        assert torch.allclose(got[name], w, atol=1e-6), name


def test_num_items_in_batch_gives_the_summed_loss_over_them():
    torch.manual_seed(0)
    moe = MoEConfig(n_experts=4, top_k=2, expert_hidden=64, router="topk")
    hf = from_gpt(GPT(tiny_config(vocab_size=64, block_size=16, moe=moe))).train()
    x = torch.randint(0, 64, (4, 16))
    labels = x.clone()
    labels[0, :10] = -100
    n = int((labels[:, 1:] != -100).sum())
    # one micro-batch holding every target: the usual mean loss, router losses included
    want = hf(x, labels=labels).loss
    assert torch.allclose(hf(x, labels=labels, num_items_in_batch=n).loss, want, atol=1e-6)
    # in eval mode (no router losses) the parts sum to the whole, however unevenly split
    hf.eval()
    with torch.no_grad():
        parts = [hf(x[s], labels=labels[s], num_items_in_batch=torch.tensor(n)).loss
                 for s in (slice(0, 1), slice(1, 4))]
        assert torch.allclose(sum(parts), hf(x, labels=labels).loss, atol=1e-6)


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


@pytest.mark.slow
def test_import_slms_hf_registers_the_model_type(tmp_path, tokenizer):
    export(tmp_path, tokenizer)
    code = ("import sys, slms\n"
            "assert 'transformers' not in sys.modules\n"
            "import slms.hf\n"
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
