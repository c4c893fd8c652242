"""Byte-level BPE tokenizer (Hugging Face `tokenizers`): train, load, save, special tokens.

Byte-level means every string round-trips: ``decode(encode(s)) == s`` (the seed's whitespace
pre-tokenizer without a decoder lost spaces and newlines). That holds for every string of
Unicode scalar values, the special tokens' text inside it included (``"a<|endoftext|>b"``
encodes with the end-of-text id between and decodes back the same). A string holding a lone
surrogate (U+D800..U+DFFF, which Python strings and JSON's ``"\ud800"`` allow) is not text:
it has no UTF-8 bytes, and every encode refuses it with a `NotTextError` (a ValueError)
naming where it is.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

EOT = "<|endoftext|>"
# <|endoftext|> separates documents; the other three are the seed's, kept for compatibility.
SPECIAL_TOKENS = (EOT, "<|unknown|>", "<|im_start|>", "<|im_end|>")


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the project's conventions."""

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        top = max(hf.get_vocab(with_added_tokens=True).values(), default=-1)
        if top >= self.vocab_size:  # ids must be 0..vocab_size-1: models and data size by it
            raise ValueError(f"tokenizer has {self.vocab_size:,} tokens but gives id {top:,}: "
                             "not a consistent tokenizer file")
        eos = hf.token_to_id(EOT)
        if eos is None:
            raise ValueError(f"tokenizer has no {EOT} token; train one with `slms tokenizer`")
        self.eos_id: int = eos
        # What precedes a prompt: whatever the post-processor adds (slms tokenizers:
        # <|endoftext|>, as every story follows one in training; an imported seed tokenizer:
        # nothing). Tokenizers written before slms declared it have none: <|endoftext|>.
        self.prompt_prefix: list[int] = ([eos] if hf.post_processor is None
                                         else hf.encode("", add_special_tokens=True).ids)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """The ids of `text`; a lone surrogate (what Python makes of bytes that are not UTF-8
        in a command line or a terminal's input) is encoded as U+FFFD, as prepare does."""
        if not text.isascii():
            text = _LONE_SURROGATE.sub("\ufffd", text)
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt's ids as generation needs them: `prompt_prefix`, then the text."""
        return [*self.prompt_prefix, *self.encode(text)]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        try:
            return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]
        except TypeError:
            raise not_text(texts) from None

    def encode_batch_fast(self, texts: list[str]) -> list[list[int]]:
        """`encode_batch`'s ids without the character offsets it computes and drops (about 10%
        faster; tokenizers >= 0.21, else `encode_batch`). Releases the GIL while it encodes."""
        fast = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)
        try:
            return [e.ids for e in fast(texts, add_special_tokens=False)]
        except TypeError:
            raise not_text(texts) from None

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self) -> list[int]:
        """UTF-8 bytes of the text each token id stands for (0 for special tokens): summed over
        the tokens of a text, its byte count, so that bits per byte can count what is scored."""
        special = set(self.hf.get_added_tokens_decoder())
        ids = range(self.vocab_size)
        if isinstance(self.hf.decoder, decoders.ByteLevel):  # one alphabet character per byte
            return [0 if i in special else len(self.hf.id_to_token(i)) for i in ids]
        return [0 if i in special else len(self.decode([i]).encode("utf-8")) for i in ids]

    def to_str(self) -> str:
        return self.hf.to_str()

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json (as the tokenizers library does) by Python's file calls, so
        that a directory, a read-only or a full disk at `path` is an OSError naming it (the
        library's own save raises a bare Exception, "os error 21")."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(self.hf.to_str(pretty=True), encoding="utf-8")

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_str().encode()).hexdigest()

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} not found "
                                    "(train one with `slms tokenizer --out PATH`)")
        try:
            return cls.from_str(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a usable tokenizer file: {e}") from None

    @classmethod
    def from_str(cls, text: str) -> Tokenizer:
        """A tokenizer from its JSON; ValueError (one line) when it is not one."""
        return cls(hf_from_str(text))


def hf_from_str(text: str) -> HFTokenizer:
    """A tokenizers.Tokenizer from its JSON; ValueError (one line) when it is not one."""
    try:
        return HFTokenizer.from_str(text)
    except Exception as e:  # the tokenizers library raises a bare Exception
        first = (str(e).splitlines() or [""])[0]
        raise ValueError(f"not a tokenizers JSON ({first}); give a tokenizer.json written "
                         "by `slms tokenizer` or Hugging Face tokenizers") from None


class NotTextError(ValueError):
    """A string with a lone surrogate: `text` (its index in the batch), `at` (the character's
    index), `char`. Picklable, so that it crosses from an encoding worker process whole."""

    def __init__(self, text: int, at: int, char: str, batch: bool = False):
        self.text, self.at, self.char, self.batch = text, at, char, batch
        where = f"character {at}" + (f" of text {text}" if batch else "")
        super().__init__(self.line(where))

    def line(self, where: str) -> str:
        return (f"{where} is a lone surrogate (U+{ord(self.char):04X}), which is not Unicode "
                "text and has no UTF-8 bytes: remove it or write the character it stood for")

    def __reduce__(self):  # noqa: ANN204
        return NotTextError, (self.text, self.at, self.char, self.batch)


def not_text(texts: list[str]) -> Exception:
    """What to raise for `texts` the tokenizers library refused with a TypeError: a
    NotTextError for the first lone surrogate (the one string it refuses), else a TypeError."""
    for n, text in enumerate(texts):
        if not isinstance(text, str):
            return TypeError(f"can only encode strings; got {type(text).__name__}")
        for i, c in enumerate(text):
            if "\ud800" <= c <= "\udfff":
                return NotTextError(n, i, c, batch=len(texts) > 1)
    return TypeError("the tokenizer refused the text")


def train_tokenizer(texts: Iterable[str] | Iterator[str], vocab_size: int = 2048,
                    min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on `texts` (an iterator of documents)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab size {vocab_size} is too small for a byte-level BPE "
                         f"(need at least {256 + len(SPECIAL_TOKENS)})")
    hf = HFTokenizer(models.BPE())
    # No normalizer: the text is kept byte for byte. add_prefix_space=False keeps the round trip.
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    # Prompts start after <|endoftext|>: declared here, so Hugging Face tokenizers made from
    # this one add it too (`add_special_tokens=True`); slms's own encode never adds it.
    declare_prompt_prefix(hf, [hf.token_to_id(EOT)])
    return Tokenizer(hf)


def declare_prompt_prefix(hf: HFTokenizer, ids: list[int]) -> None:
    """Set the post-processor that puts `ids` before a text (none: the text alone); it is what
    `Tokenizer.prompt_prefix` reads back."""
    start = "".join(f"{hf.id_to_token(i)} " for i in ids)
    hf.post_processor = processors.TemplateProcessing(
        single=f"{start}$A", pair=f"{start}$A {start}$B",
        special_tokens=[(hf.id_to_token(i), i) for i in dict.fromkeys(ids)])
