"""Data preparation at scale: sources and separators, parallel and streaming preparation,
text hygiene, the padded layout, interrupted runs."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from slms.data import prepare as prep
from slms.data.encode import Encoder, resolve_num_proc
from slms.data.loader import PackedData
from slms.data.pipeline import byte_sample, train_tokenizer_on
from slms.data.prepare import PrepareOptions, fix_text, prepare_source, read_meta
from slms.data.sources import Source, SourceOptions, split_txt
from slms.model import GPT, IGNORE_INDEX

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories"


@pytest.fixture()
def txt_dir(tmp_path, stories):
    d = tmp_path / "src"
    d.mkdir()
    (d / "TinyStories-train.txt").write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories[:80]))
    (d / "TinyStories-valid.txt").write_text(
        "".join(f"{s}\n<|endoftext|>\n" for s in stories[80:90]))
    return d


def bins(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.bin"))}


def test_separators():
    assert split_txt("a b\n\nc\n<|endoftext|>\nd\n<|endoftext|>\n") == ["a b\n\nc", "d"]
    assert split_txt("a b\nc\n\n\nd\n", "blank-line") == ["a b\nc", "d"]
    # one story per line group, paragraphs separated by blank lines (the 4 MB sample's format)
    assert split_txt("p1\n\np2\ns2 p1\n\ns2 p2\ns3\n", "newline") == ["p1\n\np2", "s2 p1\n\ns2 p2",
                                                                        "s3"]


def test_counts_are_exact(txt_dir, stories, tokenizer, tmp_path):
    meta = prepare_source(Source(str(txt_dir)), tokenizer, tmp_path / "out")
    for split, chosen in (("train", stories[:80]), ("val", stories[80:90])):
        c = meta["splits"][split]
        assert c["stories"] == len(chosen)
        assert c["tokens"] == sum(len(tokenizer.encode(s)) + 1 for s in chosen)
        assert c["bytes"] == sum(len(s.encode()) for s in chosen)
        assert c["bytes_per_token"] == pytest.approx(c["bytes"] / c["tokens"])


def outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_output_is_byte_identical_whatever_the_process_count(txt_dir, tokenizer, tmp_path,
                                                             monkeypatch, layout):
    monkeypatch.setattr(prep, "CHUNK", 7)  # several chunks per worker, a short last one
    made = {}
    for num_proc in (1, 2, "auto"):
        out = tmp_path / f"p{num_proc}"
        prepare_source(Source(str(txt_dir)), tokenizer, out,
                       PrepareOptions(num_proc=num_proc, layout=layout, block_size=40))
        made[num_proc] = outputs(out)
    assert made[1] == made[2] == made["auto"]  # the .bin files, lengths, meta.json, tokenizer
    assert {"train.bin", "val.bin", "meta.json"} <= set(made[1])


def test_padded_rows_equal_a_story_by_story_reference(stories, tokenizer, tmp_path,
                                                      monkeypatch):
    monkeypatch.setattr(prep, "CHUNK", 5)
    chosen = [*stories[:20], "A cat.", "Tom ran home to his mom.", "Hi."]
    block = 24  # the corpus's stories are longer than a row, the three last ones shorter
    meta = prep.prepare({"train": chosen, "val": stories[23:25]}, tokenizer, tmp_path / "pad",
                        opts=PrepareOptions(layout="padded", block_size=block))
    width, eos = block + 1, tokenizer.eos_id
    token_bytes = tokenizer.token_bytes()
    rows, lengths, cut = [], [], 0
    for s in chosen:  # the layout, one story at a time
        seq = [*tokenizer.encode(s), eos]
        n = min(len(seq) + 1, width)
        rows.append([eos, *seq[:n - 1]] + [eos] * (width - n))
        lengths.append(n)
        cut += sum(token_bytes[i] for i in seq[n - 1:])
    got = np.fromfile(tmp_path / "pad" / "train.bin", dtype=meta["dtype"]).reshape(-1, width)
    assert got.tolist() == rows
    assert np.load(tmp_path / "pad" / "train.lengths.npy").tolist() == lengths
    train = meta["splits"]["train"]
    assert 0 < train["truncated_stories"] == sum(len(tokenizer.encode(s)) + 2 > width
                                                 for s in chosen) < len(chosen)
    assert train["scored_bytes"] == train["bytes"] - cut and cut > 0
    assert train["real_tokens"] == sum(lengths)


def test_fast_batch_encoding_gives_the_same_ids(stories, tokenizer):
    assert tokenizer.encode_batch_fast(stories[:50]) == tokenizer.encode_batch(stories[:50])


def test_encoder_keeps_a_bounded_number_of_chunks_in_flight(stories, tokenizer):
    """Memory stays flat: the encoder reads at most `in_flight` chunks ahead of the writer."""
    pulled = []

    def chunks():
        for i in range(30):
            pulled.append(i)
            yield stories[i:i + 2]

    with Encoder(tokenizer, np.dtype(np.uint16), 1) as enc:
        for k, _ in enumerate(enc.map(chunks())):
            assert len(pulled) <= k + 1 + enc.in_flight
    assert len(pulled) == 30


def test_cli_num_proc(txt_dir, tokenizer, tmp_path, capsys):
    from slms.cli import main

    tokenizer.save(tmp_path / "tok.json")
    argv = ["prepare", "--source", str(txt_dir), "--tokenizer", str(tmp_path / "tok.json")]
    assert main([*argv, "--out", str(tmp_path / "two"), "--num-proc", "2"]) == 0
    assert main([*argv, "--out", str(tmp_path / "auto")]) == 0  # the default
    assert outputs(tmp_path / "two") == outputs(tmp_path / "auto")
    with pytest.raises(SystemExit):
        main([*argv, "--out", str(tmp_path / "zero"), "--num-proc", "0"])
    assert "'0' is neither 'auto' nor an integer >= 1" in capsys.readouterr().err


def test_num_proc_values():
    assert resolve_num_proc("auto") == 1 and resolve_num_proc(3) == 3
    for bad in (0, -1, "two", True):
        with pytest.raises(ValueError, match="--num-proc"):
            PrepareOptions(num_proc=bad)
    assert PrepareOptions().num_proc == "auto"


def test_streaming_equals_non_streaming_hub_path(txt_dir, stories, tokenizer, tmp_path,
                                                 monkeypatch):
    datasets = pytest.importorskip("datasets")
    files = {"train": str(tmp_path / "train.jsonl"), "validation": str(tmp_path / "val.jsonl")}
    for name, chosen in (("train", stories[:80]), ("validation", stories[80:90])):
        Path(files[name]).write_text("".join(json.dumps({"text": s}) + "\n" for s in chosen))
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda name, streaming=False: real("json", data_files=files,
                                                           streaming=streaming))
    for streaming in (False, True):
        src = Source("someone/stories", SourceOptions(streaming=streaming))
        prepare_source(src, tokenizer, tmp_path / f"s{streaming}")
    assert bins(tmp_path / "sFalse") == bins(tmp_path / "sTrue")
    prepare_source(Source(str(txt_dir)), tokenizer, tmp_path / "txt")
    assert bins(tmp_path / "sTrue") == bins(tmp_path / "txt")


def test_fix_text_and_dedupe(tmp_path, tokenizer):
    bad = "Lily\u00e2\u20ac\u2122s dog said \u00e2\u20ac\u0153hi\u00e2\u20ac\u009d \u2014 ok\u2026"
    assert fix_text(bad) == 'Lily\'s dog said "hi" - ok...'
    stories = [bad, "Same story.", "Same story.", "Other story."]
    f = tmp_path / "s.jsonl"
    f.write_text("".join(json.dumps({"body": s}) + "\n" for s in stories))
    val = tmp_path / "s_valid.jsonl"
    val.write_text(json.dumps({"body": "A val story."}) + "\n")
    src = Source(str(tmp_path / "*.jsonl"), SourceOptions(text_field="body"))
    meta = prepare_source(src, tokenizer, tmp_path / "out",
                          PrepareOptions(fix_text=True, dedupe=True))
    assert meta["hygiene"]["train"] == {"fixed": 1, "dropped_empty": 0, "dropped_duplicate": 1,
                                        "replaced_bytes": 0, "no_text": 0}
    assert meta["splits"]["train"]["stories"] == 3 and meta["splits"]["val"]["stories"] == 1


def test_padded_loss_is_the_loss_of_real_tokens_only(stories, tokenizer, tmp_path):
    chosen = {"train": stories[:6], "val": stories[6:9]}
    src = Source(None)
    src.iter = lambda split: iter(chosen[split])  # an in-memory source
    block = 96
    meta = prepare_source(src, tokenizer, tmp_path / "pad",
                          PrepareOptions(layout="padded", block_size=block))
    lengths = [1 + len(tokenizer.encode(s)) + 1 for s in chosen["train"]]  # eot, story, eot
    assert meta["splits"]["train"]["real_tokens"] == sum(min(n, block + 1) for n in lengths)
    data = PackedData(tmp_path / "pad")
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=300, block_size=block)).eval()
    x, y = data._rows(np.arange(6), "train", block)
    assert int((y != IGNORE_INDEX).sum()) == sum(min(n, block + 1) - 1 for n in lengths)
    padded_loss = model(x, y).loss
    nats, count = 0.0, 0
    for s in chosen["train"]:  # each story alone, after an end-of-text id, and nothing else
        ids = torch.tensor([[tokenizer.eos_id, *tokenizer.encode(s), tokenizer.eos_id]])
        ids = ids[:, : block + 1]
        logits = model(ids[:, :-1]).logits
        nats += F.cross_entropy(logits[0], ids[0, 1:], reduction="sum").item()
        count += ids.size(1) - 1
    assert padded_loss.item() == pytest.approx(nats / count, rel=1e-5)
    bx, by = data.train_batch(4, block, seed=1, step=0)
    assert bx.shape == (4, block) and (by[by != IGNORE_INDEX] < 300).all()


def test_interrupted_prepare_leaves_nothing_complete_looking(txt_dir, tokenizer, tmp_path,
                                                             monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_write_split", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare_source(Source(str(txt_dir)), tokenizer, tmp_path / "out")
    assert list(tmp_path.glob("*out*")) == []


def test_tokenizer_sampling_and_held_out_report(txt_dir):
    src = Source(str(txt_dir))
    sample = byte_sample(src.iter("train"), 5000, seed=0)
    assert 4000 < sum(len(s.encode()) for s in sample) < 9000
    assert sample != byte_sample(src.iter("train"), 5000, seed=1)
    tok, report = train_tokenizer_on(src, 300, max_train_bytes=5000)
    assert tok.vocab_size == 300 and report["held_out_stories"] == 10
    assert 1.0 < report["bytes_per_token"] < 3.0


@pytest.mark.skipif(not (SHARED / "train-lowercase-4mb.txt").is_file(),
                    reason="shared TinyStories sample not present")
def test_real_lowercase_sample_newline_separator(tokenizer, tmp_path):
    src = Source(str(SHARED / "train-lowercase-4mb.txt"), SourceOptions(separator="newline"))
    everything = list(src.iter("train")) + list(src.iter("val"))
    assert 4000 < len(everything) < 6000  # "about 4,700 stories"
    lily = [s for s in everything if s.startswith("one day, a little girl named lily found a")]
    assert len(lily) == 1 and lily[0].count("\n\n") == 2  # three paragraphs, one story
    meta = prepare_source(src, tokenizer, tmp_path / "ts", PrepareOptions(train_count=300))
    assert meta["splits"]["train"]["stories"] == 300
    assert read_meta(tmp_path / "ts")["splits"]["val"]["stories"] > 100


def test_training_on_padded_rows_counts_real_tokens_only(stories, tokenizer, tmp_path):
    from slms.cli import main
    from slms.train.metrics import read_metrics

    chosen = {"train": stories[:40], "val": stories[40:44]}
    src = Source(None)
    src.iter = lambda split: iter(chosen[split])
    prepare_source(src, tokenizer, tmp_path / "pad", PrepareOptions(layout="padded",
                                                                    block_size=600))
    argv = ["train", "configs/tiny.toml", f"data.path={tmp_path / 'pad'}", "train.max_steps=2",
            "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=600",
            "model.moe.expert_hidden=32", "train.batch_size=4", "train.log_every=1",
            "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    records = read_metrics(tmp_path / "run")
    steps = [r for r in records if "loss" in r]
    real = sum(len(tokenizer.encode(s)) + 1 for s in stories[:40]) / 40  # mean row length
    assert all(r["tokens"] < 2 * 4 * 600 for r in steps)  # far fewer than the padded positions
    assert steps[-1]["tokens"] == pytest.approx(2 * 4 * (real - 1), rel=0.5)
    val = [r for r in records if "val_loss" in r][-1]
    assert math.isfinite(val["val_loss"])


def test_an_epoch_of_padded_rows_is_a_real_pass(stories, tokenizer, tmp_path):
    """train.epochs counts rows (stories) on padded data, not block positions, and an epoch
    visits every row once, in a new seeded order each pass."""
    from slms.config import RunConfig, TrainConfig
    from slms.train.distributed import Dist
    from slms.train.trainer import resolve_steps

    meta = prep.prepare({"train": stories[:30], "val": stories[30:32]}, tokenizer,
                        tmp_path / "pad", opts=PrepareOptions(layout="padded", block_size=64))
    data = PackedData(tmp_path / "pad")
    rows = meta["splits"]["train"]["rows"]
    cfg = RunConfig(train=TrainConfig(epochs=2, batch_size=4, grad_accum=2))
    assert resolve_steps(cfg, data, Dist()).train.max_steps == math.ceil(2 * 30 / 8) == 8

    def drawn(step: int, micro: int) -> list[tuple[int, ...]]:
        x, _ = data.train_batch(4, 64, seed=1, step=step, micro=micro, micro_per_step=2)
        return [tuple(r) for r in x.tolist()]

    everything = [r for s in range(8) for m in range(2) for r in drawn(s, m)]
    by_row = {tuple(np.asarray(data.splits["train"][i][:-1]).tolist()): i for i in range(rows)}
    order = [by_row[r] for r in everything]
    assert sorted(order[:30]) == list(range(30))  # the first pass: every story once
    assert sorted(order[30:60]) == list(range(30)) and order[30:60] != order[:30]
    assert drawn(3, 1) == drawn(3, 1)  # a pure function of (seed, step, micro)
