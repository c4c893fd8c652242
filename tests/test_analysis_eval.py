import json
import math

import pytest
import torch

from conftest import tiny_config
from slms import load
from slms.analysis.evaluate import eval_checkpoint
from slms.checkpoint import save_checkpoint
from slms.cli import main
from slms.data.prepare import prepare
from slms.model import GPT


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


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_evaluation_sums_to_the_whole_and_runs_equal_forwards(world):
    from slms.analysis.evaluate import evaluate_batches
    from slms.model import IGNORE_INDEX

    torch.manual_seed(0)
    model = GPT(tiny_config())
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 300, (2, 8), generator=g),
                torch.randint(0, 300, (2, 8), generator=g)) for _ in range(5)]
    batches[4][1][1, 3:] = IGNORE_INDEX  # a padded tail: not scored
    whole = evaluate_batches(model, batches, torch.device("cpu"))
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    parts, forwards = [], []
    for rank in range(world):
        calls.clear()
        parts.append(evaluate_batches(model, batches, torch.device("cpu"), shard=(rank, world)))
        forwards.append(len(calls))
    assert sum(n for _, n in parts) == whole[1] == 5 * 16 - 5
    assert sum(nats for nats, _ in parts) == pytest.approx(whole[0], rel=1e-9)
    assert forwards == [-(-5 // world)] * world  # 5 batches: the short ranks run a spare


def test_padded_bits_per_byte_counts_the_bytes_scored(ckpt, stories, tokenizer, tmp_path):
    """Truncated stories: only their kept tokens are scored, so only their bytes count."""
    from slms.data.loader import PackedData
    from slms.data.prepare import PrepareOptions

    meta = prepare({"train": stories[:4], "val": stories[4:10]}, tokenizer, tmp_path / "pad",
                   opts=PrepareOptions(layout="padded", block_size=64))
    assert meta["splits"]["val"]["truncated_stories"] > 0
    data = PackedData(tmp_path / "pad")
    kept_bytes = sum(len(tokenizer.decode(row[1:n]).encode("utf-8"))  # ASCII stories
                     for row, n in zip(data.splits["val"], data.lengths["val"], strict=True))
    assert kept_bytes < meta["splits"]["val"]["bytes"]
    assert data.scored_bytes("val") == kept_bytes
    r = eval_checkpoint(ckpt, str(tmp_path / "pad"))
    nats = r["loss"] * r["tokens"]
    assert r["bytes"] == kept_bytes
    assert r["bits_per_byte"] == pytest.approx(nats / math.log(2) / kept_bytes, rel=1e-9)
    # data prepared before the count was recorded gets it from the rows and the tokenizer
    del data.meta["splits"]["val"]["scored_bytes"]
    assert data.scored_bytes("val") == kept_bytes


def test_token_bytes_sum_to_the_text_bytes(tokenizer):
    text = "Tom saw a caf\u00e9.\n\nIt was big!"
    table = tokenizer.token_bytes()
    assert sum(table[i] for i in tokenizer.encode(text)) == len(text.encode("utf-8"))
    assert table[tokenizer.eos_id] == 0


@pytest.mark.slow
def test_moe_evaluation_with_capacity_does_not_depend_on_the_batch(tmp_path, data_dir):
    """Capacity is a training-time device: evaluation is dropless, so its loss is the same
    whatever the batch size (and pads of the short last window take no capacity)."""
    from slms.analysis.evaluate import evaluate
    from slms.config import MoEConfig
    from slms.data.loader import PackedData

    torch.manual_seed(0)
    moe = MoEConfig(n_experts=4, top_k=2, expert_hidden=64, capacity_factor=0.5)
    model = GPT(tiny_config(moe=moe))
    data = PackedData(data_dir)
    losses = [evaluate(model, data, batch_size=b, block_size=32)["loss"] for b in (1, 3, 16)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert losses[2] == pytest.approx(losses[0], rel=1e-5)
