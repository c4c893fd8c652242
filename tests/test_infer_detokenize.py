"""The streaming detokeniser against one decode of all ids and against the two quadratic
decoders it replaced (kept here as references): byte-level pieces that split a character, a
tokenizer without a decoder, random ids, stop strings, and the cost of each token."""

import random

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

from conftest import tiny_config
from slms.infer.detokenize import TextStream
from slms.infer.generate import Sampling, prompt_ids, stream_text
from slms.model import GPT
from slms.tokenizer import Tokenizer

MULTIBYTE = "a \u00e9\u4e2d\U0001f600 b"  # characters of 2, 3 and 4 bytes


class _OldTextStream:
    """The server's stream before it kept only unsent text (the reference for every delta)."""

    def __init__(self, tok, stops):
        self.tok, self.stops = tok, stops
        self.ids, self.prefix, self.read = [], 0, 0
        self.text, self.sent, self.stopped = "", 0, False

    def push(self, token):
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def flush(self):
        if self.stopped:
            return "", True
        before = self.tok.decode(self.ids[self.prefix:self.read])
        self.text += self.tok.decode(self.ids[self.prefix:])[len(before):]
        self.prefix = self.read = len(self.ids)
        return self._release(final=True)

    def _release(self, final):
        hits = [i for s in self.stops if (i := self.text.find(s, self.sent)) >= 0]
        if hits:
            out, self.sent = self.text[self.sent:min(hits)], len(self.text)
            self.stopped = True
            return out, True
        hold = 0 if final else max((k for s in self.stops for k in range(1, len(s))
                                    if self.text.endswith(s[:k])), default=0)
        safe = max(self.sent, len(self.text) - hold)
        out, self.sent = self.text[self.sent:safe], safe
        return out, False


def _old_generate_pieces(tok, ids):
    """`slms generate`'s stream before: all generated ids decoded again at each token."""
    shown, pieces = "", []
    for n in range(1, len(ids) + 1):
        text = tok.decode(ids[:n])
        if not text.endswith("\ufffd") and len(text) > len(shown):
            pieces.append(text[len(shown):])
            shown = text
    text = tok.decode(ids)
    if len(text) > len(shown):
        pieces.append(text[len(shown):])
    return pieces


def _deltas(stream, ids):
    """Every (delta, stopped) of pushing `ids` then flushing, up to a stop."""
    out = []
    for t in ids:
        out.append(stream.push(t))
        if out[-1][1]:
            return out
    return [*out, stream.flush()]


def _stream(tok, text: str, stops) -> tuple[str, bool, list[str]]:
    s = TextStream(tok, tuple(stops))
    pieces, stopped = [], False
    for t in tok.encode(text):
        piece, stopped = s.push(t)
        pieces.append(piece)
        if stopped:
            break
    if not stopped:
        piece, stopped = s.flush()
        pieces.append(piece)
    return "".join(pieces), stopped, pieces


def test_text_stream_holds_back_what_may_start_a_stop_string(tokenizer):
    text = "Tom saw a dog. The dog ran. The end."
    assert _stream(tokenizer, text, [])[:2] == (text, False)
    out, stopped, pieces = _stream(tokenizer, text, ["dog ran", "zzz"])
    assert (out, stopped) == ("Tom saw a dog. The ", True)
    assert "dog" not in "".join(pieces[:-1]) or pieces[-1] == ""  # "dog" held, then cut
    assert _stream(tokenizer, text, ["The end"])[:2] == ("Tom saw a dog. The dog ran. ", True)
    emoji = "a \u00e9\u4e2d\U0001f600 b"  # multi-byte characters split across tokens
    out, _, pieces = _stream(tokenizer, emoji, [])
    assert out == emoji and not any("\ufffd" in p for p in pieces)


def _without_decoder(tok: Tokenizer) -> Tokenizer:
    """The same vocabulary decoded as an imported seed tokenizer is: tokens joined by spaces."""
    hf = HFTokenizer.from_str(tok.to_str())
    hf.decoder = None
    return Tokenizer(hf)


def _long_ids(tok: Tokenizer, rng: random.Random) -> list[int]:
    """Some 3000 ids: stories with multi-byte characters between words, and random ids (lone
    bytes of a character, invalid UTF-8, special tokens)."""
    words = ["Once", " upon", " a", " time", MULTIBYTE, "\n", " caf\u00e9", "\u4e2d\u6587"]
    ids = tok.encode("".join(rng.choice(words) for _ in range(800)))
    for _ in range(40):
        at = rng.randrange(len(ids))
        ids[at:at] = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 6))]
    return ids


@pytest.mark.parametrize("decoder", ["byte-level", "none"])
def test_a_long_stream_is_one_decode_of_all_its_ids(tokenizer, decoder):
    tok = tokenizer if decoder == "byte-level" else _without_decoder(tokenizer)
    ids = _long_ids(tok, random.Random(0))
    assert len(ids) > 2000
    if decoder == "byte-level":  # some ids end inside a character
        assert any(tok.decode(ids[:n]).endswith("\ufffd") for n in range(1, 200))
    pieces = [d for d, _ in _deltas(TextStream(tok), ids)]
    assert "".join(pieces) == tok.decode(ids) == "".join(_old_generate_pieces(tok, ids))
    assert pieces == [d for d, _ in _deltas(_OldTextStream(tok, ()), ids)]


def test_stop_strings_hold_and_cut_as_before(tokenizer):
    rng = random.Random(1)
    text = "".join(rng.choice(["a", "b", "ab", " aab", "ba", "\u00e9", "\u4e2d"])
                   for _ in range(3000))
    ids = tokenizer.encode(text)
    for _ in range(60):
        stops = tuple("".join(rng.choice("ab\u00e9") for _ in range(rng.randrange(1, 6)))
                      for _ in range(rng.randrange(1, 4)))
        new = _deltas(TextStream(tokenizer, stops), ids)
        assert new == _deltas(_OldTextStream(tokenizer, stops), ids), stops
        cut = min((i for s in stops if (i := text.find(s)) >= 0), default=len(text))
        assert "".join(d for d, _ in new) == text[:cut]
        assert new[-1][1] == (cut < len(text))


def test_each_token_decodes_a_bounded_tail(tokenizer):
    seen = []

    class Counting(Tokenizer):
        def decode(self, ids):
            ids = list(ids)
            seen.append(len(ids))
            return super().decode(ids)

    tok = Counting(tokenizer.hf)
    ids = tok.encode(MULTIBYTE * 400)
    _deltas(TextStream(tok, ("zzz",)), ids)
    assert len(ids) > 2000 and max(seen) <= 8  # a 4-byte character, after the last one


@pytest.mark.slow
def test_a_long_generation_streams_the_decode_of_its_ids(tokenizer):
    torch.manual_seed(0)
    model = GPT(tiny_config(block_size=256)).eval()
    s = Sampling(max_new_tokens=250, temperature=1.5, top_k=None, seed=0)
    ids = prompt_ids(tokenizer, "Once", 256, 250)
    pieces = list(stream_text(model, tokenizer, ids, s))
    gen = torch.Generator().manual_seed(0)
    new = model.generate(torch.tensor([ids]), 250, 1.5, None, eos_id=tokenizer.eos_id,
                         generator=gen)[0, len(ids):].tolist()
    new = new[:new.index(tokenizer.eos_id)] if tokenizer.eos_id in new else new
    assert len(new) > 100  # and some of its ids end inside a character:
    assert any(tokenizer.decode(new[:n]).endswith("\ufffd") for n in range(1, len(new)))
    assert "".join(pieces) == tokenizer.decode(new) == "".join(_old_generate_pieces(tokenizer,
                                                                                    new))
    assert all(pieces)
