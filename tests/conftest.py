"""Shared helpers for the language tests (parser, diagnostics, IR, lowering, safety, CLI)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bilevel_dsl import BrlError, compile_source

# One torch thread: the tests' tensors are small, and with two threads a test waits for a
# descheduled thread whenever another process holds a core (one m_sobirl test ran 1 s alone and
# over 70 s on a busy machine).
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
PROBLEMS = sorted((ROOT / "problems").glob("*.brl"))
DOCS = sorted((ROOT / "docs").glob("*.md"))


def compile_ok(text: str, **kwargs):
    """Compile brl source that must be valid; on failure show the rendered diagnostics."""
    try:
        return compile_source(text, "test.brl", **kwargs)
    except BrlError as err:  # pragma: no cover - the message is the point of a failure
        pytest.fail("expected the source to compile, got:\n" + err.render())


def diagnostics(text: str, **kwargs):
    """Compile brl source that must be invalid; return its diagnostics."""
    with pytest.raises(BrlError) as info:
        compile_source(text, "test.brl", **kwargs)
    return info.value.diagnostics


def codes(text: str, **kwargs) -> list[str]:
    return [d.code for d in diagnostics(text, **kwargs)]


def param(text: str, name: str = "result") -> torch.Tensor:
    """The value of param `name` after compiling `text` (a file body without the header)."""
    checked = compile_ok("brl 1\n" + text)
    return checked.names[name].t


def value(expr: str, prelude: str = "") -> float:
    """Evaluate one constant expression, after the declarations in `prelude`."""
    return float(param(f"{prelude}\nparam result = {expr}\n"))


def brl_blocks(markdown: str) -> list[tuple[int, str]]:
    """Every ```brl fenced block of a Markdown text, with the line it starts on."""
    blocks: list[tuple[int, str]] = []
    lines = markdown.split("\n")
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```brl":
            start = i + 1
            j = start
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            blocks.append((start + 1, "\n".join(lines[start:j]) + "\n"))
            i = j
        i += 1
    return blocks
