"""`slms finetune` end to end on a tiny MoE model: the fine-tuned model answers the official
openai client's chat.completions.create through `slms serve` with a story that has the requested
name; a fine-tune keeps its expert metrics and resumes exactly; `slms generate --chat`, `slms
chat --chat` and `slms eval-instruct` run on it."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from conftest import tiny_config
from slms.checkpoint import save_checkpoint
from slms.cli import main
from slms.config import MoEConfig
from slms.instruct.finetune import finetune, resume_finetune
from slms.model import GPT
from slms.rundir import resolve
from slms.train.metrics import read_metrics

pytestmark = pytest.mark.slow

NAMES = ("Mia", "Tom", "Lily", "Ben")
FAST = ["train.batch_size=8", "train.lr=3e-3", "train.warmup_steps=5", "train.eval_every=40",
        "train.checkpoint_every=40", "train.log_every=10", "train.threads=2",
        "train.device=cpu", "train.precision=fp32"]


def conversation(rng: random.Random) -> dict:
    name = rng.choice(NAMES)
    return {"messages": [{"role": "user", "content": f"Write a story about {name}."},
                         {"role": "assistant", "content": f"{name} had a red ball. {name} "
                                                          "was happy."}]}


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("instruct")
    torch.manual_seed(0)
    base = GPT(tiny_config(moe=MoEConfig(n_experts=4, top_k=2, router="topk", expert_hidden=32),
                           vocab_size=tokenizer.vocab_size, block_size=96, positions="rope",
                           document_mask=True))
    save_checkpoint(root / "base", base, tokenizer)
    rng = random.Random(0)
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(conversation(rng)) + "\n" for _ in range(300)))
    overrides = [*FAST, f"data.cache_dir={root / 'cache'}", "train.max_steps=160"]
    run = finetune(root / "base", str(data), root / "ft", overrides, log=lambda *a: None)
    return root, run, data


def test_openai_client_gets_the_requested_name_from_slms_serve(tuned, tokenizer):
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from slms.checkpoint import load_checkpoint
    from slms.serve.app import create_app, running

    _, run, _ = tuned
    model, tok, _ = load_checkpoint(resolve(run))
    with running(create_app(model, tok, "tuned")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                               timeout=60)
        for name in ("Mia", "Ben"):
            r = client.chat.completions.create(
                model="tuned", temperature=0, max_tokens=40,
                messages=[{"role": "user", "content": f"Write a story about {name}."}])
            text = r.choices[0].message.content
            assert name in text and r.choices[0].finish_reason == "stop", text
            assert "<|im_end|>" not in text


def test_a_fine_tune_keeps_expert_metrics_and_scores_only_assistant_tokens(tuned):
    _, run, _ = tuned
    records = read_metrics(run)
    steps = [r for r in records if "tokens_per_s" in r]
    assert steps and all("moe" in r for r in steps)
    cfg = json.loads((run / "run_config.json").read_text())
    meta = json.loads(cfg["data_dir"] and open(f"{cfg['data_dir']}/meta.json").read())
    assert meta["loss_mask"] == "assistant"
    # a step scores the assistant's tokens of its 8 rows only: about 8 rows' worth
    per_row = meta["splits"]["train"]["scored_tokens"] / meta["splits"]["train"]["rows"]
    per_step = steps[0]["tokens"] / steps[0]["step"]
    assert 0.5 * 8 * per_row < per_step < 1.5 * 8 * per_row < 8 * 96
    assert cfg["train"]["init_from"].endswith("base")


def test_a_fine_tune_resumes_exactly(tuned, tmp_path):
    root, _, data = tuned
    common = [*FAST, f"data.cache_dir={root / 'cache'}", "train.checkpoint_every=6",
              "train.eval_every=6", "train.log_every=1", "train.max_steps=12"]
    whole = finetune(root / "base", str(data), tmp_path / "whole", common, log=lambda *a: None)
    # the same run, stopped after its step-6 checkpoint: its later files taken away
    part = tmp_path / "part"
    shutil.copytree(whole, part)
    shutil.rmtree(part / "checkpoints" / "step-12")
    shutil.rmtree(part / "best")
    kept = [x for x in (part / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["step"] <= 6]
    (part / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    resume_finetune(part, log=lambda *a: None)

    def losses(run):
        return {r["step"]: r["loss"] for r in read_metrics(run) if "tokens_per_s" in r}
    a, b = losses(whole), losses(part)
    assert all(a[s] == b[s] for s in range(7, 13)), (a, b)


def test_generate_chat_and_eval_instruct_commands(tuned, capsys):
    root, run, data = tuned
    assert main(["generate", str(run), "--chat", "--prompt", "Write a story about Tom.",
                 "--temperature", "0", "--max-new-tokens", "40"]) == 0
    out = capsys.readouterr().out
    assert "Tom" in out and "<|im_end|>" not in out
    words = root / "words.jsonl"
    words.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Words: {n}"},
        {"role": "assistant", "content": f"{n} had a red ball."}]}) + "\n"
        for n in NAMES * 30))
    assert main(["eval-instruct", str(run), "--data", str(words), "--requests", "4",
                 "--max-new-tokens", "20", "--temperature", "0", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["requests"] == 4 and 0 <= r["honoured"] <= 1 and set(r["by_element"]) == {"words"}
    assert "base" in r and r["base"]["checkpoint"].endswith("base")
    lines = (run / "eval-instruct.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all("answer" in json.loads(x)["model"] for x in lines)


def test_bad_finetune_input_is_one_line(tuned, tmp_path, capsys):
    root, _, _ = tuned
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert main(["finetune", str(root / "base"), "--data", str(bad), "--out",
                 str(tmp_path / "run"), f"data.cache_dir={tmp_path / 'c'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl:1" in err[0] and "no assistant turn" in err[0]
    assert not (tmp_path / "run").exists()
