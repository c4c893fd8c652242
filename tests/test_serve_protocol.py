"""The server's request checks without HTTP: each bad value's status, message and field, in
the words `slms generate` uses for it (one check of each in slms.infer.generate)."""

import pytest
from tokenizers import Tokenizer as HFTokenizer

from slms.infer.generate import Sampling, SamplingError, prompt_ids
from slms.serve.protocol import ApiError, gen_request, parse_body
from slms.tokenizer import Tokenizer, declare_prompt_prefix

CONTEXT = 64


def _refusal(body: dict | bytes, tok, kind: str = "completions") -> tuple[int, str, str]:
    if isinstance(body, bytes):
        body = parse_body(body)
    with pytest.raises(ApiError) as e:
        gen_request(body, kind, tok, CONTEXT, "tiny")
    return e.value.status, e.value.message, e.value.param


@pytest.mark.parametrize("body,message,param", [
    ({"max_tokens": 0}, "max_tokens must be an integer >= 1; got 0", "max_tokens"),
    ({"max_tokens": -3}, "max_tokens must be an integer >= 1; got -3", "max_tokens"),
    ({"temperature": -1}, "temperature must be a number >= 0 (0 is greedy); got -1",
     "temperature"),
    ({"top_p": 5}, "top_p must be in (0, 1] (1 is off); got 5", "top_p"),
    ({"top_k": -3}, "top_k must be an integer >= 0 (0 is off); got -3", "top_k"),
    ({"repetition_penalty": 0}, "repetition_penalty must be a number > 0 (1 is off); got 0",
     "repetition_penalty"),
    ({"seed": 2**64}, "seed must be an integer in [-2**63, 2**64); got 18446744073709551616",
     "seed"),
])
def test_a_bad_sampling_value_is_a_400_naming_its_field(tokenizer, body, message, param):
    assert _refusal({"prompt": "hi", **body}, tokenizer) == (400, message, param)


def test_a_non_finite_number_is_refused_by_sampling(tokenizer):
    body = b'{"prompt": "hi", "temperature": NaN}'  # Python's JSON reads NaN
    assert _refusal(body, tokenizer) == (
        400, "temperature must be a number >= 0 (0 is greedy); got nan", "temperature")


def test_sampling_errors_carry_their_field():
    with pytest.raises(SamplingError) as e:
        Sampling(top_p=5)
    assert (e.value.field, e.value.value, str(e.value)) == (
        "top_p", 5, "top_p must be in (0, 1] (1 is off); got 5")
    assert isinstance(e.value, ValueError)


def test_an_empty_prompt_without_a_start_token_is_refused_alike(tokenizer):
    hf = HFTokenizer.from_str(tokenizer.to_str())
    declare_prompt_prefix(hf, [])  # as an imported seed tokenizer: no start token
    tok = Tokenizer(hf)
    assert tok.prompt_prefix == []
    with pytest.raises(ValueError) as cli:
        prompt_ids(tok, "", CONTEXT, 4)
    assert _refusal({"prompt": ""}, tok) == (400, str(cli.value), "prompt")
    assert "give a prompt" in str(cli.value)
