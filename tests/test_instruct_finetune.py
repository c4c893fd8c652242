"""Instruction fine-tuning data (slms.instruct): the chat template's ids and loss mask, the
masked loss (a user or system target changes nothing, an assistant's does), packed
conversations scored as each alone, the sources (chat JSONL, TinyStoriesInstruct text) and their
bad input, and `slms finetune` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import tiny_config
from slms.analysis.evaluate import evaluate
from slms.config import MoEConfig
from slms.constants import IGNORE_INDEX
from slms.data.loader import PackedData
from slms.instruct.prepare import prepare_chat
from slms.instruct.sources import ChatSource, ChatSourceError, parse_instruct_lines
from slms.instruct.template import IM_END, render, render_text
from slms.model import GPT

CONVERSATIONS = [
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "A cat."},
     {"role": "assistant", "content": "Tom had a cat."}],
    [{"role": "user", "content": "Write about Mia."},
     {"role": "assistant", "content": "Mia ran."}, {"role": "user", "content": "More."},
     {"role": "assistant", "content": "Mia was happy."}],
    [{"role": "user", "content": "A dog."}, {"role": "assistant", "content": "Max had a dog."}],
]


def write_jsonl(path, convs) -> None:
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))


def test_render_is_the_servers_string_and_scores_only_assistant_turns(tokenizer):
    conv = CONVERSATIONS[1]
    ids, scored = render(tokenizer, conv)
    assert ids == tokenizer.encode_prompt(render_text(conv))  # what slms serve encodes
    assert len(scored) == len(ids)
    kept = tokenizer.decode(i for i, s in zip(ids, scored, strict=True) if s)
    assert kept == f"Mia ran.{IM_END}Mia was happy.{IM_END}"


def prepared(tmp_path, tokenizer, convs, name="d", pack=True, block_size=128):
    src = tmp_path / f"{name}.jsonl"
    write_jsonl(src, convs)
    prepare_chat(ChatSource(str(src)), tokenizer, tmp_path / name, block_size, pack,
                 log=lambda m: None)
    return PackedData(tmp_path / name)


def loss_and_grads(model, x, y, real):
    model.zero_grad()
    out = model(x, y, real_BT=real)
    out.loss.backward()
    return out.loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("moe", [False, True])
def test_only_assistant_targets_move_the_loss_and_gradients(tmp_path, tokenizer, moe):
    data = prepared(tmp_path, tokenizer, CONVERSATIONS * 8)
    x, y, real = data.train_rows(2, 128, seed=0, step=0)
    raw = torch.from_numpy(np.array(data.splits["train"], dtype=np.int64))
    scored = torch.from_numpy(np.array(data.scored["train"], dtype=bool))
    rows = data._pass_rows(0, 0, 2)  # the rows of step 0
    # the loader's targets are the row's next ids where scored, IGNORE_INDEX elsewhere
    want = torch.where(scored[rows, 1:], raw[rows, 1:], IGNORE_INDEX)
    assert torch.equal(y, want) and bool(real.any()) and bool((y == IGNORE_INDEX).any())
    torch.manual_seed(0)
    model = GPT(tiny_config(moe=MoEConfig(n_experts=4, top_k=2, router="topk",
                                          expert_hidden=32) if moe else False,
                            vocab_size=tokenizer.vocab_size, block_size=128,
                            positions="rope", document_mask=True)).train()
    base_loss, base_grads = loss_and_grads(model, x, y, real)

    def with_target(pos: tuple[int, int]):
        b, t = pos
        other = raw[rows, 1:].clone()
        other[b, t] = (other[b, t] + 1) % tokenizer.vocab_size
        return torch.where(scored[rows, 1:], other, IGNORE_INDEX)

    user = torch.nonzero(real & ~scored[rows, 1:])[0]
    loss, grads = loss_and_grads(model, x, with_target(tuple(user.tolist())), real)
    assert torch.equal(loss, base_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, base_grads, strict=True))
    helper = torch.nonzero(scored[rows, 1:])[0]  # an assistant's target
    loss, grads = loss_and_grads(model, x, with_target(tuple(helper.tolist())), real)
    assert not torch.equal(loss, base_loss)
    assert any(not torch.equal(a, b) for a, b in zip(grads, base_grads, strict=True))


def test_packed_conversations_score_as_each_alone(tmp_path, tokenizer):
    convs = CONVERSATIONS * 3
    packed = prepared(tmp_path, tokenizer, convs, "packed", pack=True)
    alone = prepared(tmp_path, tokenizer, convs, "alone", pack=False)
    assert len(packed.splits["train"]) < len(alone.splits["train"])
    torch.manual_seed(0)
    model = GPT(tiny_config(moe=MoEConfig(n_experts=4, top_k=2, router="topk",
                                          expert_hidden=32),
                            vocab_size=tokenizer.vocab_size, block_size=128, positions="rope",
                            document_mask=True)).eval()
    a, b = evaluate(model, packed, "train", 4), evaluate(model, alone, "train", 4)
    assert a["tokens"] == b["tokens"] == packed.meta["splits"]["train"]["scored_tokens"]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["bits_per_byte"] == pytest.approx(b["bits_per_byte"], rel=1e-5)


@pytest.mark.parametrize("line, message", [
    ({"text": "hello"}, "has no 'messages' field"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role 'robot'"),
    ({"messages": [{"role": "user", "content": 3}]}, "content must be a string"),
])
def test_bad_jsonl_is_one_line_naming_the_line_and_writes_nothing(tmp_path, tokenizer, line,
                                                                  message):
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(ChatSourceError, match=message) as e:
        prepare_chat(ChatSource(str(src)), tokenizer, tmp_path / "out", 64)
    assert f"{src}:2" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_too_long_conversations_are_skipped_and_counted(tmp_path, tokenizer):
    long = [{"role": "user", "content": "Tell me."},
            {"role": "assistant", "content": "Once upon a time " * 40}]
    logged = []
    src = tmp_path / "chat.jsonl"
    write_jsonl(src, [long, *CONVERSATIONS * 20])
    meta = prepare_chat(ChatSource(str(src)), tokenizer, tmp_path / "out", 128,
                        log=logged.append)
    skipped = sum(s["skipped_too_long"] for s in meta["splits"].values())
    assert skipped == 1 and any("longer than the context" in m for m in logged)
    src.write_text(json.dumps({"messages": long}) + "\n")
    with pytest.raises(ValueError, match="no conversation that fits"):
        prepare_chat(ChatSource(str(src)), tokenizer, tmp_path / "out2", 128,
                     log=lambda m: None)
    assert not (tmp_path / "out2").exists()


INSTRUCT_SAMPLE = """Features: Dialogue
Words: quack, cloud, happy
Summary: A duck sees a cloud.
Story: Once upon a time, a duck saw a cloud.
"Quack!" said the duck. It was happy.
<|endoftext|>
Random sentence: The sun was hot.
Story:
Lily played in the sun.
<|endoftext|>
Features: Twist
Summary: no story here
<|endoftext|>
"""


def test_tinystories_instruct_format(tmp_path):
    entries = list(parse_instruct_lines(INSTRUCT_SAMPLE.splitlines()))
    assert entries[0] == [
        {"role": "user", "content": "Features: Dialogue\nWords: quack, cloud, happy\n"
                                    "Summary: A duck sees a cloud."},
        {"role": "assistant", "content": 'Once upon a time, a duck saw a cloud.\n"Quack!" '
                                         'said the duck. It was happy.'}]
    assert entries[1][1]["content"] == "Lily played in the sun."
    assert entries[2] is None  # no Story: line: skipped and counted
    path = tmp_path / "instruct.txt"
    path.write_text(INSTRUCT_SAMPLE * 20)
    src = ChatSource(str(path))
    n = len(list(src.iter("train"))) + len(list(src.iter("val")))
    assert n == 40 and src.skipped["train"] + src.skipped["val"] == 20
