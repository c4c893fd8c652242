"""benchmarks/quality.py keeps its held-out stories out of every run: each candidate trains on a
prefix of the training text and picks best/ on a validation split carved from it; the held-out
stories are read once, after the last run, to score each run's best/."""

import builtins
import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest

from slms import corpus

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["quality"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_held_out_and_prefix_files_are_keyed_by_their_inputs(tmp_path):
    from slms.data.heldout import read_stories, split_text, training_prefix

    stories = [s.replace("\n", " ") for s in corpus.generate_stories(60, seed=3)]
    src = tmp_path / "stories.txt"
    src.write_text("\n".join(stories) + "\n")
    text = split_text(src, tmp_path / "out", 10)
    assert read_stories(text / "valid.txt") == stories[-10:]
    assert read_stories(text / "train.txt") == stories[:-10]
    assert split_text(src, tmp_path / "out", 12) != text  # another held-out count
    small, n = training_prefix(text / "train.txt", tmp_path / "out", 0.001)
    assert read_stories(small) == stories[:n] and 0 < n < 50
    size = sum(len(s.encode()) for s in stories[:n])
    assert size >= 1000 > size - len(stories[n - 1].encode())
    src.write_text("\n".join(stories[:40]) + "\n")  # the file changed: a new split
    assert read_stories(split_text(src, tmp_path / "out", 10) / "valid.txt") == stories[30:40]


@pytest.mark.slow
def test_the_benchmark_reads_the_held_out_stories_only_to_score(tmp_path, monkeypatch, capsys):
    quality = load_benchmark()
    stories = [s.replace("\n", " ") for s in corpus.generate_stories(400, seed=5)]
    src = tmp_path / "stories.txt"
    src.write_text("\n".join(stories) + "\n")
    held = set(stories[-40:])

    trained, opened = [], []
    real_train = __import__("slms.train.trainer", fromlist=["train"]).train

    def train(cfg, *args, **kwargs):
        trained.append(cfg.data.path)
        return real_train(cfg, *args, **kwargs)

    real_open, real_io_open = builtins.open, io.open

    def spy(opener):
        def wrapped(file, *args, **kwargs):
            if str(file).endswith("valid.txt"):
                opened.append(len(trained))
            return opener(file, *args, **kwargs)
        return wrapped

    monkeypatch.setattr("slms.train.trainer.train", train)
    monkeypatch.setattr(builtins, "open", spy(real_open))
    monkeypatch.setattr(io, "open", spy(real_io_open))
    tiny = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=32",
            "train.batch_size=4", "train.warmup_steps=1", "train.threads=2",
            "train.precision=fp32", "data.vocab_size=300"]
    monkeypatch.setattr(sys, "argv", [
        "quality.py", "--data", str(src), "--out", str(tmp_path / "q"), "--val-stories", "40",
        "--sizes", "0.01,0.05", "--steps", "4", "--eval-every", "2", "--json",
        "--candidates", "baseline,adaptive", *tiny])
    quality.main()
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(trained) == 4
    assert opened and all(n == len(trained) for n in opened)  # read after the last run
    for size in report["sizes"]:
        assert [c["name"] for c in size["candidates"]] == ["baseline", "adaptive"]
        for c in size["candidates"]:
            assert 0 < c["bpb"] < 10 and c["steps"] == 4
    for path in trained:  # what each run trained on: a prefix of the training stories
        assert not held & set(Path(path).read_text().split("\n<|endoftext|>\n"))
