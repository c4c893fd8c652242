import json
import os

import numpy as np
import pytest

from slms.analysis.evaluate import prepare_for
from slms.config import DataConfig
from slms.data.loader import PackedData, eval_windows
from slms.data.pipeline import resolve_data
from slms.data.prepare import prepare, read_meta, reservoir
from slms.data.sources import SourceError, load_source, split_txt
from slms.model import IGNORE_INDEX


def test_token_counts_are_story_tokens_plus_one_eot(data_dir, stories, tokenizer):
    meta = read_meta(data_dir)
    for split, chosen in (("train", stories[20:]), ("val", stories[:20])):
        expected = sum(len(tokenizer.encode(s)) + 1 for s in chosen)
        assert meta["splits"][split]["tokens"] == expected
        assert meta["splits"][split]["stories"] == len(chosen)
        assert meta["splits"][split]["bytes"] == sum(len(s.encode()) for s in chosen)
        arr = np.fromfile(data_dir / f"{split}.bin", dtype=np.uint16)
        assert len(arr) == expected
        assert int((arr == tokenizer.eos_id).sum()) == len(chosen)
        assert arr[-1] == tokenizer.eos_id
    assert meta["dtype"] == "uint16"
    assert meta["vocab_size"] == 300 and meta["eos_id"] == tokenizer.eos_id
    assert meta["tokenizer_sha256"] == tokenizer.sha256


def test_stream_decodes_back_to_the_stories(data_dir, stories, tokenizer):
    arr = np.fromfile(data_dir / "val.bin", dtype=np.uint16).tolist()
    docs, cur = [], []
    for t in arr:
        if t == tokenizer.eos_id:
            docs.append(tokenizer.decode(cur))
            cur = []
        else:
            cur.append(t)
    assert docs == stories[:20]


def test_train_windows_are_contiguous_slices(data_dir):
    data = PackedData(data_dir)
    stream = np.asarray(data.tokens("train"), dtype=np.int64)
    x, y = data.train_batch(8, 16, seed=3, step=5)
    assert x.shape == (8, 16) and y.shape == (8, 16)
    for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
        starts = [i for i in range(len(stream) - 16) if (stream[i:i + 16] == row_x).all()]
        assert starts, "window is not a slice of the stream"
        assert (stream[starts[0] + 1:starts[0] + 17] == row_y).all()
    x2, _ = data.train_batch(8, 16, seed=3, step=5)
    x3, _ = data.train_batch(8, 16, seed=3, step=6)
    assert (x == x2).all() and not (x == x3).all()


def test_eval_windows_score_every_target_once():
    data = np.arange(50, dtype=np.uint16)
    targets = []
    for x, y in eval_windows(data, batch_size=2, block_size=8):
        real = y != IGNORE_INDEX
        assert (y[real] == x[real] + 1).all()  # y is x shifted by one in this stream
        targets += y[real].tolist()
    assert targets == list(range(1, 50))


def test_sources_txt_jsonl_dir(tmp_path, stories):
    text = "".join(s + "\n<|endoftext|>\n" for s in stories[:30])
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.txt").write_text(text)
    (tmp_path / "d" / "valid.jsonl").write_text(
        "\n".join(json.dumps({"text": s}) for s in stories[30:35]) + "\n")
    assert split_txt(text) == stories[:30]
    splits = load_source(str(tmp_path / "d"))
    assert splits["train"] == stories[:30] and splits["val"] == stories[30:35]
    single = load_source(str(tmp_path / "d" / "train.txt"), seed=1)
    assert len(single["train"]) + len(single["val"]) == 30
    assert not set(single["train"]) & set(single["val"])


def test_source_parquet(tmp_path, stories):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": stories[:40]}), tmp_path / "s.parquet")
    splits = load_source(str(tmp_path / "s.parquet"))
    assert sorted(splits["train"] + splits["val"]) == sorted(stories[:40])


def test_source_errors(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        load_source(str(tmp_path / "missing.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="has no"):
        load_source(str(tmp_path / "empty"))


def test_reservoir_is_seeded_subset_in_order(stories):
    a = reservoir(iter(stories), 10, seed=1)
    assert a == reservoir(iter(stories), 10, seed=1) and a != reservoir(iter(stories), 10, seed=2)
    assert set(a) <= set(stories) and len(set(a)) == 10
    assert a == sorted(a, key=stories.index)  # kept in stream order


def test_prepare_replaces_atomically(tmp_path, stories, tokenizer):
    out = tmp_path / "p"
    prepare({"train": stories[:5], "val": stories[5:7]}, tokenizer, out)
    with pytest.raises(ValueError, match="no stories"):
        prepare({"train": stories[:5], "val": []}, tokenizer, out)
    assert read_meta(out)["splits"]["train"]["stories"] == 5  # the earlier output survives
    assert [p.name for p in tmp_path.iterdir()] == ["p"]  # no temp dir left behind


def test_real_tinystories_sample(tmp_path, tokenizer):
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "shared/data/tinystories/train-245-stories.txt"
    if not src.is_file():
        pytest.skip("shared TinyStories sample not present")
    splits = load_source(str(src), seed=0)
    assert len(splits["train"]) + len(splits["val"]) == 245
    meta = prepare(splits, tokenizer, tmp_path / "ts")
    assert meta["splits"]["train"]["stories"] + meta["splits"]["val"]["stories"] == 245


def _stories_in(data_dir, tokenizer) -> list[str]:
    data = PackedData(data_dir)
    out = []
    for split in ("train", "val"):
        ids = np.asarray(data.tokens(split)).tolist()
        while ids:
            end = ids.index(tokenizer.eos_id)
            out.append(tokenizer.decode(ids[:end]))
            ids = ids[end + 1:]
    return sorted(out)


@pytest.mark.parametrize("via", ["resolve_data", "prepare_for"])
def test_cache_of_a_local_file_follows_its_content(tmp_path, stories, tokenizer, via):
    src, cache, logs = tmp_path / "stories.txt", tmp_path / "cache", []
    tokenizer.save(tmp_path / "tok.json")
    cfg = DataConfig(path=str(src), tokenizer=str(tmp_path / "tok.json"), cache_dir=str(cache))

    def prepared() -> os.PathLike:
        if via == "resolve_data":
            return resolve_data(cfg, log=logs.append)
        return prepare_for(str(src), tokenizer, cache, log=logs.append)

    src.write_text("".join(s + "\n<|endoftext|>\n" for s in stories[:60]))
    first = prepared()
    assert prepared() == first
    assert logs[-1] == f"reusing prepared data in {first} (same source and tokenizer)"
    mtime = src.stat().st_mtime_ns
    src.write_text("".join(s + "\n<|endoftext|>\n" for s in stories[60:120]))
    os.utime(src, ns=(mtime + 10**9, mtime + 10**9))  # coarse clocks: make the edit visible
    n_logs = len(logs)
    second = prepared()
    assert second != first and not any("reusing" in m for m in logs[n_logs:])
    assert _stories_in(second, tokenizer) == sorted(stories[60:120])
    assert _stories_in(first, tokenizer) == sorted(stories[:60])
