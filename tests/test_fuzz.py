"""Fuzzing: mutated example files either compile or fail with located diagnostics, never with
any other exception."""

from __future__ import annotations

import re

from conftest import DOCS, PROBLEMS, brl_blocks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bilevel_dsl import BrlError, compile_source
from bilevel_dsl.cli import solver_catalog

SEEDS = [p.read_text(encoding="utf-8") for p in PROBLEMS] + [
    text for doc in DOCS for _, text in brl_blocks(doc.read_text(encoding="utf-8"))
]
TOKEN = re.compile(r'"""[\s\S]*?"""|"[^"\n]*"|[A-Za-z_][A-Za-z0-9_]*|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?'
                   r"|\.\.|==|!=|<=|>=|\S")
# Characters that make interesting mutations: brl's punctuation, digits, quotes, odd unicode.
ALPHABET = st.sampled_from(list("()[]{}.,:;=+-*/^<>!~#\"'\n\t 0123456789eE_xS") +
                           ["..", "==", "sum ", "if ", "policy", "\x00", "é", "∑", "\r", "\ufeff",
                            "1e999", "9" * 30, "inf", " brl 1 "])


def tokens(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in TOKEN.finditer(text)]


@st.composite
def mutated(draw) -> str:
    text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 3))):
        spans = tokens(text)
        if not spans:
            break
        kind = draw(st.sampled_from(["delete", "duplicate", "swap", "replace", "insert_char",
                                     "delete_char", "truncate", "move"]))
        i = draw(st.integers(0, len(spans) - 1))
        start, end = spans[i]
        piece = text[start:end]
        if kind == "delete":
            text = text[:start] + text[end:]
        elif kind == "duplicate":
            text = text[:end] + " " + piece + text[end:]
        elif kind == "swap":
            j = draw(st.integers(0, len(spans) - 1))
            (a, b), (c, d) = sorted([spans[i], spans[j]])
            if b <= c:
                text = text[:a] + text[c:d] + text[b:c] + text[a:b] + text[d:]
        elif kind == "replace":
            other = spans[draw(st.integers(0, len(spans) - 1))]
            text = text[:start] + text[other[0]:other[1]] + text[end:]
        elif kind == "insert_char":
            at = draw(st.integers(0, len(text)))
            text = text[:at] + draw(ALPHABET) + text[at:]
        elif kind == "delete_char":
            at = draw(st.integers(0, max(len(text) - 1, 0)))
            text = text[:at] + text[at + 1:]
        elif kind == "truncate":
            text = text[: draw(st.integers(0, len(text)))]
        else:  # move a token somewhere else
            at = draw(st.integers(0, len(text) - len(piece)))
            rest = text[:start] + text[end:]
            text = rest[:at] + " " + piece + " " + rest[at:]
    return text


def test_the_fuzzer_has_seeds_and_tokens():
    assert len(SEEDS) >= 10
    text = 'param w[3] = [1, 2.5e3] "x y"\nsum {i in 0..2}'
    assert [text[a:b] for a, b in tokens(text)] == [
        "param", "w", "[", "3", "]", "=", "[", "1", ",", "2.5e3", "]", '"x y"', "sum", "{", "i",
        "in", "0", "..", "2", "}"]


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated())
def test_mutated_examples_compile_or_fail_with_located_diagnostics(text: str):
    try:
        compile_source(text, "fuzz.brl", solver_catalog=solver_catalog)
    except BrlError as err:
        assert err.diagnostics, "a BrlError without diagnostics"
        assert any(d.span is not None for d in err.diagnostics), err.render()
        for diag in err.diagnostics:
            assert re.fullmatch(r"E\d{3}", diag.code), diag
            assert diag.message and "\n" not in diag.message, diag
        err.render()  # rendering never fails


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(ALPHABET, max_size=60).map("".join))
def test_random_text_after_the_header(text: str):
    try:
        compile_source("brl 1\n" + text, "random.brl")
    except BrlError as err:
        assert any(d.span is not None for d in err.diagnostics), err.render()
