"""The batching scheduler: one thread that decodes every running request together.

Between two decode steps it admits waiting requests into the running batch (a prefill each,
then a row of the slot cache), so a new request never waits for the others to finish; each row
has its own position, sampling, random generator and stop condition, and leaves the batch the
step it ends. Greedy rows are sampled together; a row's failure or cancellation touches no
other row. Events go back to the HTTP side through `deliver`, once per phase (not per token),
so that the event loop is woken once per step whatever the batch size.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from slms.infer.detokenize import TextStream
from slms.model import GPT
from slms.model.sampling import sample_next
from slms.serve.decode import SlotCache, decode_step, prefill
from slms.serve.protocol import GenRequest
from slms.tokenizer import Tokenizer


class Busy(Exception):
    """The queue of waiting requests is full."""


def check_capacity(max_batch: int, max_queue: int) -> None:
    """The scheduler's sizes (`slms serve --max-batch/--max-queue`): each at least 1."""
    if max_batch < 1 or max_queue < 1:
        raise ValueError(f"--max-batch and --max-queue must be >= 1; got "
                         f"{max_batch} and {max_queue}")


@dataclass
class Event:
    """What a request gets back: a text delta (maybe empty) with its token's record, or the
    end (finish: stop | length | error, with usage or an error message)."""

    text: str = ""
    token: dict[str, Any] | None = None  # extension record: id, text, experts, weights
    finish: str | None = None
    error: str | None = None
    usage: tuple[int, int] | None = None  # (prompt tokens, completion tokens)


@dataclass(eq=False)
class Job:
    """One request inside the scheduler. `cancelled` may be set from any thread."""

    req: GenRequest
    stream: TextStream
    generator: torch.Generator | None = None
    generated: list[int] = field(default_factory=list)
    last: int = -1  # the token to feed at the next step
    pending: Event | None = None  # routing wanted: the last token's event, until it is routed
    done: bool = False
    cancelled: bool = False
    handle: Any = None  # the HTTP side's (its queue); the scheduler never looks at it


Deliver = Callable[[list[tuple[Job, Event]]], None]


class Scheduler:
    """Decodes up to `max_batch` requests together on a thread; at most `max_queue` wait."""

    def __init__(self, model: GPT, tok: Tokenizer, deliver: Deliver, max_batch: int = 16,
                 max_queue: int = 64):
        check_capacity(max_batch, max_queue)
        self.model, self.tok, self.deliver = model.eval(), tok, deliver
        self.device = model.device
        self.max_batch, self.max_queue = max_batch, max_queue
        self.layers = model.moe_block_indices()
        self.active: list[Job] = []
        self.waiting: queue.Queue[Job] = queue.Queue()
        self.stats = {"steps": 0, "tokens": 0, "requests": 0, "rows": 0}
        self._routes: list[Any] = [None] * len(self.layers)
        self._hooks = [moe.router.register_forward_hook(self._hook(j))
                       for j, moe in enumerate(model.moe_layers())]
        self._out: list[tuple[Job, Event]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slms-scheduler", daemon=True)
        self.cache: SlotCache | None = None

    def _hook(self, j: int) -> Callable[..., None]:
        def hook(_module: Any, _inputs: Any, routing: Any) -> None:
            self._routes[j] = routing  # the Routing of the layer's last call; read after a step
        return hook

    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread; requests still running or waiting end with an error."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        for h in self._hooks:
            h.remove()
        while not self.waiting.empty():
            self._finish(self.waiting.get_nowait(), "error", "the server is shutting down")
        for job in self.active:
            self._finish(job, "error", "the server is shutting down")
        self._flush()

    def submit(self, req: GenRequest, handle: Any = None) -> Job:
        """Queue a request (Busy when max_queue are already waiting)."""
        if self.waiting.qsize() >= self.max_queue:
            raise Busy(f"the server is busy: {self.waiting.qsize()} requests are waiting for "
                       f"the {self.max_batch} running; retry later")
        s = req.sampling
        gen = None
        if s.seed is not None:  # as `slms generate`: a generator on the model's device
            gen = torch.Generator(device=self.device).manual_seed(s.seed)
        job = Job(req, TextStream(self.tok, req.stop), gen, handle=handle)
        self.waiting.put(job)
        return job

    def load(self) -> dict[str, int]:
        return {"running": len(self.active), "waiting": self.waiting.qsize(), **self.stats}

    def _run(self) -> None:
        with torch.inference_mode(), self.model.paused_stats():
            self.cache = SlotCache(self.model, self.max_batch, self.model.cfg.block_size)
            while not self._stop.is_set():
                try:
                    self._admit()
                    if self.active:
                        self._step()
                except Exception as e:  # noqa: BLE001 - a bug must not stop the server
                    for job in self.active:
                        self._finish(job, "error", f"internal error: {e}")
                    self.active.clear()
                self._flush()

    def _admit(self) -> None:
        """Prefill waiting requests into free rows (waits a little when nothing runs)."""
        block = not self.active
        while len(self.active) < self.max_batch and not self._stop.is_set():
            try:
                job = self.waiting.get(timeout=0.05) if block else self.waiting.get_nowait()
            except queue.Empty:
                return
            block = False
            if job.cancelled:
                continue
            try:
                logits_V, caches = prefill(self.model, job.req.ids)
                token = self._sample_row(job, logits_V[None])
            except Exception as e:  # noqa: BLE001 - this request fails, no other
                self._finish(job, "error", f"generation failed: {e}")
                continue
            self.cache.load(len(self.active), caches)
            self.active.append(job)
            self.stats["requests"] += 1
            self._accept(job, token)
            self._flush()  # its first token now, not after the other prefills

    def _step(self) -> None:
        """One decode step of every running row, then the ended rows leave."""
        B = len(self.active)
        tokens_B = torch.tensor([job.last for job in self.active], device=self.device)
        logits_BV = decode_step(self.model, self.cache, tokens_B).float()
        self.stats["steps"] += 1
        self.stats["rows"] += B
        routed = self._routing(B) if any(j.pending for j in self.active) else None
        chosen = self._sample(logits_BV)
        for i, job in enumerate(self.active):
            if job.pending is not None and routed is not None:
                job.pending.token.update(routed[i])
                self._emit(job, job.pending)
                job.pending = None
            if chosen[i] is not None and not job.done:
                self._accept(job, chosen[i])
        self._retire()

    def _routing(self, B: int) -> list[dict[str, list]]:
        """Per row: the experts (best first) and gate weights of its fed token, per MoE layer."""
        experts = [r.experts_TK[:B].tolist() for r in self._routes]  # (L, B, K)
        weights = [r.weights_TK[:B].float().tolist() for r in self._routes]
        return [{"experts": [e[b] for e in experts],
                 "weights": [[round(w, 3) for w in ws[b]] for ws in weights]} for b in range(B)]

    def _sample(self, logits_BV: torch.Tensor) -> list[int | None]:
        """The next token of every row; None for a row whose sampling failed (it ends)."""
        rows = self.active
        greedy = [i for i, j in enumerate(rows) if j.req.sampling.temperature == 0
                  and j.req.sampling.repetition_penalty == 1.0]
        out: list[int | None] = [None] * len(rows)
        if greedy:
            best = (logits_BV if len(greedy) == len(rows)
                    else logits_BV[torch.tensor(greedy, device=self.device)]).argmax(-1).tolist()
            for i, t in zip(greedy, best, strict=True):
                out[i] = t
        for i, job in enumerate(rows):
            if out[i] is None:
                try:
                    out[i] = self._sample_row(job, logits_BV[i:i + 1])
                except Exception as e:  # noqa: BLE001 - this row ends, no other
                    self._finish(job, "error", f"sampling failed: {e}")
        return out

    def _sample_row(self, job: Job, logits_1V: torch.Tensor) -> int:
        """As `GPT.iter_tokens` samples a row: the history is the prompt and the tokens so
        far, the generator the request's own."""
        s = job.req.sampling
        history = None
        if s.repetition_penalty != 1.0:
            history = torch.tensor([job.req.ids + job.generated], device=self.device)
        return int(sample_next(logits_1V.float(), s.temperature, s.top_k, s.top_p,
                               s.repetition_penalty, history, job.generator)[0])

    def _accept(self, job: Job, token: int) -> None:
        """A sampled token: text out, or the end of the request."""
        job.generated.append(token)
        self.stats["tokens"] += 1
        if token in job.req.stop_ids:
            self._finish(job, "stop")
            return
        job.last = token
        text, stopped = job.stream.push(token)
        record = {"id": token, "text": self.tok.decode([token])} if job.req.routing else None
        event = Event(text, record)
        if stopped or len(job.generated) >= job.req.sampling.max_new_tokens:
            self._emit(job, event)
            self._finish(job, "stop" if stopped else "length")
        elif record is not None and self.layers:
            job.pending = event  # sent with its routing after the next step
        else:
            self._emit(job, event)

    def _finish(self, job: Job, reason: str, error: str | None = None) -> None:
        if job.done:
            return
        job.done = True
        if job.pending is not None:  # never fed: its routing is unknown
            self._emit(job, job.pending)
            job.pending = None
        if reason != "error":
            text, _ = job.stream.flush()
            if text:
                self._emit(job, Event(text))
        self._emit(job, Event(finish=reason, error=error,
                              usage=(len(job.req.ids), len(job.generated))))

    def _retire(self) -> None:
        """Rows that ended or were cancelled leave; the last row moves into each gap."""
        for i in range(len(self.active) - 1, -1, -1):
            job = self.active[i]
            if not (job.done or job.cancelled):
                continue
            last = len(self.active) - 1
            if i != last:
                self.cache.move(last, i)
                self.active[i] = self.active[last]
            self.active.pop()

    def _emit(self, job: Job, event: Event) -> None:
        if not job.cancelled:
            self._out.append((job, event))

    def _flush(self) -> None:
        if self._out:
            out, self._out = self._out, []
            self.deliver(out)
