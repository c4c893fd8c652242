import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slms.tokenizer import EOT, SPECIAL_TOKENS, NotTextError, Tokenizer


@settings(max_examples=300, deadline=None)
# Every Unicode scalar value; lone surrogates (Cs) are not text and cannot be UTF-8 encoded.
@given(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=200))
def test_round_trip_arbitrary_unicode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_round_trip_story_text(tokenizer, stories):
    text = "\n\n".join(stories[:5]) + "\n  tabs\tand  spaces \u00e2\u20ac\u2122 \U0001f600\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_tokens(tokenizer):
    assert tokenizer.vocab_size == 300
    ids = [tokenizer.hf.token_to_id(t) for t in SPECIAL_TOKENS]
    assert ids == [0, 1, 2, 3]
    assert tokenizer.eos_id == 0
    assert tokenizer.encode(f"The end.{EOT}")[-1] == tokenizer.eos_id
    assert tokenizer.decode(tokenizer.encode(f"a{EOT}b")) == f"a{EOT}b"


def test_compresses_story_text(tokenizer, stories):
    text = stories[0]
    # 44 merges on top of 256 bytes already save over a quarter of the tokens
    assert len(tokenizer.encode(text)) < 0.75 * len(text.encode())


def test_save_load_same_ids(tokenizer, stories, tmp_path):
    tokenizer.save(tmp_path / "tok.json")
    again = Tokenizer.from_file(tmp_path / "tok.json")
    assert again.encode(stories[3]) == tokenizer.encode(stories[3])
    assert again.sha256 == tokenizer.sha256


def test_prompts_start_after_end_of_text_and_the_file_says_so(tokenizer, tmp_path):
    assert tokenizer.prompt_prefix == [tokenizer.eos_id]
    assert tokenizer.encode_prompt("Once") == [tokenizer.eos_id, *tokenizer.encode("Once")]
    tokenizer.save(tmp_path / "tok.json")
    again = Tokenizer.from_file(tmp_path / "tok.json")
    assert again.prompt_prefix == [tokenizer.eos_id]
    # a tokenizer file that declares nothing (written before slms declared it): the same
    again.hf.post_processor = None
    assert Tokenizer(again.hf).prompt_prefix == [tokenizer.eos_id]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=20)
                | st.sampled_from(SPECIAL_TOKENS) | st.sampled_from(["<|", "|>", "<|endof"]),
                max_size=8).map("".join))
def test_round_trip_with_special_tokens_text_inside(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert ids.count(tokenizer.eos_id) == text.count(EOT)


def test_a_lone_surrogate_is_refused_naming_where_it_is(tokenizer):
    """In a batch (prepare's stories, whose sources already replaced what they could) a lone
    surrogate is refused; one text (a prompt, a chat line) gets U+FFFD for it, as a source's
    invalid bytes do."""
    assert tokenizer.decode(tokenizer.encode("ab\ud800c")) == "ab\ufffdc"
    with pytest.raises(ValueError, match=r"^character 0 of text 1 is a lone surrogate \(U\+DFFF"):
        tokenizer.encode_batch(["fine", "\udfff"])
    with pytest.raises(NotTextError) as e:
        tokenizer.encode_batch_fast(["\ud83d"])  # half of an emoji's UTF-16 pair
    again = pickle.loads(pickle.dumps(e.value))  # as from an encoding worker process
    assert (type(again), str(again), again.text, again.at) == (NotTextError, str(e.value), 0, 0)
