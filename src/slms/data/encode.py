"""Stories to token ids for `slms prepare`: chunk by chunk, in order, on a thread or on worker
processes, with a bounded number of chunks in flight so that memory does not grow with the input.

Two engines, the same bytes out:
  - threads (``num_proc=1``): one process. `tokenizers` encodes a batch on every core (Rayon)
    with the GIL released, so one encoder thread keeps the cores busy while the main thread reads
    the next chunk and writes the previous one.
  - processes (``num_proc=N``): N spawned workers, each with a tokenizer on its share of the
    cores (one thread each when N >= the cores). A worker returns its chunk as numpy arrays, not
    lists of ints, so the results cross the process boundary as a copy of bytes instead of a
    pickle of a million Python ints.
``auto`` is the threads engine: on the 2-core machines measured (docs/benchmarks.md) it is the
faster at every input size, as the processes share the same cores and pay for start-up and IPC.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np

from slms.tokenizer import Tokenizer

IN_FLIGHT_PER_WORKER = 2  # chunks queued per worker: one being encoded, one waiting


@dataclass(frozen=True)
class EncodedChunk:
    """A chunk of S stories as token ids."""

    ids: np.ndarray  # (N,) each story's ids followed by the end-of-text id, concatenated
    lengths: np.ndarray  # (S,) int64, ids per story, its end-of-text id included
    n_bytes: int  # UTF-8 bytes of the chunk's text


def encode_chunk(tok: Tokenizer, chunk: list[str], dtype: np.dtype) -> EncodedChunk:
    """Encode `chunk`, each story followed by `tok.eos_id`, as `dtype` ids."""
    seqs = tok.encode_batch_fast(chunk)
    for seq in seqs:
        seq.append(tok.eos_id)
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64,
                       count=int(lengths.sum()))
    if flat.size and int(flat.max()) > np.iinfo(dtype).max:
        raise ValueError(f"token id {int(flat.max())} does not fit in {dtype}")
    n_bytes = sum(map(len, map(str.encode, chunk)))
    return EncodedChunk(flat.astype(dtype), lengths, n_bytes)


def resolve_num_proc(num_proc: int | str) -> int:
    """The worker processes `num_proc` asks for: ``auto`` is 1 (the threads engine)."""
    if num_proc == "auto":
        return 1
    if isinstance(num_proc, int) and not isinstance(num_proc, bool) and num_proc >= 1:
        return num_proc
    raise ValueError(f"--num-proc must be 'auto' or an integer >= 1, not {num_proc!r}")


_worker: tuple[Tokenizer, np.dtype] | None = None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _init_worker(tok_json: str, dtype: str, threads: int) -> None:
    global _worker
    # Each worker encodes on its share of the cores: a tokenizer on every core in each worker
    # would oversubscribe them. Set before the first encode, which starts the thread pool.
    if threads == 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    else:
        os.environ["RAYON_NUM_THREADS"] = str(threads)
    _worker = (Tokenizer.from_str(tok_json), np.dtype(dtype))


def _encode_in_worker(chunk: list[str]) -> EncodedChunk:
    assert _worker is not None, "worker not initialised"
    return encode_chunk(_worker[0], chunk, _worker[1])


class Encoder:
    """Encodes chunks of stories on `num_proc` processes (1: a thread of this process).

    One Encoder serves every split of a preparation, so workers start once. Use it as a context
    manager; `map` yields an EncodedChunk per chunk, in order."""

    def __init__(self, tok: Tokenizer, dtype: np.dtype, num_proc: int):
        self.pool: Executor
        if num_proc == 1:
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="slms-encode")
            self.fn = partial(encode_chunk, tok, dtype=dtype)
        else:
            # spawn, not fork: no fork of a process that may hold tokenizer or torch threads
            self.pool = ProcessPoolExecutor(num_proc, mp_context=mp.get_context("spawn"),
                                            initializer=_init_worker,
                                            initargs=(tok.to_str(), dtype.str,
                                                      max(1, usable_cores() // num_proc)))
            self.fn = _encode_in_worker
        self.in_flight = IN_FLIGHT_PER_WORKER * num_proc

    def map(self, chunks: Iterable[list[str]]) -> Iterator[EncodedChunk]:
        pending: deque[Future[EncodedChunk]] = deque()
        for chunk in chunks:
            pending.append(self.pool.submit(self.fn, chunk))
            if len(pending) >= self.in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def __enter__(self) -> Encoder:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.pool.shutdown(wait=True, cancel_futures=exc_type is not None)
