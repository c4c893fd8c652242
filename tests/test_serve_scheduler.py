"""The serve scheduler without HTTP: the per-row decode step against the model's forward,
batched requests against the same requests alone, cancellation and a failing row that leaves
the others untouched (stop strings: test_infer_detokenize.py)."""

import time

import pytest
import torch

import slms.serve.scheduler as scheduler_module
from conftest import assert_rows_decode_as_each_alone, tiny_config
from slms.analysis.routing import route_tokens
from slms.infer.generate import Sampling, generate_text
from slms.model import GPT
from slms.serve.protocol import GenRequest
from slms.serve.scheduler import Busy, Scheduler


def _model(moe: bool = True, **kw) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config(moe=moe, block_size=64, **kw)).eval()


@pytest.mark.parametrize("kw", [dict(moe=False), dict(moe=True),
                                dict(moe=True, positions="rope", qk_norm=True, norm="rmsnorm",
                                     logit_softcap=15.0),
                                dict(moe=False, positions="rope", document_mask=True),
                                dict(moe=True, positions="rope", qk_norm=True, norm="rmsnorm",
                                     activation="relu2", document_mask=True),
                                dict(moe=False, activation="swiglu", tie_weights=False)])
def test_decode_step_equals_full_forward_for_rows_of_different_lengths(kw):
    assert_rows_decode_as_each_alone(_model(**kw), 300, max_len=64)


def _req(tok, prompt: str, n: int = 12, stop=(), routing=False, **s) -> GenRequest:
    return GenRequest(tok.encode_prompt(prompt), Sampling(max_new_tokens=n, **s),
                      tuple(stop), frozenset({tok.eos_id}), routing=routing)


def _serve(model, tok, reqs, max_batch=16, on_event=None):
    """Run `reqs` through one scheduler, all submitted before it starts (so they are batched);
    returns ({i: text}, {i: finish event}, {i: token records}, the scheduler)."""
    text, end, records = {}, {}, {}

    def deliver(items):
        for job, e in items:
            i = job.handle
            text[i] = text.get(i, "") + e.text
            if e.token is not None:
                records.setdefault(i, []).append(e.token)
            if e.finish is not None:
                end[i] = e
            if on_event is not None:
                on_event(job, e)

    sched = Scheduler(model, tok, deliver, max_batch=max_batch, max_queue=64)
    jobs = [sched.submit(r, i) for i, r in enumerate(reqs)]
    sched.start()
    try:
        while len(end) < len(jobs) - sum(j.cancelled for j in jobs) or sched.active:
            time.sleep(0.005)
    finally:
        sched.close()
    return text, end, records, sched


def _mixed_requests(tok):
    prompts = ["Once upon a time", "The little dog", "Lily and Tom", "A big red ball", "Sam"]
    reqs = []
    for i in range(16):
        p = prompts[i % 5] + " " * (i // 5)
        if i % 4 == 0:
            reqs.append(_req(tok, p, 6 + i, temperature=0.9, top_k=None, seed=i))
        elif i % 4 == 1:
            reqs.append(_req(tok, p, 20, temperature=0.7, top_k=20, top_p=0.9, seed=100 + i,
                             repetition_penalty=1.3))
        else:
            reqs.append(_req(tok, p, 4 + 2 * i, temperature=0))
    return reqs


def test_a_batch_of_16_equals_each_request_alone(tokenizer):
    model = _model()
    reqs = _mixed_requests(tokenizer)
    batched, ends, _, sched = _serve(model, tokenizer, reqs)
    assert sched.stats["requests"] == 16
    assert sched.stats["rows"] > 4 * sched.stats["steps"]  # really decoded together
    for i, r in enumerate(reqs):
        alone, alone_end, _, _ = _serve(model, tokenizer, [r])
        assert batched[i] == alone[0], f"request {i}"
        assert ends[i].finish == alone_end[0].finish and ends[i].usage == alone_end[0].usage


def test_served_text_equals_slms_generate(tokenizer):
    model = _model()
    for s in (dict(temperature=0), dict(temperature=0.8, top_k=50, seed=3)):
        sampling = Sampling(max_new_tokens=20, **s)
        want = generate_text(model, tokenizer, "Once upon a time", sampling)
        got, ends, _, _ = _serve(model, tokenizer, [_req(tokenizer, "Once upon a time", 20,
                                                          **s)])
        assert got[0] == want
        assert ends[0].usage[0] == len(tokenizer.encode_prompt("Once upon a time"))


def test_routing_records_are_the_experts_of_each_generated_token(tokenizer):
    model = _model()
    req = _req(tokenizer, "Once upon a time", 10, routing=True, temperature=0)
    _, ends, records, _ = _serve(model, tokenizer, [req])
    ids = req.ids + [r["id"] for r in records[0]]
    layers, experts_LTK = route_tokens(model, ids)
    assert len(records[0]) == 10 and ends[0].finish == "length"
    for t, rec in enumerate(records[0][:-1]):  # the last token is never fed: no routing
        pos = len(req.ids) + t
        assert rec["experts"] == [experts_LTK[j, pos].tolist() for j in range(len(layers))]
        assert all(abs(sum(w) - 1) < 1e-2 for w in rec["weights"])  # renormalised top-k
    assert "experts" not in records[0][-1]


def test_a_failing_or_cancelled_row_leaves_the_others_untouched(tokenizer, monkeypatch):
    model = _model()
    reqs = [_req(tokenizer, "Once upon a time", 16, temperature=0),
            _req(tokenizer, "The little dog", 16, temperature=0.9, seed=13),
            _req(tokenizer, "Lily", 16, temperature=0),
            _req(tokenizer, "Sam", 40, temperature=0)]
    alone = [_serve(model, tokenizer, [r])[0][0] for r in reqs]
    real = scheduler_module.sample_next
    calls = []

    def failing(*a, **k):
        if a[6] is not None:  # the seeded row's generator
            calls.append(1)
            if len(calls) == 3:  # its third token
                raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(scheduler_module, "sample_next", failing)

    def cancel_sam(job, e):
        if job.handle == 3 and e.text:
            job.cancelled = True  # as the HTTP side does when its client goes away

    text, ends, _, sched = _serve(model, tokenizer, reqs, on_event=cancel_sam)
    assert ends[1].finish == "error" and "boom" in ends[1].error
    assert text[0] == alone[0] and text[2] == alone[2]
    assert 3 not in ends and len(text.get(3, "")) < len(alone[3])
    assert sched.active == []


def test_the_queue_is_bounded(tokenizer):
    sched = Scheduler(_model(), tokenizer, lambda items: None, max_batch=1, max_queue=2)
    sched.submit(_req(tokenizer, "a"))
    sched.submit(_req(tokenizer, "b"))
    with pytest.raises(Busy, match="busy: 2 requests are waiting"):
        sched.submit(_req(tokenizer, "c"))
    with pytest.raises(ValueError, match="max-queue must be >= 1"):
        Scheduler(_model(), tokenizer, lambda items: None, max_queue=0)


def test_serve_checks_its_sizes_before_the_model_loads(tmp_path, capsys):
    from slms.cli import main

    assert main(["serve", str(tmp_path / "no-such-run"), "--max-batch", "0"]) == 2
    err = capsys.readouterr().err
    assert "--max-batch and --max-queue must be >= 1; got 0 and 64" in err
