"""Located diagnostics: ``file:line:col: error[CODE]: message``, the source line, a caret, a hint.

Every error a user can cause is one of these; the command line prints them and never a traceback.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field

from .ir import Span

# Lines longer than this are shown as a window around the error, so a 10 MB line stays readable.
_WINDOW = 100
# Quoted text (`name`) longer than 77 characters is cut in messages: a 10 MB name stays one
# short line.
_QUOTED = re.compile(r"`([^`\n]*)`")


@dataclass(frozen=True)
class Diagnostic:
    code: str
    message: str
    span: Span | None
    hint: str | None = None
    notes: tuple[str, ...] = ()
    severity: str = "error"


_LONE_CR = re.compile(r"\r(?!\n)")
MAX_SHOWN = 50  # diagnostics printed per file


@dataclass
class SourceFile:
    """A file's name and text.  A leading byte-order mark is dropped, so that it is neither a
    syntax error nor a shift of the first line's columns."""

    name: str
    text: str
    _lines: list[str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.text.startswith("\ufeff"):
            self.text = self.text[1:]
        if "\r" in self.text:  # old Mac line ends (a lone CR) count as line breaks too
            self.text = _LONE_CR.sub("\n", self.text)

    def line(self, number: int) -> str:
        if self._lines is None:
            self._lines = self.text.split("\n")
        if 1 <= number <= len(self._lines):
            return self._lines[number - 1].rstrip("\r")
        return ""


class BrlError(Exception):
    """One or more diagnostics; raised by every stage of the compiler."""

    def __init__(self, diagnostics: Iterable[Diagnostic], source: SourceFile | None = None):
        self.diagnostics = list(diagnostics)
        self.source = source
        super().__init__(self.render())

    def __reduce__(self):  # picklable, so that it crosses process pools whole
        return (BrlError, (self.diagnostics, self.source))

    def render(self) -> str:
        shown = [render(d, self.source) for d in self.diagnostics[:MAX_SHOWN]]
        hidden = len(self.diagnostics) - MAX_SHOWN
        if hidden > 0:  # a file of broken lines: the first ones say what to fix
            name = self.source.name if self.source is not None else "<input>"
            shown.append(f"{name}: ... and {hidden:,} more error{'s' if hidden > 1 else ''}")
        return "\n".join(shown)


def render(diag: Diagnostic, source: SourceFile | None) -> str:
    name = source.name if source is not None else "<input>"
    if diag.span is None:
        head = f"{name}: {diag.severity}[{diag.code}]: {_shorten(diag.message)}"
        lines = [head]
    else:
        span = diag.span
        lines = [f"{name}:{span.line}:{span.column}: {diag.severity}[{diag.code}]: "
                 f"{_shorten(diag.message)}"]
        if source is not None and source.text:  # an IR program alone has no text to quote
            lines.extend(_excerpt(source, span))
    indent = " " * (len(str(diag.span.line)) + 1 if diag.span is not None else 2)
    lines.extend(f"{indent}= note: {_shorten(note)}" for note in diag.notes)
    if diag.hint:
        lines.append(f"{indent}= hint: {_shorten(diag.hint)}")
    return "\n".join(lines)


def _shorten(text: str) -> str:
    """Cut quoted source longer than 77 characters, taking the backticks in pairs: the prose
    between two quotes is never cut."""
    return _QUOTED.sub(lambda m: m.group() if len(m.group(1)) <= 77 else
                       f"`{m.group(1)[:77]}...`", text)


def _excerpt(source: SourceFile, span: Span) -> list[str]:
    text = source.line(span.line).expandtabs(1)
    start = max(span.column - 1, 0)
    if span.end_line == span.line:
        width = max(span.end_column - span.column, 1)
    else:
        width = max(len(text) - start, 1)
    offset = 0
    prefix = suffix = ""
    if len(text) > 2 * _WINDOW:
        offset = max(start - _WINDOW // 2, 0)
        prefix = "..." if offset else ""
        suffix = "..." if offset + 2 * _WINDOW < len(text) else ""
        text = text[offset : offset + 2 * _WINDOW]
        width = min(width, max(len(text) - (start - offset), 1))
    gutter = f"{span.line} | "
    pad = " " * (len(gutter) - 2) + "| "
    # carets are placed by screen columns: a wide character (CJK) takes two
    caret_at = len(prefix) + _columns(text[: start - offset])
    width = max(_columns(text[start - offset : start - offset + width]), 1)
    return [gutter + prefix + _printable(text) + suffix, pad + " " * caret_at + "^" * width]


def _columns(text: str) -> int:
    """The screen columns ``text`` takes in a terminal."""
    return sum(2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in text)


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() or ch == " " else "?" for ch in text)


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    """The closest candidate, ignoring case (`OUTER` finds `outer`)."""
    by_lower: dict[str, str] = {}
    for candidate in candidates:
        by_lower.setdefault(candidate.lower(), candidate)
    matches = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.6)
    return f"did you mean `{by_lower[matches[0]]}`?" if matches else None


class DiagnosticBag:
    """Collects diagnostics so one run can report several errors."""

    def __init__(self, source: SourceFile):
        self.source = source
        self.items: list[Diagnostic] = []

    def error(
        self,
        code: str,
        message: str,
        span: Span | None,
        hint: str | None = None,
        notes: tuple[str, ...] = (),
    ) -> None:
        self.items.append(Diagnostic(code, message, span, hint, notes))

    def extend(self, diagnostics: Iterable[Diagnostic]) -> None:
        self.items.extend(diagnostics)

    def raise_if_any(self) -> None:
        if self.items:
            raise BrlError(self.items, self.source)
