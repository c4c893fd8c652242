"""`slms chat`: the seed's interactive session done properly. A prompt streams a story; lines
starting with ':' are commands. Reads piped stdin as well as a terminal; EOF and Ctrl-C end it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import fields, replace
from typing import TextIO

import torch

from slms.infer.generate import Sampling, check_room, prompt_ids, stream_text
from slms.model import GPT
from slms.tokenizer import Tokenizer

EXAMPLES = ["Once upon a time", "The little dog", "Lily and Tom went to the park"]
HELP = """commands:
  :help                      this list
  :examples                  a story for each example prompt
  :settings [key=value ...]  show or change max_tokens, temperature, top_k, top_p,
                             repetition_penalty, seed (e.g. :settings temperature=0.5 top_k=20)
  :benchmark                 generation speed with and without the KV cache
  :analyze [prompt]          generate, then show the experts each token used, per MoE layer
  :reset                     chat mode (--chat): forget the conversation so far
  :quit                      leave (so do Ctrl-D and Ctrl-C)
anything else is a prompt: the model continues it (with --chat: a message it answers)."""
# setting name -> (Sampling field, parser); 0 turns top_k off, 1.0 turns top_p off. Sampling
# checks the values (a top_p of 5 is an error, not "off").
SETTINGS: dict[str, tuple[str, Callable[[str], object]]] = {
    "max_tokens": ("max_new_tokens", int),
    "max_new_tokens": ("max_new_tokens", int),
    "temperature": ("temperature", float),
    "top_k": ("top_k", lambda v: int(v) or None),
    "top_p": ("top_p", lambda v: None if v.lower() == "none" else float(v)),
    "repetition_penalty": ("repetition_penalty", float),
    "seed": ("seed", lambda v: None if v.lower() == "none" else int(v)),
}


class Chat:
    """The session. With `chat` (a fine-tuned model), each line is a user message and the model
    answers in turn: the conversation is rendered with the chat template (oldest turns left
    out when it outgrows the context), each answer ends at <|im_end|>; :reset starts over."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, sampling: Sampling | None = None,
                 out: TextIO | None = None, chat: bool = False):
        self.model, self.tok = model, tokenizer
        if chat:
            from slms.instruct.template import require_chat_tokens

            require_chat_tokens(tokenizer)
        self.chat = chat
        self.history: list[dict[str, str]] = []
        self.s = sampling or Sampling(max_new_tokens=min(200, model.cfg.block_size // 2))
        check_room(self.s.max_new_tokens, model.cfg.block_size)
        self.out = out or sys.stdout
        self.last_prompt = EXAMPLES[0]

    def say(self, text: str = "", end: str = "\n") -> None:
        print(text, end=end, file=self.out, flush=True)

    def story(self, prompt: str) -> str:
        ids = prompt_ids(self.tok, prompt, self.model.cfg.block_size, self.s.max_new_tokens,
                         truncate="left", warn=self.say)
        self.say(prompt, end="")
        pieces = []
        for piece in stream_text(self.model, self.tok, ids, self.s):
            pieces.append(piece)
            self.say(piece, end="")
        self.say()
        return "".join(pieces)

    def answer(self, message: str) -> str:
        """Chat mode: the model's answer to `message`, after the turns so far."""
        from slms.infer.generate import chat_prompt_ids
        from slms.instruct.template import stop_ids

        turns = [*self.history, {"role": "user", "content": message}]
        ids = chat_prompt_ids(self.tok, turns, self.model.cfg.block_size, self.s.max_new_tokens)
        pieces = []
        for piece in stream_text(self.model, self.tok, ids, self.s, stop_ids(self.tok)):
            pieces.append(piece)
            self.say(piece, end="")
        self.say()
        text = "".join(pieces)
        self.history = [*turns, {"role": "assistant", "content": text}]
        return text

    def handle(self, line: str) -> bool:
        """Act on one input line; False when the session should end."""
        line = line.strip()
        if not line:
            return True
        if not line.startswith(":"):
            self.last_prompt = line
            try:
                self.answer(line) if self.chat else self.story(line)
            except ValueError as e:  # too long for the context: say so, keep the session
                self.say(f"error: {e}")
            return True
        cmd, _, rest = line[1:].partition(" ")
        cmd = cmd.lower()
        if cmd in ("quit", "q", "exit"):
            return False
        actions = {"help": lambda: self.say(HELP), "examples": self.examples,
                   "settings": lambda: self.settings(rest), "benchmark": self.benchmark,
                   "analyze": lambda: self.analyze(rest.strip() or self.last_prompt),
                   "reset": self.reset}
        if cmd not in actions:
            self.say(f"unknown command :{cmd} (type :help)")
            return True
        try:
            actions[cmd]()
        except ValueError as e:  # a bad setting or prompt: say so and keep the session
            self.say(f"error: {e}")
        return True

    def reset(self) -> None:
        self.history = []
        self.say("conversation cleared")

    def examples(self) -> None:
        for p in EXAMPLES:
            self.say(f"--- {p!r}")
            self.story(p)

    def settings(self, args: str) -> None:
        updates = {}
        for item in args.split():
            key, eq, value = item.partition("=")
            if not eq or key not in SETTINGS:
                raise ValueError(f"bad setting {item!r}; use key=value with key one of "
                                 f"{', '.join(k for k in SETTINGS if k != 'max_new_tokens')}")
            name, parse = SETTINGS[key]
            try:
                updates[name] = parse(value)
            except ValueError:
                raise ValueError(f"bad value for {key}: {value!r}") from None
        new = replace(self.s, **updates)  # Sampling checks each value
        check_room(new.max_new_tokens, self.model.cfg.block_size)
        self.s = new
        self.say("  ".join(f"{f.name}={getattr(self.s, f.name)}" for f in fields(self.s)))

    def benchmark(self) -> None:
        from slms.analysis.bench import gen_speed

        device = next(self.model.parameters()).device
        n = self.s.max_new_tokens
        prompt = min(16, self.model.cfg.block_size - n)
        for cached in (True, False):
            tps, ttft = gen_speed(self.model, 1, n, prompt, cached, device)
            self.say(f"{'with' if cached else 'without'} KV cache: {tps:,.1f} tokens/s, "
                     f"first token after {ttft * 1000:,.0f} ms ({n} tokens, batch 1, greedy)")

    def analyze(self, prompt: str) -> None:
        from slms.analysis.routing import route_tokens

        if not self.model.moe_layers():
            self.say("this model is dense: it has no experts to analyze")
            return
        text = prompt + self.story(prompt)
        ids = self.tok.encode_prompt(text)[-self.model.cfg.block_size:]
        layers, experts_LTK = route_tokens(self.model, ids)
        self.say("token            " + " ".join(f"L{i:<5}" for i in layers)
                 + "  (experts, best first)")
        for t, tid in enumerate(ids):
            piece = repr(self.tok.decode([tid]))[:16]
            cells = " ".join(",".join(str(int(e)) for e in experts_LTK[j, t]).ljust(6)
                             for j in range(len(layers)))
            self.say(f"{piece:<16} {cells}")
        top1 = experts_LTK[..., 0]
        for j, i in enumerate(layers):
            counts = torch.bincount(top1[j], minlength=self.model.cfg.moe.n_experts).tolist()
            self.say(f"layer {i}: top-1 tokens per expert {counts}")


def run_chat(model: GPT, tokenizer: Tokenizer, sampling: Sampling | None = None,
             stdin: TextIO | None = None, out: TextIO | None = None, chat: bool = False) -> int:
    """The session loop: a greeting, then one line at a time until :quit, EOF or Ctrl-C."""
    session = Chat(model, tokenizer, sampling, out, chat)
    stdin = stdin or sys.stdin
    if stdin is sys.stdin and hasattr(stdin, "reconfigure"):
        stdin.reconfigure(errors="replace")  # bytes that are not UTF-8 read as U+FFFD
    interactive = stdin is sys.stdin and stdin.isatty()
    kind = "dense"
    if model.cfg.moe is not None:
        kind = f"MoE, {model.cfg.moe.n_experts} experts top-{model.cfg.moe.top_k}"
    session.say(f"slms chat ({kind}, {model.cfg.n_layer} layers, context {model.cfg.block_size}). "
             + ("Type a message, or :help." if chat else "Type a prompt, or :help."))
    try:
        while True:
            if interactive:
                try:
                    line = input("> ")  # line editing when readline is available
                except EOFError:
                    break
            else:
                line = stdin.readline()
                if not line:  # EOF
                    break
            t0 = time.perf_counter()
            if not session.handle(line):
                break
            if interactive:
                session.say(f"({time.perf_counter() - t0:.1f} s)")
    except KeyboardInterrupt:
        session.say()
    session.say("bye")
    return 0
