"""Conversation sources for fine-tuning, each yielding checked message lists per split.

A SOURCE is one of:
  - ``synthetic`` (the default): the embedded instruction corpus (`slms.instruct.corpus`);
  - a chat ``.jsonl`` file: one ``{"messages": [{"role": ..., "content": ...}, ...]}`` per line
    (the OpenAI / HF format). A line without messages, an unknown role or a conversation with no
    assistant turn is an error that names the line;
  - a TinyStoriesInstruct-style ``.txt`` file: entries separated by ``<|endoftext|>`` lines, each
    constraint lines (``Features: Dialogue``, ``Words: quack, cloud, happy``, ``Summary: ...``,
    ``Random sentence: ...``) then ``Story:`` and the story. The constraint lines become the user
    turn, the story the assistant turn; an entry without ``Story:`` is skipped and counted;
  - the hub dataset `HUB_INSTRUCT` (roneneldan/TinyStoriesInstruct, one line of that format per
    row), loaded with `datasets`.
A source without a validation split gets one carved out as `slms.data.sources` does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from slms.data.sources import EOT_LINE, SourceOptions, in_val
from slms.instruct.corpus import DEFAULT_CONVERSATIONS, instruction_corpus
from slms.instruct.template import ConversationError, check_messages

HUB_INSTRUCT = "roneneldan/TinyStoriesInstruct"
VAL_FRACTION = 0.05


class ChatSourceError(ValueError):
    """A conversation source that cannot be read; the message says where and what to do."""


class ChatSource:
    """`iter(split)` yields the split's conversations; `skipped` counts entries left out (a
    TinyStoriesInstruct entry without a story) per split."""

    def __init__(self, name: str = "synthetic", seed: int = 0,
                 conversations: int = DEFAULT_CONVERSATIONS):
        self.name, self.seed, self.conversations = name, seed, conversations
        self.skipped = {"train": 0, "val": 0}
        self.opts = SourceOptions(seed=seed, val_fraction=VAL_FRACTION)
        path = Path(name)
        if name in ("synthetic", HUB_INSTRUCT):
            self.kind = name
        elif path.is_file() and path.suffix.lower() == ".jsonl":
            self.kind = "jsonl"
        elif path.is_file() and path.suffix.lower() == ".txt":
            self.kind = "instruct-txt"
        elif path.exists():
            raise ChatSourceError(f"{name}: fine-tuning reads a chat .jsonl file, a "
                                  "TinyStoriesInstruct-style .txt file, 'synthetic' or "
                                  f"{HUB_INSTRUCT}")
        else:
            raise ChatSourceError(f"fine-tuning data '{name}' not found: give 'synthetic', a "
                                  f"chat .jsonl file, a TinyStoriesInstruct .txt file or "
                                  f"{HUB_INSTRUCT}")

    def iter(self, split: str) -> Iterator[list[dict[str, str]]]:
        if self.kind == "synthetic":
            requests = instruction_corpus(self.conversations, self.seed)
            n_val = max(1, round(len(requests) * VAL_FRACTION))
            if len(requests) < 2:
                raise ChatSourceError("the synthetic corpus needs at least 2 conversations")
            part = requests[-n_val:] if split == "val" else requests[:-n_val]
            for r in part:
                yield r.messages()
            return
        entries: Iterable[list[dict[str, str]] | None]
        if self.kind == "jsonl":
            entries = read_jsonl(Path(self.name))
        elif self.kind == "instruct-txt":
            entries = parse_instruct_lines(_lines(Path(self.name)))
        else:  # the hub dataset has its own validation split
            entries = parse_instruct_lines(self._hub_lines(split))
        for i, messages in enumerate(entries):
            if self.kind != HUB_INSTRUCT and in_val(i, self.opts) != (split == "val"):
                continue
            if messages is None:
                self.skipped[split] += 1
            else:
                yield messages

    def _hub_lines(self, split: str) -> Iterator[str]:
        try:
            import datasets
        except ImportError:
            raise ChatSourceError(f"loading {HUB_INSTRUCT} needs `pip install 'slms[data]'`"
                                  ) from None
        try:
            ds = datasets.load_dataset(HUB_INSTRUCT, split="validation" if split == "val"
                                       else "train", streaming=True)
        except Exception as e:  # network, cache: one line for the user
            raise ChatSourceError(f"could not load {HUB_INSTRUCT}: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}") from None
        for row in ds:
            yield row["text"]


def _lines(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            yield line.rstrip("\r\n")


def read_jsonl(path: Path) -> Iterator[list[dict[str, str]]]:
    """The conversations of a chat JSONL file; a malformed one is an error naming its line."""
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ChatSourceError(f"{path}:{n} is not valid JSON") from None
            if not isinstance(record, dict) or "messages" not in record:
                raise ChatSourceError(f"{path}:{n} has no 'messages' field; each line must be "
                                      '{"messages": [{"role": ..., "content": ...}, ...]}')
            try:
                yield check_messages(record["messages"])
            except ConversationError as e:
                raise ChatSourceError(f"{path}:{n}: {e}") from None


def parse_instruct_lines(lines: Iterable[str]) -> Iterator[list[dict[str, str]] | None]:
    """TinyStoriesInstruct entries as conversations (None for an entry with no story)."""
    entry: list[str] = []
    for line in lines:
        if line.strip() == EOT_LINE:
            if any(s.strip() for s in entry):
                yield instruct_entry(entry)
            entry = []
        else:
            entry.append(line)
    if any(s.strip() for s in entry):
        yield instruct_entry(entry)


def instruct_entry(lines: list[str]) -> list[dict[str, str]] | None:
    """One entry: the constraint lines before ``Story:`` (user), the story after it
    (assistant); None when there is no ``Story:`` line or no story or no constraint."""
    for i, line in enumerate(lines):
        if line.strip().startswith("Story:"):
            constraints = "\n".join(s.strip() for s in lines[:i] if s.strip())
            story = "\n".join([line.strip()[len("Story:"):].strip(), *lines[i + 1:]]).strip()
            if not story or not constraints:
                return None
            return [{"role": "user", "content": constraints},
                    {"role": "assistant", "content": story}]
    return None
