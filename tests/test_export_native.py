"""`slms export --hf` of models that a stock transformers class computes exactly: the directory
loads with AutoModelForCausalLM in a process where slms cannot be imported, and gives slms's
logits, greedy tokens and tokenizer ids. Models with options no stock class has fall back to
the custom class with one line naming the option; `--arch` forces a class or fails in one line.
"""

from __future__ import annotations

import copy
import json
import site
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from conftest import tiny_config  # noqa: E402
from slms.checkpoint import save_checkpoint  # noqa: E402
from slms.cli import main  # noqa: E402
from slms.config import MoEConfig  # noqa: E402
from slms.model import GPT  # noqa: E402
from slms.model.info import count_params  # noqa: E402

ROPE = {"positions": "rope", "norm": "rmsnorm"}
# a portable MoE model: SwiGLU experts, no biases anywhere
MOE = {**ROPE, "activation": "swiglu", "bias": False}


def experts(**options) -> MoEConfig:
    return MoEConfig(**{"n_experts": 4, "top_k": 2, "expert_hidden": 48, "bias": False} | options)


# name: (ModelConfig options, the stock class the export must choose)
NATIVE = {
    "llama": ({**ROPE, "activation": "swiglu"}, "LlamaForCausalLM"),
    "llama-untied-no-bias": ({**ROPE, "activation": "swiglu", "bias": False,
                              "tie_weights": False, "rope_base": 500.0}, "LlamaForCausalLM"),
    "qwen3": ({**ROPE, "activation": "swiglu", "qk_norm": True, "bias": False},
              "Qwen3ForCausalLM"),
    "arcee": ({**ROPE, "activation": "relu2"}, "ArceeForCausalLM"),
    "apertus": ({**ROPE, "activation": "relu2", "qk_norm": True, "bias": False,
                 "attn_scale": "n_embd"}, "ApertusForCausalLM"),
    "gpt2": ({"activation": "gelu"}, "GPT2LMHeadModel"),
    # the seed's family: ReLU, no q/k/v biases, scores scaled by n_embd^-0.5
    "gpt2-seed": ({"activation": "relu", "qkv_bias": False, "attn_scale": "n_embd"},
                  "GPT2LMHeadModel"),
    # noisy_topk; experts 34 wide, which torch's grouped_mm cannot take: the eager loop
    "mixtral": ({**MOE, "moe": experts(expert_hidden=51)}, "MixtralForCausalLM"),
    "qwen3-moe": ({**MOE, "qk_norm": True, "moe": experts(router="topk")},
                  "Qwen3MoeForCausalLM"),
    # a dense layer 0, MoE layer 1; top-k weights as they are
    "qwen3-moe-every-2": ({**MOE, "qk_norm": True, "tie_weights": False,
                           "moe": experts(router="topk", every=2, renormalize=False)},
                          "Qwen3MoeForCausalLM"),
    "ernie-bias-router": ({**MOE, "moe": experts(router="bias", bias_update_rate=0.1)},
                          "Ernie4_5_MoeForCausalLM"),
}
TEXT = "Once upon a time, a little cat\nsaw a dog."
GREEDY = 32

# Runs with -I -S: no PYTHONPATH, no current directory and no .pth files (the editable install
# of slms is one), site-packages added by hand; a finder refuses any slms import outright.
LOADER = """
import sys
sys.path += SITE
class NoSlms:
    def find_spec(self, name, path=None, target=None):
        if name == "slms" or name.startswith("slms."):
            raise ModuleNotFoundError("slms is not importable here")
sys.meta_path.insert(0, NoSlms())
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
job = torch.load(sys.argv[1])
found = {}
for name, d in job["dirs"].items():
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    tok = AutoTokenizer.from_pretrained(d)
    enc = tok(job["text"], return_tensors="pt")
    ids = enc.input_ids
    with torch.no_grad():
        logits = model(job["x"]).logits
    # the attention mask given: without eos_token_id, generate would take the leading
    # <|endoftext|> (also pad_token_id) for padding
    new = model.generate(**enc, max_new_tokens=job["n"], do_sample=False, eos_token_id=None)
    found[name] = {"cls": type(model).__name__, "dtype": str(model.dtype), "logits": logits,
                   "ids": ids[0].tolist(), "greedy": new[0, ids.shape[1]:].tolist()}
assert not any(m == "slms" or m.startswith("slms.") for m in sys.modules)
torch.save(found, sys.argv[2])
"""


def trained(steps: int = 3, **options) -> GPT:
    """A tiny model after a few AdamW steps (biases and norm weights no longer at their
    initial zeros and ones, which would hide a mapping that drops them)."""
    torch.manual_seed(0)
    gpt = GPT(tiny_config(block_size=64, **options))
    opt = torch.optim.AdamW(gpt.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, 300, (4, 33), generator=g)
        loss = gpt(x[:, :-1], x[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        gpt.after_optimizer_step(skipped=False)  # the bias router's expert_bias moves
    return gpt.eval()


def export(tmp_path, name: str, gpt: GPT, tokenizer, *extra: str) -> int:
    save_checkpoint(tmp_path / f"{name}-ck", gpt, tokenizer)
    return main(["export", str(tmp_path / f"{name}-ck"), "--hf", str(tmp_path / name), *extra])


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, tokenizer):
    """(slms models, inputs, what the slms-free process found) for every NATIVE case."""
    tmp = tmp_path_factory.mktemp("native")
    models = {name: trained(**opts) for name, (opts, _) in NATIVE.items()}
    for name, gpt in models.items():
        assert export(tmp, name, gpt, tokenizer) == 0
    g = torch.Generator().manual_seed(2)
    x = torch.randint(1, 300, (2, 40), generator=g)
    x[:, 0] = tokenizer.eos_id  # a prompt's first token
    torch.save({"dirs": {n: str(tmp / n) for n in models}, "x": x, "text": TEXT, "n": GREEDY},
               tmp / "job.pt")
    code = LOADER.replace("SITE", repr(site.getsitepackages()))
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(tmp / "job.pt"),
                          str(tmp / "found.pt")], cwd=tmp, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return models, x, torch.load(tmp / "found.pt")


@pytest.mark.slow
@pytest.mark.parametrize("case", NATIVE)
def test_the_stock_class_gives_slms_logits_greedy_tokens_and_ids_without_slms(
        loaded, tokenizer, case):
    models, x, found = loaded
    gpt, got = models[case], found[case]
    assert got["cls"] == NATIVE[case][1] and got["dtype"] == "torch.float32"
    with torch.no_grad():
        want = gpt(x).logits
    assert (got["logits"] - want).abs().max() <= 1e-4
    assert want.std() > 0.1  # trained enough that the logits tell the weights apart
    if gpt.cfg.moe is not None and gpt.cfg.moe.router == "bias":
        assert_expert_bias_matters(gpt, x, want)
    assert got["ids"] == tokenizer.encode_prompt(TEXT)
    prompt = torch.tensor([got["ids"]])
    greedy = gpt.generate(prompt, GREEDY, temperature=0)[0, prompt.shape[1]:].tolist()
    assert got["greedy"] == greedy and len(greedy) == GREEDY


def assert_expert_bias_matters(gpt: GPT, x: torch.Tensor, want: torch.Tensor) -> None:
    """The bias router's trained expert_bias changes the logits (a mapping dropping it would be
    seen)."""
    unbiased = copy.deepcopy(gpt)
    for layer in unbiased.moe_layers():
        layer.router.expert_bias.zero_()
    with torch.no_grad():
        assert (unbiased(x).logits - want).abs().max() > 1e-2


def test_a_mapping_that_drops_a_weight_would_be_caught(tokenizer):
    """The self-check of the export sees a wrong weight (here the last norm's)."""
    from slms.export.arches import ARCHES
    from slms.export.native import build, max_logit_diff

    gpt = trained(**NATIVE["arcee"][0])
    model = build(gpt, ARCHES["arcee"], tokenizer.eos_id)
    assert max_logit_diff(gpt, model) < 1e-6
    with torch.no_grad():
        model.model.norm.weight.fill_(1.0)
    assert max_logit_diff(gpt, model) > 1e-3


# name: (ModelConfig options, text the fallback line must hold)
FALLBACK = {
    "softcap": ({**ROPE, "activation": "swiglu", "logit_softcap": 30.0},
                "model.logit_softcap=30"),
    "untied-head-bias": ({"tie_weights": False}, "model.tie_weights=false with model.bias=true"),
    "learned-rmsnorm": ({"norm": "rmsnorm"}, "model.norm=rmsnorm"),
    "rope-layernorm": ({"positions": "rope", "activation": "swiglu"}, "model.norm=layernorm"),
    # today's modern presets keep model.bias's default (true): Apertus's MLP has no biases
    "modern-with-biases": ({**ROPE, "activation": "relu2", "qk_norm": True}, "model.bias=true"),
    "moe-with-biases": ({**MOE, "moe": MoEConfig(n_experts=4, top_k=2, expert_hidden=48)},
                        "model.moe.bias=true: MixtralForCausalLM's routers and experts"),
    "moe-relu2": ({**MOE, "activation": "relu2", "moe": experts()}, "model.activation=relu2"),
    "moe-every-2-no-qk-norm-unnormalised": (
        {**MOE, "moe": experts(every=2, renormalize=False)}, "model.moe.renormalize=false"),
}


@pytest.mark.parametrize("case", FALLBACK)
def test_options_without_a_stock_class_fall_back_to_the_custom_class_in_one_line(
        tmp_path, tokenizer, capsys, case):
    options, named = FALLBACK[case]
    assert export(tmp_path, case, trained(steps=1, **options), tokenizer) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("no stock transformers class is exact: ")
    assert named in lines[0]
    assert json.loads((tmp_path / case / "config.json").read_text())["model_type"] == "slms"


def test_the_custom_export_still_loads_after_import_slms(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    gpt = trained(steps=1, **FALLBACK["softcap"][0])
    assert export(tmp_path, "capped", gpt, tokenizer) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "capped").eval()
    x = torch.randint(1, 300, (1, 12))
    with torch.no_grad():
        assert torch.equal(hf(x).logits, gpt(x).logits)


def test_arch_forces_a_class_or_fails_in_one_line(tmp_path, tokenizer, capsys):
    gpt = trained(steps=1, **NATIVE["arcee"][0])
    assert export(tmp_path, "llama", gpt, tokenizer, "--arch", "llama") == 2
    err = capsys.readouterr().err.strip()
    assert err == ("slms: error: --arch llama: LlamaForCausalLM would not be exact: "
                   "model.activation=relu2: LlamaForCausalLM's MLP is gated (SwiGLU)")
    assert not (tmp_path / "llama").exists()
    assert export(tmp_path, "nope", gpt, tokenizer, "--arch", "mistral") == 2
    assert ("unknown; choose one of llama, arcee, qwen3, apertus, gpt2, mixtral, qwen3_moe, "
            "ernie4_5_moe, slms") in (
        capsys.readouterr().err)
    assert export(tmp_path, "custom", gpt, tokenizer, "--arch", "slms") == 0
    assert json.loads((tmp_path / "custom" / "config.json").read_text())["model_type"] == "slms"
    assert export(tmp_path, "arcee", gpt, tokenizer, "--arch", "ArceeForCausalLM") == 0
    config = json.loads((tmp_path / "arcee" / "config.json").read_text())
    assert config["architectures"] == ["ArceeForCausalLM"] and config["hidden_act"] == "relu2"
    assert config["rms_norm_eps"] == torch.finfo(torch.float32).eps


def test_arch_names_what_a_moe_class_cannot_compute():
    from slms.export.arches import forced

    cfg = tiny_config(**NATIVE["qwen3-moe"][0])
    assert forced(cfg, "Qwen3MoeForCausalLM").cls == "Qwen3MoeForCausalLM"
    with pytest.raises(ValueError, match="model.qk_norm=true: MixtralForCausalLM has no"):
        forced(cfg, "mixtral")
    with pytest.raises(ValueError, match="model.moe: LlamaForCausalLM is a dense class"):
        forced(tiny_config(**NATIVE["mixtral"][0]), "llama")
    with pytest.raises(ValueError, match="model.moe absent: MixtralForCausalLM is a mix"):
        forced(tiny_config(**NATIVE["llama"][0]), "mixtral")
    with pytest.raises(ValueError, match="model.moe.every=2: every layer of Mixtral"):
        forced(tiny_config(**MOE, moe=experts(every=2)), "mixtral")
    with pytest.raises(ValueError, match="router=bias: MixtralForCausalLM routes as topk or"):
        forced(tiny_config(**NATIVE["ernie-bias-router"][0]), "mixtral")


def test_export_refuses_to_write_over_a_checkpoint(tmp_path, tokenizer, capsys):
    gpt = trained(steps=1, **NATIVE["llama"][0])
    save_checkpoint(tmp_path / "ck", gpt, tokenizer)
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()
    assert main(["export", str(tmp_path / "ck"), "--hf", str(tmp_path / "ck")]) == 2
    assert "is the checkpoint being exported" in capsys.readouterr().err
    save_checkpoint(tmp_path / "other", GPT(tiny_config()), tokenizer)
    assert main(["export", str(tmp_path / "ck"), "--hf", str(tmp_path / "other")]) == 2
    assert "holds an slms checkpoint" in capsys.readouterr().err
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before
    assert (tmp_path / "other" / "tokenizer.json").is_file()
    (tmp_path / "notes.txt").write_text("mine")  # a file: refused, kept
    assert main(["export", str(tmp_path / "ck"), "--hf", str(tmp_path / "notes.txt")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_model_card_header_counts_and_recorded_evaluation(tmp_path, tokenizer):
    gpt = trained(steps=1, **NATIVE["qwen3"][0])
    val = {"loss": 2.5, "perplexity": 12.18, "bits_per_byte": 0.8123}
    save_checkpoint(tmp_path / "ck", gpt, tokenizer, {"step": 7, "val": val})
    assert main(["export", str(tmp_path / "ck"), "--hf", str(tmp_path / "hf")]) == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    header = card.split("---\n")[1]
    assert "library_name: transformers\n" in header and "license:" in header
    assert "- dense\n" in header and "pipeline_tag: text-generation" in header
    total = count_params(gpt)["params_total"]
    assert f"| parameters (total) | {total:,} |" in card
    assert f"| parameters (active per token) | {total:,} |" in card
    assert "`Qwen3ForCausalLM` (stock transformers)" in card
    assert "validation split (`val`)" in card and "step 7: 0.8123 bits per byte" in card
    assert "import slms" not in card  # loads without it
    assert "children's stories" in card


def test_chat_template_gives_the_ids_of_slms_server_chats(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    from slms.serve.protocol import render_chat

    assert export(tmp_path, "hf", trained(steps=1, **NATIVE["gpt2"][0]), tokenizer) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    messages = [{"role": "user", "content": "Tell me a story."}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == tokenizer.encode_prompt(render_chat(messages))
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_id


def test_a_document_mask_model_exports_natively_with_a_note(tmp_path, tokenizer, capsys):
    """document_mask differs only for inputs with a second document: the stock class gives
    slms's logits on one document (a prompt) and the export says where it would not."""
    from transformers import AutoModelForCausalLM

    gpt = trained(steps=2, **NATIVE["apertus"][0], document_mask=True)
    assert export(tmp_path, "docs", gpt, tokenizer) == 0
    out = capsys.readouterr().out
    assert "ApertusForCausalLM" in out and "note: model.document_mask: " in out
    assert "model.document_mask" in (tmp_path / "docs" / "README.md").read_text()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "docs").eval()
    x = torch.randint(1, 300, (2, 30))
    x[:, 0] = tokenizer.eos_id
    with torch.no_grad():
        assert (hf(x).logits - gpt(x).logits).abs().max() <= 1e-4
        x[:, 15] = tokenizer.eos_id  # a second document: slms masks, the stock class cannot
        assert (hf(x).logits[:, 16:] - gpt(x).logits[:, 16:]).abs().max() > 1e-3
