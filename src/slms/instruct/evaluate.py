"""`slms eval-instruct`: how often a model's answer contains everything a request asks for.

Each held-out request (`slms.instruct.corpus.held_out_requests`: name, object and place of a
combination no fine-tuning conversation has) is sent with the chat template; the answer ends at
<|im_end|> (or <|endoftext|>, a base model's end of story). A request is honoured when the answer
contains every requested phrase as whole words (`corpus.honoured`). The same prompts through the
base model are the baseline. Requests of another SOURCE are its validation conversations whose
last user turn has a ``Words:`` line (TinyStoriesInstruct's constraint): each word must appear.
Also reported: bits per byte of each model on the held-out assistant turns (the reference
stories), the prompt given.

Generation is batched by prompt length, in a fixed order with one seeded generator per batch,
so the answers are a function of (model, requests, seed).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from slms.analysis.evaluate import evaluate_batches
from slms.checkpoint import load_checkpoint
from slms.constants import IGNORE_INDEX
from slms.infer.sampling import Sampling
from slms.instruct import template
from slms.instruct.corpus import ELEMENTS, Request, held_out_requests, honoured
from slms.instruct.prepare import pack_rows
from slms.instruct.sources import ChatSource
from slms.model import GPT
from slms.rundir import RunDir, resolve
from slms.tokenizer import Tokenizer

BATCH = 32
DEFAULT_SAMPLING = Sampling(max_new_tokens=256, temperature=0.7, top_k=40, seed=0)


def words_requests(source: str, n: int, seed: int = 0) -> tuple[list[Request], int]:
    """(up to `n` requests from the validation conversations of `source` whose last user turn
    has a ``Words:`` line, the number of conversations without one)."""
    out, skipped = [], 0
    for messages in ChatSource(source, seed).iter("val"):
        if len(out) == n:
            break
        users = [m for m in messages if m["role"] == "user"]
        line = next((s for s in (users[-1]["content"].splitlines() if users else [])
                     if s.startswith("Words:")), None)
        if line is None:
            skipped += 1
            continue
        words = tuple(w.strip() for w in line[len("Words:"):].split(",") if w.strip())
        story = next((m["content"] for m in reversed(messages) if m["role"] == "assistant"), "")
        out.append(Request(users[-1]["content"], story, {"words": words}))
    if not out:
        raise ValueError(f"{source} has no validation conversation with a 'Words:' line to "
                         "check answers against; use the default synthetic requests")
    return out, skipped


def answers(model: GPT, tok: Tokenizer, prompts: list[list[int]], s: Sampling) -> list[str]:
    """Each prompt's answer, up to the first stop id (<|im_end|> or <|endoftext|>)."""
    stops = torch.tensor(sorted(template.stop_ids(tok)), device=model.device)
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_len[len(p)].append(i)
    out = [""] * len(prompts)
    batch_no = 0
    for length in sorted(by_len):
        group = by_len[length]
        for a in range(0, len(group), BATCH):
            rows = group[a:a + BATCH]
            n_new = min(s.max_new_tokens, model.cfg.block_size - length)
            if n_new < 1:
                continue  # no room for an answer: it stays empty, not honoured
            gen = torch.Generator(device=model.device).manual_seed((s.seed or 0) + batch_no)
            batch_no += 1
            idx = torch.tensor([prompts[i] for i in rows], device=model.device)
            done = torch.zeros(len(rows), dtype=torch.bool, device=model.device)
            new: list[torch.Tensor] = []
            for nxt in model.iter_tokens(idx, n_new, s.temperature, s.top_k, s.top_p,
                                         s.repetition_penalty, None, gen):
                new.append(nxt)
                done |= torch.isin(nxt, stops)
                if bool(done.all()):
                    break
            ids = torch.stack(new, 1).tolist() if new else [[] for _ in rows]
            for i, row in zip(rows, ids, strict=True):
                cut = next((j for j, t in enumerate(row) if t in template.stop_ids(tok)),
                           len(row))
                out[i] = tok.decode(row[:cut])
    return out


def answer_bits_per_byte(model: GPT, tok: Tokenizer, requests: list[Request]) -> float:
    """Bits per byte of the reference answers (the assistant's turns) given their requests."""
    convs = [template.render(tok, r.messages()) for r in requests]
    convs = [c for c in convs if len(c[0]) <= model.cfg.block_size + 1]
    if not convs:
        return float("nan")
    ids, scored, _ = pack_rows(convs, model.cfg.block_size + 1, tok.eos_id,
                               pack=model.cfg.document_mask)
    x = torch.from_numpy(ids[:, :-1])
    y = torch.from_numpy(ids[:, 1:]).clone()
    y[~torch.from_numpy(scored[:, 1:])] = IGNORE_INDEX
    batches = [(x[a:a + BATCH], y[a:a + BATCH]) for a in range(0, len(x), BATCH)]
    nats, _ = evaluate_batches(model, batches, model.device)
    n_bytes = sum(len(r.story.encode("utf-8")) for r in requests[:len(convs)])
    return nats / math.log(2) / n_bytes


def score(model: GPT, tok: Tokenizer, requests: list[Request], s: Sampling
          ) -> dict[str, Any]:
    """{"honoured", "by_element", "bits_per_byte", "answers": [...], "checks": [...]}."""
    template.require_chat_tokens(tok)
    prompts = [template.prompt(tok, [{"role": "user", "content": r.text}]) for r in requests]
    texts = answers(model, tok, prompts, s)
    checks = [honoured(t, r.wants) for t, r in zip(texts, requests, strict=True)]
    by_element = {}
    for k in ELEMENTS:
        asked = [c[k] for c in checks if k in c]
        if asked:
            by_element[k] = sum(asked) / len(asked)
    return {"honoured": sum(all(c.values()) for c in checks) / len(checks),
            "by_element": by_element, "bits_per_byte": answer_bits_per_byte(model, tok, requests),
            "answers": texts, "checks": checks}


def base_of(run: str | Path) -> Path | None:
    """The checkpoint a fine-tune started from (its run config's train.init_from)."""
    found = RunDir.containing(resolve(run))
    if found is None or not found.config_file.is_file():
        return None
    init = found.read_config().get("train", {}).get("init_from")
    return Path(init) if init else None


def eval_instruct(run: str | Path, n: int = 200, source: str | None = None,
                  base: str | Path | None = None, s: Sampling = DEFAULT_SAMPLING,
                  out: str | Path | None = None, device: str = "cpu", seed: int = 0,
                  log=print, with_base: bool = True) -> dict[str, Any]:
    """Score `run` (and its base) on `n` requests; writes one JSONL record per request to `out`
    (default RUN/eval-instruct.jsonl). Returns the summary (`--json`'s object)."""
    ckpt = resolve(run)
    base_ckpt = resolve(base) if base is not None else base_of(run)
    if not with_base:
        base_ckpt = None
    if source is None or source == "synthetic":
        requests, skipped = held_out_requests(n, seed), 0
    else:
        requests, skipped = words_requests(source, n, seed)
    models = {"model": ckpt, **({"base": base_ckpt} if base_ckpt is not None else {})}
    results = {}
    for role, path in models.items():
        model, tok, _ = load_checkpoint(path, device=device)
        log(f"{role}: {path}: answering {len(requests)} requests ...")
        results[role] = score(model, tok, requests, s)
    out_path = Path(out) if out else (RunDir.containing(ckpt) or RunDir(ckpt)).path / \
        "eval-instruct.jsonl"
    lines = []
    for i, r in enumerate(requests):
        rec: dict[str, Any] = {"request": r.text, "wants": r.wants}
        for role, res in results.items():
            rec[role] = {"answer": res["answers"][i], "honoured": all(res["checks"][i].values()),
                         "by_element": res["checks"][i]}
        lines.append(json.dumps(rec))
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out_path)
    summary: dict[str, Any] = {
        "requests": len(requests), "skipped": skipped, "checkpoint": str(ckpt),
        **{k: results["model"][k] for k in ("honoured", "by_element", "bits_per_byte")},
        "sampling": {"temperature": s.temperature, "top_k": s.top_k, "seed": s.seed,
                     "max_new_tokens": s.max_new_tokens}, "jsonl": str(out_path)}
    if "base" in results:
        summary["base"] = {"checkpoint": str(base_ckpt), **{
            k: results["base"][k] for k in ("honoured", "by_element", "bits_per_byte")}}
    return summary


def summary_lines(r: dict[str, Any]) -> list[str]:
    """The console report of `eval_instruct`'s summary."""
    def line(name: str, x: dict[str, Any]) -> str:
        parts = ", ".join(f"{k} {v:.1%}" for k, v in x["by_element"].items())
        return (f"{name}: honoured {x['honoured']:.1%} of {r['requests']} requests ({parts}); "
                f"{x['bits_per_byte']:.3f} bits/byte on the reference answers")
    out = [line("fine-tuned" if "base" in r else "model", r)]
    if "base" in r:
        out.append(line("base", r["base"]))
    if r["skipped"]:
        out.append(f"({r['skipped']} conversations without a Words: line were not used)")
    out.append(f"per request: {r['jsonl']}")
    return out
