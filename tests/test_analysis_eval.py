import json
import math

import pytest
import torch

from conftest import tiny_config
from slms import load
from slms.analysis.evaluate import eval_checkpoint
from slms.cli import main
from slms.data.prepare import prepare
from slms.model import GPT
from slms.train.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    model = GPT(tiny_config(moe=True, block_size=64)).eval()
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "ckpt", model, tokenizer)


def test_bits_per_byte_equals_hand_computation(ckpt, tokenizer, tmp_path):
    text = "Tom saw a caf\u00e9. It was big!"  # e-acute: 2 UTF-8 bytes, so bytes != characters
    prepare({"train": ["Once upon a time."], "val": [text]}, tokenizer, tmp_path / "d")
    r = eval_checkpoint(ckpt, str(tmp_path / "d"))
    ids = [*tokenizer.encode(text), tokenizer.eos_id]  # the packed val stream
    model, _ = load(ckpt)
    with torch.no_grad():
        logp = model(torch.tensor([ids[:-1]])).logits[0].log_softmax(-1).double()
    nats = -sum(float(logp[t, ids[t + 1]]) for t in range(len(ids) - 1))
    n_bytes = len(text.encode("utf-8"))
    assert n_bytes == len(text) + 1 and r["bytes"] == n_bytes
    assert r["tokens"] == len(ids) - 1
    assert r["loss"] == pytest.approx(nats / (len(ids) - 1), rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(nats / (len(ids) - 1)), rel=1e-5)
    assert r["bits_per_byte"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)


def test_eval_cli_prepares_a_source_on_the_fly(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    txt = tmp_path / "stories.txt"
    stories = [f"Story {i}: the cat sat on the mat." for i in range(40)]
    txt.write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories))
    assert main(["eval", str(ckpt), "--data", str(txt), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["tokens"] > 0 and r["bits_per_byte"] > 0 and ".cache" in r["data"]
    assert main(["eval", str(ckpt), "--data", str(txt)]) == 0  # cached now; human output
    assert "bits/byte" in capsys.readouterr().out


def test_eval_without_data_is_a_clear_error(ckpt, capsys):
    assert main(["eval", str(ckpt)]) == 2
    assert "--data" in capsys.readouterr().err
