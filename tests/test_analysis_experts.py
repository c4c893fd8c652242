"""`slms experts`: load shares agree with the MoE layers' own counters; exports are written."""

import csv
import json

import numpy as np
import pytest
import torch

from conftest import tiny_config
from slms.analysis.experts import analyse, route_dataset
from slms.checkpoint import save_checkpoint
from slms.cli import main
from slms.data.loader import PackedData
from slms.model import GPT


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(tiny_config(moe=True, block_size=64)).eval()


def test_captured_routing_matches_the_layers_own_counts(model, data_dir):
    tokens = PackedData(data_dir).tokens("val")
    for moe in model.moe_layers():
        moe.reset_stats()
    layers, ids, experts = route_dataset(model, tokens, max_tokens=400)
    assert layers == [0, 1] and experts.shape == (2, len(ids), 2)
    for j, moe in enumerate(model.moe_layers()):
        own = moe.pop_stats()["tokens_per_expert"]
        assert np.bincount(experts[j].ravel(), minlength=4).tolist() == own


def test_analyse_writes_every_export(model, tokenizer, data_dir, tmp_path):
    tokens = PackedData(data_dir).tokens("val")
    text = "Tom & Lily <3 the big dog.\nThe end."
    report = analyse(model, tokenizer, tokens, tmp_path, text, max_tokens=400)
    for la in report["layers"]:
        assert sum(la["share"]) == pytest.approx(1.0)
        counts = la["tokens_per_expert"]
        assert sum(counts) == report["tokens"] * 2  # top-2: every routed token twice
        assert la["max_over_mean"] == pytest.approx(max(counts) / (sum(counts) / 4))
        assert la["share"] == pytest.approx([n / sum(counts) for n in counts])
        assert all(r["lift"] > 0 for rows in la["specialisation"] for r in rows)
    assert json.loads((tmp_path / "experts.json").read_text())["tokens"] == report["tokens"]
    rows = list(csv.DictReader((tmp_path / "expert_load.csv").open()))
    assert len(rows) == 2 * 4
    assert (tmp_path / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    page = (tmp_path / "experts.html").read_text()
    n_tok = len(tokenizer.encode(text))
    assert page.count('class="row"') == 2 and page.count('title="expert') == 2 * n_tok
    assert "&amp;" in page and "&lt;" in page and "<3" not in page  # the text is escaped


def test_experts_cli(model, tokenizer, data_dir, tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "ck", model, tokenizer)
    assert main(["experts", str(ckpt), "--data", str(data_dir), "--max-tokens", "300",
                 "--out", str(tmp_path / "ex")]) == 0
    assert "max/mean" in capsys.readouterr().out
    assert (tmp_path / "ex" / "experts.html").is_file()
    dense = save_checkpoint(tmp_path / "dense", GPT(tiny_config()), tokenizer)
    assert main(["experts", str(dense), "--data", str(data_dir), "--out", str(tmp_path)]) == 2
    assert "dense" in capsys.readouterr().err
