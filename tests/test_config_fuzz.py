"""Fuzzing the config layer with hypothesis (#28 item 2b): any TOML document and any dotted
override gives a valid RunConfig or one ConfigError (the error the command line prints as one
`slms: error` line), never another exception. Bounded for the suite: SLMS_FUZZ_EXAMPLES
examples per surface (default 200), derandomized, so CI runs the same examples each time."""

from __future__ import annotations

import dataclasses
import math
import os
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slms.cli import main
from slms.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    MoEConfig,
    RunConfig,
    TrainConfig,
    load_config,
)

EXAMPLES = int(os.environ.get("SLMS_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

SECTIONS = {"model": ModelConfig, "model.moe": MoEConfig, "data": DataConfig,
            "train": TrainConfig}
KEYS = {s: [f.name for f in dataclasses.fields(c) if f.name != "moe"]
        for s, c in SECTIONS.items()}
DOTTED = ["name", "model.moe"] + [f"{s}.{k}" for s, ks in KEYS.items() for k in ks]


def toml_string(s: str) -> str:
    """`s` as a TOML basic string (every character TOML allows, escaped where it must be)."""
    out = []
    for c in s:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        elif 0xD800 <= ord(c) <= 0xDFFF:
            out.append("?")  # not a scalar value: TOML cannot hold it
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def toml_float(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return repr(x)


scalars = st.one_of(
    st.integers(min_value=-2**70, max_value=2**70).map(str),
    st.sampled_from(["0", "1", "-1", "2", "4", "8", "32", "1000", str(2**63), str(2**64),
                     "0x10", "0o7", "0b11", "1_000"]),
    st.floats(allow_nan=True, allow_infinity=True).map(toml_float),
    st.sampled_from(["0.0", "0.5", "1.0", "1.5", "1e-3", "1e400", "-0.0", "inf", "nan"]),
    st.booleans().map(lambda b: str(b).lower()),
    st.text(max_size=30).map(toml_string),
    st.sampled_from(['"none"', '"auto"', '"cpu"', '"cuda"', '"bias"', '"topk"', '"rope"',
                     '"swiglu"', '"muon"', '"../x"', '""', "1979-05-27", "07:32:00",
                     "1979-05-27T07:32:00Z"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.dictionaries(st.sampled_from(["a", "n_layer", "top_k", "x"]), inner,
                        max_size=2).map(lambda d: "{" + ", ".join(f"{k} = {v}"
                                                                  for k, v in d.items()) + "}")),
    max_leaves=5)
stray_keys = st.text(alphabet=string.ascii_letters + "_-. \u00e9", min_size=1, max_size=12)


@st.composite
def documents(draw) -> str:
    """A TOML document: known sections and keys mostly, with values of any type, some stray
    keys and sections; sometimes not TOML at all."""
    lines = []
    if draw(st.booleans()):
        lines.append(f"name = {draw(values)}")
    for section in draw(st.lists(st.sampled_from([*SECTIONS, "other", "model.moe.x"]),
                                 max_size=4, unique=True)):
        lines.append(f"[{section}]")
        known = KEYS.get(section, ["a"])
        for _ in range(draw(st.integers(0, 4))):
            key = draw(st.one_of(st.sampled_from(known), stray_keys.map(toml_string)))
            lines.append(f"{key} = {draw(values)}")
    text = "\n".join(lines) + "\n"
    if draw(st.integers(0, 9)) == 0:  # damage it: a cut, or a byte that is no TOML
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.sampled_from(["[", "=", '"', "\x00", "[[x]]\n", ""]))
    return text


overrides = st.one_of(
    st.tuples(st.sampled_from(DOTTED), values).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.tuples(st.sampled_from(DOTTED), st.text(max_size=20)).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.text(max_size=30),  # anything at all
    st.tuples(stray_keys, st.text(max_size=10)).map(lambda kv: f"{kv[0]}={kv[1]}"),
)


def assert_config_or_clean_error(load) -> None:
    try:
        cfg = load()
    except ConfigError as e:
        msg = str(e)
        assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
        return
    assert isinstance(cfg, RunConfig)
    cfg.validate()  # what was loaded is valid


@pytest.fixture(scope="module")
def doc_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(documents())
def test_any_toml_document_gives_a_config_or_one_config_error(doc_dir, text):
    path = doc_dir / "doc.toml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    assert_config_or_clean_error(lambda: load_config(path))


@FUZZ
@given(st.binary(max_size=200))
def test_any_bytes_as_a_config_file_give_one_config_error_or_a_config(doc_dir, raw):
    path = doc_dir / "raw.toml"
    path.write_bytes(raw)
    assert_config_or_clean_error(lambda: load_config(path))


@FUZZ
@given(st.lists(overrides, max_size=4))
def test_any_overrides_give_a_config_or_one_config_error(items):
    assert_config_or_clean_error(lambda: load_config(None, items))


@FUZZ
@given(st.lists(overrides, min_size=1, max_size=3))
def test_any_overrides_of_a_preset(items):
    assert_config_or_clean_error(lambda: load_config("configs/seed-moe.toml", items))


@settings(FUZZ, max_examples=max(20, EXAMPLES // 10),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(overrides, min_size=1, max_size=3))
def test_the_command_line_prints_one_line_for_a_bad_config(capsys, items):
    """`slms info` (the config layer, no training) on fuzzed overrides: it exits 0 or 2 with
    one `slms: error` line, never a traceback."""
    try:
        code = main(["info", "tiny", "model.vocab_size=300", *items])
    except SystemExit as e:  # an override that looks like an option: argparse's one line
        code = e.code
    captured = capsys.readouterr()
    assert code in (0, 2), captured.err
    if code == 2:
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("slms: error: "), captured.err
