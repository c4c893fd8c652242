"""Tests for the embedded story corpus (slms.corpus)."""

from __future__ import annotations

import hashlib
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slms import corpus
from slms.corpus import (
    DEFAULT_SEED,
    DEFAULT_STORIES,
    EOT,
    format_stories,
    generate_stories,
    generate_story,
    write_corpus,
)


@pytest.fixture(scope="module")
def stories() -> list[str]:
    return generate_stories(3000, seed=0)


def test_defaults() -> None:
    assert EOT == "<|endoftext|>"
    assert DEFAULT_STORIES == 6000
    assert DEFAULT_SEED == 0


def test_same_seed_gives_identical_stories() -> None:
    assert generate_stories(200, seed=7) == generate_stories(200, seed=7)
    assert generate_story(random.Random(3)) == generate_story(random.Random(3))


def test_different_seeds_give_different_stories() -> None:
    a, b = generate_stories(200, seed=1), generate_stories(200, seed=2)
    assert a != b
    # Not just reordered: most stories of one seed do not occur under the other.
    assert len(set(a) & set(b)) < 10


def test_prefix_stable_when_asking_for_more() -> None:
    assert generate_stories(300, seed=4)[:100] == generate_stories(100, seed=4)


def test_independent_of_global_random_state() -> None:
    random.seed(123)
    first = generate_stories(20, seed=5)
    random.seed(456)
    assert generate_stories(20, seed=5) == first


def test_same_output_in_a_fresh_interpreter_with_other_hash_seed() -> None:
    # String hashing is randomised per process; output must not depend on set or dict order.
    code = (
        "import hashlib; from slms.corpus import generate_stories, format_stories; "
        "print(hashlib.sha256(format_stories(generate_stories(300, 9)).encode()).hexdigest())"
    )
    # Point the child at whichever copy of slms this process imported.
    src = str(Path(corpus.__file__).resolve().parents[1])
    digests = set()
    for hash_seed in ("1", "2"):
        env = {"PYTHONHASHSEED": hash_seed, "PYTHONPATH": src}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True)
        digests.add(out.stdout.strip())
    here = hashlib.sha256(format_stories(generate_stories(300, 9)).encode()).hexdigest()
    assert digests == {here}


def test_stories_are_distinct(stories: list[str]) -> None:
    assert len(stories) == 3000
    assert len(set(stories)) == 3000


def test_duplicates_are_regenerated(monkeypatch: pytest.MonkeyPatch) -> None:
    # Real duplicates are rare, so force them: a generator with only 12 possible stories.
    def tiny(rng: random.Random) -> str:
        return f"Story {rng.randrange(12)}."

    monkeypatch.setattr(corpus, "generate_story", tiny)
    got = generate_stories(10, seed=1)
    assert len(set(got)) == 10
    assert got == generate_stories(10, seed=1)
    with pytest.raises(RuntimeError):
        generate_stories(13, seed=1)


def test_zero_and_negative_counts() -> None:
    assert generate_stories(0) == []
    with pytest.raises(ValueError):
        generate_stories(-1)


def test_ascii_and_clean(stories: list[str]) -> None:
    for story in stories:
        assert story.isascii()
        assert EOT not in story
        assert "{" not in story and "}" not in story, story
        assert story == story.strip()
        assert "  " not in story
        assert "\n\n\n" not in story


def test_paragraphs(stories: list[str]) -> None:
    counts = [len(s.split("\n\n")) for s in stories]
    assert min(counts) >= 2
    assert max(counts) <= 4
    # All three shapes actually occur, in sensible shares.
    for n in (2, 3, 4):
        assert counts.count(n) > 0.05 * len(stories), (n, counts.count(n))
    for story in stories:
        for para in story.split("\n\n"):
            assert "\n" not in para
            assert para[0].isupper() or para[0] == '"', para


def test_dialogue(stories: list[str]) -> None:
    for story in stories:
        assert story.count('"') % 2 == 0, story
    with_dialogue = sum(bool(re.search(r'"[A-Z][^"]*[.!?,]"', s)) for s in stories)
    assert with_dialogue > 0.8 * len(stories)


def test_length(stories: list[str]) -> None:
    lengths = sorted(len(s.split()) for s in stories)
    mean = sum(lengths) / len(lengths)
    assert 80 <= mean <= 250, mean
    # At least 95% of stories fall in the 70..250 word band.
    assert lengths[len(lengths) // 40] >= 70
    assert lengths[-len(lengths) // 40] <= 250


def test_simple_grammar(stories: list[str]) -> None:
    text = "\n".join(stories)
    assert not re.search(r"\ba [aeiouAEIOU]", text), "use 'an' before a vowel"
    assert not re.search(r"\ban [^aeiouAEIOU\s]", text), "use 'a' before a consonant"
    assert not re.search(r"[.!?] [a-z]", text), "sentences start with a capital letter"
    assert not re.search(r"\b(\w+) \1\b", text.replace("and then another", "")), "doubled word"
    for story in stories:
        assert story[-1] in '.!"', story


def test_pronouns_follow_the_hero(stories: list[str]) -> None:
    # Every pronoun in the first paragraph refers to the hero, whose kind the first sentence names.
    checked = {"girl": 0, "boy": 0}
    wrong = {"girl": {"he", "him", "his"}, "boy": {"she", "her", "hers"}}
    for story in stories:
        first_para = story.split("\n\n")[0]
        kind = re.search(r"\b(girl|boy)\b", first_para.split(".")[0])
        if kind:
            words = set(re.findall(r"[a-z]+", first_para.lower()))
            assert not wrong[kind.group(1)] & words, first_para
            checked[kind.group(1)] += 1
    assert min(checked.values()) > 300, checked


def test_variety(stories: list[str]) -> None:
    first_sentences = {re.split(r"(?<=[.!?]) ", s, maxsplit=1)[0] for s in stories}
    assert len(first_sentences) > 1500, len(first_sentences)
    words = set(re.findall(r"[a-z']+", " ".join(stories).lower()))
    assert len(words) > 600, len(words)
    names = {m.group(1) for s in stories for m in re.finditer(r"named ([A-Z][a-z]+)", s)}
    assert len(names) > 60, len(names)
    # Several plot shapes: each of these markers belongs to a different template.
    markers = ("could not find", "did not want to share", "scared of", "Can you help me",
               "we are going to", "did not listen", "did not give up", "want to play")
    for marker in markers:
        share = sum(marker.lower() in s.lower() for s in stories) / len(stories)
        assert share > 0.03, (marker, share)
    # Long shared word sequences would let a model memorise; no 12-word run is in most stories.
    grams: dict[str, int] = {}
    for story in stories[:500]:
        words_ = story.split()
        for gram in {" ".join(words_[i:i + 12]) for i in range(len(words_) - 11)}:
            grams[gram] = grams.get(gram, 0) + 1
    assert max(grams.values()) < 0.2 * 500


def test_format_stories() -> None:
    assert format_stories([]) == ""
    assert format_stories(["A b.", "C d.\n\nE f."]) == (
        "A b.\n<|endoftext|>\nC d.\n\nE f.\n<|endoftext|>\n"
    )
    assert format_stories(iter(["x"])) == "x\n<|endoftext|>\n"


def test_format_round_trip(stories: list[str]) -> None:
    text = format_stories(stories[:300])
    assert text.endswith(f"\n{EOT}\n")
    parts = text.split(f"\n{EOT}\n")
    assert parts[-1] == ""
    assert parts[:-1] == stories[:300]
    eot_lines = [line for line in text.split("\n") if EOT in line]
    assert len(eot_lines) == 300
    assert all(line == EOT for line in eot_lines)


@pytest.mark.parametrize(("n", "frac", "n_val"), [(100, 0.05, 5), (10, 0.01, 1), (2, 0.9, 1),
                                                  (41, 0.1, 4), (7, 0.5, 4)])
def test_write_corpus_counts(tmp_path: Path, n: int, frac: float, n_val: int) -> None:
    out = tmp_path / "a" / "b"
    train, val = write_corpus(out, n_stories=n, seed=3, val_fraction=frac)
    assert (train, val) == (out / "train.txt", out / "val.txt")
    train_stories = train.read_bytes().decode("ascii").split(f"\n{EOT}\n")[:-1]
    val_stories = val.read_bytes().decode("ascii").split(f"\n{EOT}\n")[:-1]
    assert len(val_stories) == n_val
    assert len(train_stories) == n - n_val
    assert train_stories + val_stories == generate_stories(n, seed=3)
    assert b"\r" not in train.read_bytes()


def test_write_corpus_default_split(tmp_path: Path) -> None:
    train, val = write_corpus(str(tmp_path), n_stories=400)
    assert val.read_text().count(EOT) == 20
    assert train.read_text().count(EOT) == 380


@pytest.mark.parametrize(("kwargs", "word"), [
    ({"n_stories": 1}, "n_stories"),
    ({"n_stories": 0}, "n_stories"),
    ({"n_stories": -5}, "n_stories"),
    ({"val_fraction": 0.0}, "val_fraction"),
    ({"val_fraction": 1.0}, "val_fraction"),
    ({"val_fraction": -0.1}, "val_fraction"),
    ({"val_fraction": 1.5}, "val_fraction"),
])
def test_write_corpus_rejects_bad_arguments(tmp_path: Path, kwargs: dict, word: str) -> None:
    with pytest.raises(ValueError, match=word) as info:
        write_corpus(tmp_path / "out", **kwargs)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_generating_default_corpus_is_fast() -> None:
    start = time.perf_counter()
    result = generate_stories(DEFAULT_STORIES, DEFAULT_SEED)
    elapsed = time.perf_counter() - start
    assert len(result) == DEFAULT_STORIES
    assert elapsed < 2.0, elapsed
