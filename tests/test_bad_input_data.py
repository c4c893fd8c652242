"""Data of the wrong shape, data that is not what meta.json says, a run continued on another
tokenizer's data, and the tracebacks elsewhere of #28: each is one clear line (or the right
result), and nothing saved changes."""

import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from slms.checkpoint import CheckpointError, save_checkpoint
from slms.cli import main
from slms.data.loader import PackedData
from slms.data.prepare import prepare, prepare_source
from slms.data.sources import Source, SourceError, SourceOptions
from slms.model import GPT
from slms.rundir import RunDir
from slms.tokenizer import Tokenizer, train_tokenizer
from test_bad_input import digest, one_error_line
from train_helpers import TINY


def jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --- records of the wrong shape ------------------------------------------------------------

@pytest.mark.parametrize("record,words", [
    (5, ":2 is a JSON number, not an object with a 'text' field"),
    ([1, 2], ":2 is a JSON list, not an object"),
    ({"text": 5}, ":2: 'text' is a number, not a string"),
    ({"text": ["a"]}, ":2: 'text' is a list, not a string"),
    ({"text": {"a": 1}}, ":2: 'text' is a object, not a string"),
])
def test_jsonl_records_of_the_wrong_shape_name_the_line(tmp_path, record, words, tokenizer):
    f = jsonl(tmp_path / "s.jsonl", [{"text": "A story."}, record])
    with pytest.raises(SourceError) as e:
        list(Source(str(f)).iter("train"))
    assert f"{f}{words}" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SourceError):  # prepare refuses it before writing anything
        prepare_source(Source(str(f)), tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_records_without_text_are_left_out_and_counted(tmp_path, tokenizer, stories, capsys):
    d = tmp_path / "src"
    d.mkdir()
    jsonl(d / "train.jsonl", [{"text": s} for s in stories[:20]]
          + [{"text": None}, {"text": "  "}, {"text": None}])
    jsonl(d / "valid.jsonl", [{"text": s} for s in stories[20:25]] + [{"text": None}])
    tokenizer.save(tmp_path / "tok.json")
    assert main(["prepare", "--source", str(d), "--tokenizer", str(tmp_path / "tok.json"),
                 "--out", str(tmp_path / "data")]) == 0
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["hygiene"]["train"]["no_text"] == 3 and meta["hygiene"]["val"]["no_text"] == 1
    assert meta["splits"]["train"]["stories"] == 20 and meta["splits"]["val"]["stories"] == 5
    err = capsys.readouterr().err
    assert "warning: 3 records of the train split" in err and "null or blank" in err


def test_a_parquet_text_column_of_numbers_names_its_type(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "s.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), f)
    with pytest.raises(SourceError, match=r"column 'text' holds int64, not text"):
        list(Source(str(f)).iter("train"))
    g = tmp_path / "ok.parquet"
    pq.write_table(pa.table({"text": ["A story.", None, "Another."]}), g)
    src = Source(str(g), SourceOptions(val_fraction=0.01))
    assert sorted([*src.iter("train"), *src.iter("val")]) == ["A story.", "Another."]
    assert sum(src.no_text.values()) == 1


def test_an_empty_file_trains_no_tokenizer(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    out = tmp_path / "tok.json"
    err = one_error_line_of(["tokenizer", "--data", tmp_path / "empty.txt", "--out", out], capsys)
    assert "has no stories to train a tokenizer on" in err
    assert not out.exists()


def one_error_line_of(argv, capsys) -> str:
    assert main([str(a) for a in argv]) == 2
    return one_error_line(capsys)


# --- split files that are not what meta.json says -----------------------------------------

def test_a_meta_json_whose_dtype_is_not_the_files(tmp_path, data_dir):
    d = tmp_path / "data"
    shutil.copytree(data_dir, d)
    meta = json.loads((d / "meta.json").read_text())
    assert meta["dtype"] == "uint16"
    (d / "meta.json").write_text(json.dumps(meta | {"dtype": "uint32"}))
    for split in ("train", "val"):  # an even number of uint16 ids: whole uint32 ids
        f = d / f"{split}.bin"
        f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 4 * 4])
    with pytest.raises(ValueError, match="train.bin holds [0-9,]+ token ids of uint32 but "
                       "meta.json counts") as e:
        PackedData(d)
    assert "\n" not in str(e.value)


def test_a_val_bin_cut_at_a_whole_token_is_refused(tmp_path, data_dir, capsys):
    d = tmp_path / "data"
    shutil.copytree(data_dir, d)
    val = d / "val.bin"
    val.write_bytes(val.read_bytes()[:-20])  # ten whole uint16 ids fewer
    with pytest.raises(ValueError, match="is truncated or damaged"):
        PackedData(d)
    err = one_error_line_of(["eval", "nothing", "--data", d], capsys)  # no checkpoint first
    assert "nothing" in err


# --- a run continued on another tokenizer's data -------------------------------------------

@pytest.fixture(scope="module")
def other_data(tmp_path_factory, stories):
    """Data of the same vocab size prepared with another tokenizer."""
    other = train_tokenizer(stories[100:], vocab_size=300)
    out = tmp_path_factory.mktemp("other") / "data"
    prepare({"train": stories[20:], "val": stories[:20]}, other, out, source="test")
    return out


def test_resume_on_another_tokenizers_data_is_refused(run_dir, other_data, capsys):
    before = digest(run_dir)
    err = one_error_line_of(["train", "--resume", run_dir, f"data.path={other_data}"], capsys)
    assert f"cannot resume {run_dir}" in err and "was trained with another tokenizer" in err
    assert "slms prepare --tokenizer" in err
    assert digest(run_dir) == before


def test_init_from_a_checkpoint_of_another_tokenizer_is_refused(run_dir, other_data, tmp_path,
                                                               capsys):
    out = tmp_path / "new"
    err = one_error_line_of(["train", "tiny", *TINY, f"data.path={other_data}",
                             "model.vocab_size=300", f"train.init_from={run_dir}",
                             "--out", out], capsys)
    assert "train.init_from=" in err and "another tokenizer" in err
    assert not out.exists()


# --- tracebacks elsewhere ------------------------------------------------------------------

def test_a_checkpoint_with_nan_weights_is_one_line(tmp_path, tokenizer, capsys):
    model = GPT(tiny_config())
    with torch.no_grad():
        model.blocks[1].ffn.fc.weight[3, 4] = float("nan")
    ck = save_checkpoint(tmp_path / "ck", model, tokenizer)
    err = one_error_line_of(["generate", ck, "--max-new-tokens", "2"], capsys)
    assert "has non-finite weights" in err and "earlier checkpoint" in err


def test_lone_surrogates_encode_as_the_replacement_character(tokenizer):
    assert tokenizer.encode("a\udcffb") == tokenizer.encode("a\ufffdb")
    from slms.infer.chat import run_chat
    from slms.infer.generate import Sampling

    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    out = io.StringIO()
    assert run_chat(model, tokenizer, Sampling(max_new_tokens=2), io.StringIO("Once\udcff\n"),
                    out) == 0
    assert "bye" in out.getvalue()


def test_a_garbage_seed_tokenizer_file_is_named(tmp_path):
    from slms.seed_import import seed_tokenizer

    f = tmp_path / "tok.json"
    f.write_text("{not json")
    with pytest.raises(ValueError, match=f"{f} is not a usable tokenizer file"):
        seed_tokenizer(f)


def test_a_tokenizer_whose_ids_exceed_its_size_is_refused(tmp_path, tokenizer):
    data = json.loads(tokenizer.to_str())
    data["model"]["vocab"]["e"] = 2**32 - 1
    f = tmp_path / "tok.json"
    f.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="300 tokens but gives id 4,294,967,295"):
        Tokenizer.from_file(f)


def test_tokenizer_out_on_a_directory_is_one_line(tmp_path, stories, capsys):
    src = tmp_path / "s.txt"
    src.write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories[:60]))
    (tmp_path / "dir").mkdir()
    err = one_error_line_of(["tokenizer", "--data", src, "--vocab-size", "280", "--out",
                             tmp_path / "dir"], capsys)
    assert f"cannot create {tmp_path / 'dir'}: Is a directory" in err
    assert list((tmp_path / "dir").iterdir()) == []


def test_a_metrics_file_cut_by_a_crash_still_reads(tmp_path, capsys):
    from slms.train.metrics import read_metrics

    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(f)] == [1, 2]
    f.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo\n{"step": 3, "loss": 2.0}\n')
    with pytest.raises(ValueError, match=f"{f}:2 is not a metrics record"):
        read_metrics(f)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(f, RunDir(run).metrics_file)
    err = one_error_line_of(["plot", run], capsys)
    assert "metrics.jsonl:2 is not a metrics record" in err


def test_checkpoint_error_type_is_kept(tmp_path, tokenizer):
    model = GPT(tiny_config())
    with torch.no_grad():
        next(model.parameters()).fill_(float("inf"))
    save_checkpoint(tmp_path / "ck", model, tokenizer)
    from slms.checkpoint import load_checkpoint

    with pytest.raises(CheckpointError, match="non-finite weights"):
        load_checkpoint(tmp_path / "ck")


def test_a_json_escaped_lone_surrogate_is_replaced_and_counted(tmp_path, tokenizer):
    f = tmp_path / "s.jsonl"
    f.write_text('{"text": "Once \\ud800 upon a time."}\n{"text": "Another story."}\n')
    meta = prepare_source(Source(str(f), SourceOptions(val_fraction=0.5)), tokenizer,
                          tmp_path / "out")
    assert sum(meta["hygiene"][s]["replaced_bytes"] for s in ("train", "val")) == 1


def test_token_ids_beyond_the_vocab_are_named_not_an_index_error(tmp_path, data_dir):
    import numpy as np

    d = tmp_path / "data"
    shutil.copytree(data_dir, d)
    ids = np.memmap(d / "val.bin", dtype=np.uint16, mode="r+")
    ids[5] = 65535
    ids.flush()
    del ids
    data = PackedData(d)
    with pytest.raises(ValueError, match="val.bin holds token id 65,535, beyond the 300-token"):
        list(data.eval_batches(4, 16))


def test_a_meta_json_that_is_not_an_object_is_named_by_eval(tmp_path, data_dir, tokenizer,
                                                           capsys):
    d = tmp_path / "data"
    shutil.copytree(data_dir, d)
    (d / "meta.json").write_text("[1]")
    ck = save_checkpoint(tmp_path / "ck", GPT(tiny_config()), tokenizer)
    err = one_error_line_of(["eval", ck, "--data", d], capsys)
    assert "meta.json is not a meta.json written by `slms prepare`" in err
