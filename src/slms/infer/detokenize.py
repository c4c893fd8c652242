"""Incremental detokenising: generated token ids in, text deltas out, one token at a time.

The one streaming decoder of `slms generate`, chat and the server. Each token costs a decode of
a bounded tail of ids, not of everything generated so far (that was quadratic in the length):
the ids since the last whole character, after the ids of the piece before them as context,
since some decoders (a tokenizer without a decoder joins tokens with spaces, SentencePiece drops
a leading space) decode a token differently at the start of a text.
"""

from __future__ import annotations

from slms.tokenizer import Tokenizer


class TextStream:
    """Generated token ids -> text deltas: only whole UTF-8 characters, and text that could be
    the start of a stop string is held back until it is known not to be one.

    The deltas of every `push` and the last `flush` join to the decode of all pushed ids, cut
    before the first stop string (if any). After a stop or `flush` the stream is over.
    """

    def __init__(self, tok: Tokenizer, stops: tuple[str, ...] = ()):
        self.tok, self.stops = tok, stops
        self.window: list[int] = []  # the last decoded piece's ids (context), then newer ones
        self.read = 0  # window[:read] is decoded already (the context for the rest)
        self.pending = ""  # decoded text not yet sent (it may start a stop string)
        self.stopped = False  # a stop string was reached: nothing more is sent

    def push(self, token: int) -> tuple[str, bool]:
        """(text to send now, whether a stop string was reached)."""
        self.window.append(token)
        before = self.tok.decode(self.window[:self.read])
        now = self.tok.decode(self.window)
        # A byte-level token can end inside a UTF-8 character; wait for the rest of it.
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.pending += now[len(before):]
            self.window = self.window[self.read:]
            self.read = len(self.window)
        return self._release(final=False)

    def flush(self) -> tuple[str, bool]:
        """At the end: whatever is left (a partial character as U+FFFD)."""
        if self.stopped:
            return "", True
        before = self.tok.decode(self.window[:self.read])
        self.pending += self.tok.decode(self.window)[len(before):]
        self.window, self.read = [], 0
        return self._release(final=True)

    def _release(self, final: bool) -> tuple[str, bool]:
        # Only unsent text is kept: a stop string, or a start of one, never begins in text
        # already sent, since text that might start one is held back.
        text = self.pending
        hits = [i for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            self.pending, self.stopped = "", True
            return text[:min(hits)], True
        hold = 0 if final else max((k for s in self.stops for k in range(1, len(s))
                                    if text.endswith(s[:k])), default=0)
        cut = max(0, len(text) - hold)
        out, self.pending = text[:cut], text[cut:]
        return out, False
