"""Every ```brl block in docs/*.md is a complete file that compiles (docs/language.md says so)."""

from __future__ import annotations

import pytest
from conftest import DOCS, ROOT, brl_blocks

from bilevel_dsl import BrlError, compile_source
from bilevel_dsl.cli import solver_catalog

BLOCKS = [
    (f"{doc.relative_to(ROOT)}:{line}", text)
    for doc in DOCS
    for line, text in brl_blocks(doc.read_text(encoding="utf-8"))
]


def test_the_language_reference_has_examples():
    assert any(name.startswith("docs/language.md:") for name, _ in BLOCKS)
    assert len([n for n, _ in BLOCKS if n.startswith("docs/language.md:")]) >= 10


def test_block_extraction():
    markdown = "text\n```brl\nbrl 1\nseed 1\n```\n\n```text\nnot brl\n```\n```brl\nbrl 1\n```\n"
    assert brl_blocks(markdown) == [(3, "brl 1\nseed 1\n"), (11, "brl 1\n")]


@pytest.mark.parametrize(("name", "text"), BLOCKS, ids=[name for name, _ in BLOCKS])
def test_doc_example_compiles(name: str, text: str):
    try:
        compile_source(text, name, solver_catalog=solver_catalog)
    except BrlError as err:
        pytest.fail(f"{name} does not compile:\n{err.render()}")
