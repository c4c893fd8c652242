"""Bad input gets one clear line (the CLI exits 2), never a traceback, and nothing already saved
changes: mismatched tokenizers, invalid UTF-8, preparing over other data, absurd sizes in
config.json / meta.json, a changed architecture on resume, files that are not tokenizers,
unsafe pickles and run names that leave runs/."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from slms.checkpoint import CheckpointError, load_checkpoint, load_trainer_state, save_checkpoint
from slms.cli import main
from slms.config import ConfigError, load_config
from slms.data.loader import PackedData
from slms.data.prepare import PrepareOptions, prepare
from slms.model import GPT
from slms.tokenizer import Tokenizer, train_tokenizer
from train_helpers import TINY


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("slms: error: ")
    return err


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


@pytest.fixture
def ckpt(tmp_path, tokenizer) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "ck", GPT(tiny_config()), tokenizer, {"step": 1})


# 1. a checkpoint's tokenizer.json must be the model's ------------------------------------


def test_generate_refuses_a_larger_tokenizer(ckpt, stories, capsys):
    big = train_tokenizer(stories, vocab_size=400)
    assert big.vocab_size > 300
    big.save(ckpt / "tokenizer.json")
    before = digest(ckpt)
    assert main(["generate", str(ckpt), "--prompt", "Once", "--max-new-tokens", "3"]) == 2
    err = one_error_line(capsys)
    assert "tokenizer.json has" in err and "300-token vocab" in err
    assert "put back the checkpoint's own tokenizer.json" in err
    assert digest(ckpt) == before


def test_load_refuses_a_smaller_tokenizer_that_is_not_the_models(ckpt, stories):
    train_tokenizer(stories, vocab_size=280).save(ckpt / "tokenizer.json")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpt)
    msg = one_line(e)
    assert "is not the tokenizer this model was trained with" in msg
    assert "put back the checkpoint's own tokenizer.json" in msg


def test_fewer_tokens_than_the_model_is_fine_when_it_is_the_models_own(tmp_path, tokenizer):
    save_checkpoint(tmp_path / "ck", GPT(tiny_config(vocab_size=320)), tokenizer)
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert meta["tokenizer_sha256"] == tokenizer.sha256
    _, tok, _ = load_checkpoint(tmp_path / "ck")
    assert tok.vocab_size == 300
    del meta["tokenizer_sha256"]  # a checkpoint from before the hash was recorded
    (tmp_path / "ck" / "config.json").write_text(json.dumps(meta))
    load_checkpoint(tmp_path / "ck")


# 2. invalid UTF-8 is counted and reported ---------------------------------------------------


def test_prepare_counts_invalid_utf8_per_split(tmp_path, tokenizer, stories, capsys):
    src = tmp_path / "src"
    src.mkdir()
    eot = b"\n<|endoftext|>\n"
    train = [s.encode() for s in stories[:30]]
    train[3] = b"Once \xff\xfe upon"  # two bad bytes
    train[7] = b"a truncated \xe2\x82 euro sign"  # a cut 3-byte sequence: two bytes
    (src / "train.txt").write_bytes(eot.join(train))
    (src / "valid.txt").write_bytes(eot.join([b"bad \x80 byte", stories[40].encode()]))
    tokenizer.save(tmp_path / "tok.json")
    out = tmp_path / "data"
    assert main(["prepare", "--source", str(src), "--tokenizer", str(tmp_path / "tok.json"),
                 "--out", str(out)]) == 0
    hygiene = json.loads((out / "meta.json").read_text())["hygiene"]
    assert hygiene["train"]["replaced_bytes"] == 4 and hygiene["val"]["replaced_bytes"] == 1
    captured = capsys.readouterr()
    assert "the train split" in captured.err and "4 bytes" in captured.err
    assert "the val split" in captured.err and "1 bytes" in captured.err
    assert "replaced_bytes 4" in captured.out  # prepare's hygiene summary


# 3. prepare does not replace another tokenizer's data silently -----------------------------


def test_prepare_refuses_data_of_another_tokenizer(tmp_path, tokenizer, stories):
    splits = {"train": stories[10:60], "val": stories[:10]}
    out = tmp_path / "data"
    prepare(splits, tokenizer, out)
    before = digest(out)
    other = train_tokenizer(stories, vocab_size=280)
    with pytest.raises(FileExistsError) as e:
        prepare(splits, other, out)
    msg = one_line(e)
    assert "holds data prepared with another tokenizer" in msg and "--overwrite" in msg
    assert digest(out) == before
    prepare(splits, tokenizer, out)  # the same tokenizer: re-preparing replaces
    meta = prepare(splits, other, out, opts=PrepareOptions(overwrite=True))
    assert meta["vocab_size"] == other.vocab_size == PackedData(out).vocab_size


def test_prepare_cli_overwrite_flag(tmp_path, tokenizer, stories, capsys):
    src = tmp_path / "stories.txt"
    src.write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories[:60]))
    tokenizer.save(tmp_path / "a.json")
    train_tokenizer(stories, vocab_size=280).save(tmp_path / "b.json")
    out = tmp_path / "data"
    argv = ["prepare", "--source", str(src), "--out", str(out)]
    assert main([*argv, "--tokenizer", str(tmp_path / "a.json")]) == 0
    capsys.readouterr()
    before = digest(out)
    assert main([*argv, "--tokenizer", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err and digest(out) == before
    assert main([*argv, "--tokenizer", str(tmp_path / "b.json"), "--overwrite"]) == 0
    assert PackedData(out).vocab_size == 280


def test_prepare_refuses_a_directory_of_other_files(tmp_path, tokenizer, stories):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not prepared data"):
        prepare({"train": stories[10:60], "val": stories[:10]}, tokenizer, out)
    assert (out / "mine.txt").read_text() == "keep me"


# 4. absurd or inconsistent sizes are refused before anything is allocated -------------------


def test_absurd_vocab_in_config_json_is_refused(ckpt, capsys):
    meta = json.loads((ckpt / "config.json").read_text())
    meta["model"]["vocab_size"] = 10**12
    (ckpt / "config.json").write_text(json.dumps(meta))
    before = digest(ckpt)
    assert main(["generate", str(ckpt), "--prompt", "Once", "--max-new-tokens", "3"]) == 2
    err = one_error_line(capsys)
    assert "config.json" in err and "model.vocab_size" in err
    assert digest(ckpt) == before


@pytest.mark.parametrize("key,value,shapes", [
    ("vocab_size", 5000, "weight has shape [300, 32] in the weights"),  # wte or tied lm_head
    ("block_size", 4096, "wpe.weight has shape [32, 32] in the weights"),
])
def test_config_json_that_does_not_match_the_weights(ckpt, key, value, shapes, monkeypatch):
    meta = json.loads((ckpt / "config.json").read_text())
    meta["model"][key] = value
    (ckpt / "config.json").write_text(json.dumps(meta))

    def no_model(*a, **k):
        raise AssertionError("the model was built before the header was checked")

    monkeypatch.setattr("slms.checkpoint.load_model", no_model)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpt)
    msg = one_line(e)
    assert shapes in msg and "does not match its config.json" in msg


@pytest.mark.parametrize("edit,expect", [
    ({"vocab_size": 10**12}, "vocab_size 1000000000000"),
    ({"vocab_size": 70000}, "does not fit its uint16"),
    ({"vocab_size": 299}, "tokenizer.json has 300 tokens"),
    ({"dtype": "float64"}, "dtype 'float64'"),
])
def test_bad_meta_json_is_refused(tmp_path, data_dir, edit, expect):
    d = tmp_path / "data"
    shutil.copytree(data_dir, d)
    meta = json.loads((d / "meta.json").read_text()) | edit
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError) as e:
        PackedData(d)
    assert expect in one_line(e)


def test_train_on_meta_with_absurd_vocab_is_one_line(tmp_path, data_dir, capsys):
    d = tmp_path / "data"
    shutil.copytree(data_dir, d)
    meta = json.loads((d / "meta.json").read_text()) | {"vocab_size": 10**12}
    (d / "meta.json").write_text(json.dumps(meta))
    assert main(["train", "configs/tiny.toml", f"data.path={d}", *TINY,
                 "--out", str(tmp_path / "run")]) == 2
    assert "vocab_size 1000000000000" in one_error_line(capsys)


# 5. resuming cannot change the architecture -------------------------------------------------


def test_resume_with_another_n_layer_is_one_line(run_dir, capsys):
    before = digest(run_dir)
    assert main(["train", "--resume", str(run_dir), "model.n_layer=3"]) == 2
    err = one_error_line(capsys)
    assert (f"cannot resume {run_dir} with model.n_layer=3: the run was trained with "
            "model.n_layer=2 (model keys cannot change on resume") in err
    assert digest(run_dir) == before


def test_resume_auto_with_changed_model_keys_is_one_line(run_dir, data_dir, capsys):
    before = digest(run_dir)
    assert main(["train", "configs/tiny.toml", *TINY, f"data.path={data_dir}",
                 "model.n_embd=64", "model.moe=none", 'train.resume="auto"',
                 "--out", str(run_dir)]) == 2
    err = one_error_line(capsys)
    assert "model.n_embd=64" in err and "model.n_embd=32" in err
    assert "model.moe=none" in err
    assert digest(run_dir) == before


# 6. a file that is not a tokenizer ---------------------------------------------------------


@pytest.mark.parametrize("text", ["this is not json", '{"a": 1}', "\udcff"])
def test_not_a_tokenizer_file(tmp_path, text):
    f = tmp_path / "notjson.json"
    f.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError) as e:
        Tokenizer.from_file(f)
    assert str(f) in one_line(e)


def test_prepare_with_a_file_that_is_not_a_tokenizer(tmp_path, capsys):
    f = tmp_path / "notjson.json"
    f.write_text("{}")
    assert main(["prepare", "--tokenizer", str(f), "--out", str(tmp_path / "d")]) == 2
    assert str(f) in one_error_line(capsys)
    assert not (tmp_path / "d").exists()


# 7. an unsafe trainer.pt ------------------------------------------------------------------


def test_unsafe_trainer_state_is_called_unsafe(ckpt):
    torch.save({"step": 1, "hook": print}, ckpt / "trainer.pt")
    with pytest.raises(CheckpointError) as e:
        load_trainer_state(ckpt)
    msg = one_line(e)
    assert "refused as unsafe" in msg and "print" in msg and "corrupted" not in msg


# 8. a run name cannot leave runs/ ---------------------------------------------------------


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "a\\\\b"])
def test_run_name_with_path_separators_is_refused(tmp_path, name, monkeypatch, capsys):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f'name="{name}"'])
    assert one_line(e).startswith("name ")
    monkeypatch.chdir(tmp_path)
    assert main(["train", f'name="{name}"',
                 "train.max_steps=1"]) == 2
    assert "must be a plain name" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []
