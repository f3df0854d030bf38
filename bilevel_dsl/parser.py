"""Stage 1: text -> IR.

Lark compiles grammar/brl.lark into LALR(1) tables (conflict-free: a test builds them in strict
mode).  This module tokenises with one regular expression built from the grammar's terminals and
runs those tables itself, building `ir` nodes as it reduces.  Running the tables here rather than
in Lark's generic loop is what keeps a 10,000-line file well under a second: a chain of unit
reductions (`?rule: other`, most of an LALR parse of nested precedence levels) is taken in one
memoised step, and spans and nesting depths ride on a stack beside the values instead of being
recomputed per node.  The tables, and so the language and the "expected ..." of every syntax
error, are Lark's.

Syntax errors become located diagnostics; no input (empty, binary, huge, deeply nested) escapes as
a Python exception.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import math
import re
import unicodedata
from collections.abc import Callable, Iterator
from functools import lru_cache
from importlib import resources
from pathlib import Path

from lark import Lark
from lark.lexer import Lexer
from lark.parsers.lalr_analysis import Shift

from . import ir
from .diagnostics import BrlError, Diagnostic, SourceFile, did_you_mean

_HEADER = re.compile(r"(?:[ \t\f\r\n]|#[^\n]*)*brl[ \t\f\r\n]+([0-9]+)")
# Deepest nesting of an expression (parentheses, calls, indices, unary operators, powers...).
# Continuing a chain `a1 + a2 + ...` is not nesting: such a chain may have MAX_CHAIN operators
# (counting those of chains nested in it).  Together the two bound the height of an IR tree,
# which keeps the later, partly recursive, stages safe.
MAX_DEPTH = 200
MAX_CHAIN = 5_000
_STARTS = ("start", "expr")
# Rules above expressions: the levels they add to an IR tree (a few at most) are not the
# expression's nesting, which MAX_DEPTH limits and reports at the expression itself.
_STATEMENT_RULES = frozenset({
    "start", "header", "problem_stmt", "seed_stmt", "param_stmt", "set_stmt", "var_stmt",
    "let_stmt", "mdp_stmt", "lower_stmt", "upper_stmt", "solve_stmt", "check_stmt",
    "initializer", "bounds", "dims", "dim", "item", "item_indices"})

# What each terminal is called in an error message.
TERMINAL_NAMES = {
    "NAME": "a name",
    "INT": "an integer",
    "FLOAT": "a number",
    "STRING": "a string",
    "CMP_OP": "a comparison",
    "ADD_OP": "`+` or `-`",
    "MUL_OP": "`*` or `/`",
    "CARET": "`^`",
    "EQUALS": "`=`",
    "TILDE": "`~`",
    "DOTDOT": "`..`",
    "DOT": "`.`",
    "COMMA": "`,`",
    "COLON": "`:`",
    "LPAR": "`(`",
    "RPAR": "`)`",
    "LSQB": "`[`",
    "RSQB": "`]`",
    "LBRACE": "`{`",
    "RBRACE": "`}`",
    "$END": "the end of the file",
}
STATEMENT_KEYWORDS = (
    "PROBLEM", "SEED", "PARAM", "SET", "VAR", "LET", "MDP", "LOWER", "UPPER", "SOLVE", "CHECK",
)


def _describe(terminal: str) -> str:
    if terminal in TERMINAL_NAMES:
        return TERMINAL_NAMES[terminal]
    return f"`{terminal.lower()}`"


@lru_cache(maxsize=1)
def grammar_text() -> str:
    try:
        return (resources.files("bilevel_dsl.grammar") / "brl.lark").read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        here = Path(__file__).resolve().parent.parent / "grammar" / "brl.lark"
        return here.read_text(encoding="utf-8")


def decode(data: bytes, name: str) -> SourceFile:
    """Bytes -> text, rejecting what is not UTF-8 text with a located error."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start].decode("utf-8", errors="replace").removeprefix("\ufeff")
        line = before.count("\n") + 1
        column = len(before) - (before.rfind("\n") + 1) + 1
        source = SourceFile(name, before)
        span = ir.Span(line, column, line, column + 1)
        raise BrlError(
            [Diagnostic("E001", "this file is not UTF-8 text (is it a binary file?)", span,
                        "a .brl file is UTF-8 text that starts with `brl 1`: save it from "
                        "your editor as UTF-8")],
            source,
        ) from None
    return SourceFile(name, text)  # SourceFile drops a byte-order mark


def parse_source(source: SourceFile | str) -> ir.Program:
    """Parse a file's text (a `SourceFile`, or plain text named `<string>`) into the IR."""
    if isinstance(source, str):
        source = SourceFile("<string>", source)
    text = source.text
    nul = text.find("\0")
    if nul >= 0:
        line = text.count("\n", 0, nul) + 1
        column = nul - (text.rfind("\n", 0, nul) + 1) + 1
        raise BrlError(
            [Diagnostic("E001", "this file contains a NUL character (is it a binary file?)",
                        ir.Span(line, column, line, column + 1))],
            source,
        )
    if not text.strip() or not _has_code(text):
        raise BrlError(
            [Diagnostic("E101", "empty file: there is nothing to compile", ir.Span(1, 1, 1, 1),
                        "a .brl file starts with the language header `brl 1`")],
            source,
        )
    program = _parse(text, "start", source)
    if program.language_version != 1:
        # The version number follows `brl`, after any leading comments and blank lines.
        version = _HEADER.match(text)
        at = version.start(1) if version else 0
        line = text.count("\n", 0, at) + 1
        column = at - (text.rfind("\n", 0, at) + 1) + 1
        end = column + len(version.group(1)) if version else column + 1
        raise BrlError(
            [Diagnostic("E102", f"unsupported language version {program.language_version}",
                        ir.Span(line, column, line, end), "this compiler reads `brl 1`")],
            source,
        )
    return ir.with_features(dataclasses.replace(program, source=source.name))


def parse_expression(text: str, name: str = "<expression>") -> ir.Expr:
    """Parse one expression (used for `-D name=value` overrides)."""
    source = SourceFile(name, text)
    try:
        return _parse(source.text, "expr", source)
    except BrlError as err:  # a value, not a file: say so where the file's words would mislead
        diag = err.diagnostics[0]
        if diag.message == "the file ends in the middle of a statement":
            diag = dataclasses.replace(diag, message="the value is incomplete" if text.strip()
                                       else "the value is empty")
        raise BrlError([diag], source) from None


def _has_code(text: str) -> bool:
    return any(line.strip() and not line.strip().startswith("#") for line in text.splitlines())


def _parse(text: str, start: str, source: SourceFile):
    tables = _tables()
    collecting = gc.isenabled()
    # The parse allocates a node per rule and frees nothing: the cyclic collector would only
    # rescan the growing tree (40% of the time of a large file).  Nodes hold no cycles.
    gc.disable()
    try:
        return tables.run(text, start)
    except _SyntaxErrors as exc:
        raise BrlError(exc.diagnostics, source) from None
    finally:
        if collecting:
            gc.enable()


# ---------------------------------------------------------------- the tables and their driver

# A stack entry's location: (line, column, end_line, end_column, depth, links, chain).  The
# position is that of the value (a parenthesised expression is the expression inside, as its
# span says).  Depth counts nesting; links, the operators that continue a chain (`+ c` in
# `a + b + c`), on the longest path; `chain` names the rule whose chain produced the value.
# An IR tree is at most depth + links high.
_Loc = tuple
_LEAF, _STAR, _PLAIN, _CHAIN = range(4)
# Rules whose value does not cover all of their text: its position comes from these children
# (None: the header's number has no position).
_VALUE_FROM = {"parens": (1, 1), "assign": (1, 1), "draw": (1, 1), "bounds": (2, 4),
               "dims": (1, -2), "item_indices": (1, -2), "header": None}
_CATCH_ALL = "_BAD"


class _Items(list):
    """The items of a repetition (`statement*`, the `COMMA dim` of `dims`...), with their
    locations."""

    __slots__ = ("locs",)


class _NoLexer(Lexer):
    """Lark's place for a lexer, unused: the driver tokenises with its own expression."""

    def __init__(self, conf: object) -> None:
        pass

    def lex(self, lexer_state: object, parser_state: object) -> Iterator:
        raise NotImplementedError


class _Tables:
    """Lark's LALR(1) tables for the grammar, the tokeniser, and the driver that runs them."""

    def __init__(self) -> None:
        # Not strict, and no lexer of Lark's (the driver tokenises): the tables are the same,
        # while strict mode's checks and a lexer's checks for colliding terminals cost 0.3 s a
        # command (and Lark checks its own grammar's lexer where interegular is installed,
        # 0.4 s more: brl needs it only for the tests). tests/test_parser.py builds the grammar
        # strictly with Lark's own lexer and parser, and compares this driver with them.
        lark = Lark(grammar_text(), parser="lalr", strict=False, start=list(_STARTS),
                    maybe_placeholders=False, lexer=_NoLexer)
        confs = {s: lark.parse_interactive(start=s).parser_state.parse_conf for s in _STARTS}
        infos = {rule: _rule_info(rule) for rule in lark.rules}
        # state -> symbol -> action: a shift (or goto) is the next state, an int; a reduction
        # is the rule's info tuple; a unit reduction is the name of the rule it makes, a str.
        self.states: dict[int, dict[str, int | str | tuple]] = {
            state: {str(symbol): arg if action is Shift else infos[arg] or str(arg.origin.name)
                    for symbol, (action, arg) in row.items()}
            for state, row in confs["start"].states.items()
        }
        self.start_states = {s: c.start_state for s, c in confs.items()}
        self.end_states = {s: c.end_state for s, c in confs.items()}
        self.units: dict = {}  # (state below, state, terminal) -> state after unit reductions
        self._tokeniser(lark)

    def _tokeniser(self, lark: Lark) -> None:
        """One regular expression over the terminals, in the order Lark's basic lexer tries them;
        a keyword is a name whose text is a keyword's (as in Lark, keywords are reserved)."""
        terminals = sorted(lark.terminals, key=lambda t: (
            -t.priority, -t.pattern.max_width, -len(t.pattern.value), t.name))
        words = [t for t in terminals if t.pattern.type == "str"]
        self.keywords: dict[str, dict[str, str]] = {}
        embedded = set()
        for t in terminals:
            if t.pattern.type != "re":
                continue
            for word in words:
                if word.priority == t.priority and re.fullmatch(
                        t.pattern.to_regexp(), word.pattern.value):
                    self.keywords.setdefault(t.name, {})[word.pattern.value] = word.name
                    if word.pattern.flags <= t.pattern.flags:
                        embedded.add(word.name)
        alternatives = [f"(?P<{t.name}>{t.pattern.to_regexp()})" for t in terminals
                        if t.name not in embedded]
        self.scan = re.compile("|".join([*alternatives, rf"(?P<{_CATCH_ALL}>[\s\S])"])).finditer
        self.ignore = frozenset(lark.ignore_tokens)

    def run(self, text: str, start: str, fast_numbers: bool = True):
        """Parse `text` from `start`; the IR value, or _SyntaxErrors with every syntax error.
        (`fast_numbers=False` reads arrays of numbers token by token, as tests compare.)

        After an error the driver skips to the next statement keyword (keywords are reserved,
        so one can only start a statement) and drops the broken statement from the stack: each
        later statement is parsed on its own, and its errors are reported too.
        """
        ignore = self.ignore
        keywords = self.keywords
        state_stack = [self.start_states[start]]
        values: list = []
        locs: list[_Loc] = []
        errors: list[Diagnostic] = []
        skipping = False
        resume_at = None  # while skipping: the position of a block's closing `}`, if known
        previous = None  # the last token's location
        fresh = True  # no token yet on this line
        line, line_start = 1, 0
        matches = self.scan(text)
        while (match := next(matches, None)) is not None:
            kind = match.lastgroup
            value = match.group()
            if kind in ignore:
                if "\n" in value:
                    line += value.count("\n")
                    line_start = match.start() + value.rindex("\n") + 1
                    fresh = True
                continue
            opens_line, fresh = fresh, False
            pos = match.start()
            column = pos - line_start + 1
            if "\n" in value:  # a """ string
                end_line = line + value.count("\n")
                line_start = pos + value.rindex("\n") + 1
                end_column = match.end() - line_start + 1
            else:
                end_line, end_column = line, column + len(value)
            loc = (line, column, end_line, end_column, 0, 0, None)
            line = end_line
            if kind in keywords:
                kind = keywords[kind].get(value, kind)
            if skipping:
                if resume_at is not None:  # a block's own `}`: it closes the block as written
                    if pos < resume_at:
                        continue
                    resume_at = None
                elif kind not in STATEMENT_KEYWORDS or not opens_line or \
                        not self._resume(state_stack, values, locs, kind):
                    continue
                skipping = False
            if kind == _CATCH_ALL:
                errors.append(_bad_character(text, pos, loc))
                skipping = True
                continue
            if kind == "LSQB" and fast_numbers and "INT" in self.states[state_stack[-1]] \
                    and self._accepts(state_stack, "LSQB") and self._accepts(state_stack, "INT"):
                # an operand starts here, so `[` opens an array literal: one written in numbers
                # is read whole, passed to the tables as the one number it stands for
                scanned = _scan_numbers(text, pos)
                if scanned is not None:
                    array, depth, end = scanned
                    newlines = text.count("\n", pos, end)
                    if newlines:
                        line += newlines
                        line_start = text.rindex("\n", pos, end) + 1
                    loc = (loc[0], loc[1], line, end - line_start + 1, depth, 0, None)
                    kind, value = "INT", ir.NumberArray(_span(loc), *array)
                    matches = self.scan(text, end)
            try:
                self._push(kind, value, loc, state_stack, values, locs, text,
                           previous if opens_line else None)
            except _NodeError as exc:
                skipping = True
                opens_line = opens_line and kind in STATEMENT_KEYWORDS
                if opens_line and self.states[state_stack[-1]].get("RBRACE") is not None:
                    resume_at = self._closing_brace(text, match.end())
                if resume_at is not None:  # a statement, or a reserved word, inside a block
                    named = self._next_value(text, match.end()) in ("=", "[")
                    errors.append(Diagnostic(
                        "E100", f"`{value}` is a reserved word and cannot be a name" if named
                        else f"`{value}` starts a statement, which cannot appear inside a block",
                        _span(loc), f"choose another name, such as `{value}_`" if named else
                        "a block holds parts written `name = value`: write the "
                        f"`{value}` statement before the block"))
                    continue
                errors.append(_with_opener(exc.diagnostic, values, locs))
                # a keyword that opens a line where the broken statement wanted more starts the
                # next statement (in mid-line it is more likely a reserved word used as a name)
                if opens_line and self._resume(state_stack, values, locs, kind):
                    try:
                        self._push(kind, value, loc, state_stack, values, locs, text, None)
                        skipping = False
                    except _NodeError:  # reported already, at this keyword: skip on
                        pass
            previous = loc
        if not skipping:
            try:
                self._finish(state_stack, values, locs, start, text)
            except _NodeError as exc:
                errors.append(_with_opener(exc.diagnostic, values, locs))
        if errors:
            raise _SyntaxErrors(errors)
        return values[-1]

    def _push(self, kind: str, value: str, loc: _Loc, state_stack: list, values: list,
              locs: list, text: str, before: _Loc | None) -> None:
        """Take the reductions that token `kind` calls for, then shift it; `before`: the last
        token's location when this one opens its line, for an error's message."""
        states = self.states
        while True:
            state = state_stack[-1]
            action = states[state].get(kind)
            if action.__class__ is int:
                state_stack.append(action)
                values.append(value)
                locs.append(loc)
                return
            if action.__class__ is str:  # unit reductions: only the state changes
                key = (state_stack[-2], state, kind)
                after = self.units.get(key)
                if after is None:
                    after = self.units[key] = self._after_units(key)
                state_stack[-1] = after
            elif action is None:
                self._unexpected(state, kind, value, loc, text, before, values)
            else:
                self._reduce(action, state_stack, values, locs)

    def _accepts(self, state_stack: list, kind: str) -> bool:
        """Whether the parser, as it stands, would shift `kind` after the reductions it calls
        for (run on a copy of the states: no values are built)."""
        stack = state_stack[:]
        while True:
            action = self.states[stack[-1]].get(kind)
            if action is None:
                return False
            if action.__class__ is int:
                return True
            if action.__class__ is str:  # a unit reduction
                stack[-1] = self.states[stack[-2]][action]
            else:
                size, origin = action[0], action[1]
                del stack[len(stack) - size:]
                stack.append(self.states[stack[-1]][origin])

    def _next_value(self, text: str, start: int) -> str | None:
        """The text of the first token after `start`."""
        for match in self.scan(text, start):
            if match.lastgroup not in self.ignore:
                return match.group()
        return None

    def _closing_brace(self, text: str, start: int) -> int | None:
        """Where the block around `start` is closed, if that `}` comes before the next statement
        keyword at the start of a line (else the block is the one left open)."""
        depth = 0
        for match in self.scan(text, start):
            kind, value = match.lastgroup, match.group()
            if kind in self.ignore:
                continue
            if kind in self.keywords:
                kind = self.keywords[kind].get(value, kind)
            if kind in STATEMENT_KEYWORDS:
                indent = text[text.rfind("\n", 0, match.start()) + 1:match.start()]
                # a statement at the margin: the block was left open (an indented one, or a
                # reserved word used as a name, is more of the block's contents)
                if indent == "" and self._next_value(text, match.end()) not in ("=", "["):
                    return None
            if value == "{":
                depth += 1
            elif value == "}":
                if depth == 0:
                    return match.start()
                depth -= 1
        return None

    def _finish(self, state_stack: list, values: list, locs: list, start: str, text: str) -> None:
        """Take the reductions that the end of the input calls for."""
        states = self.states
        end_state = self.end_states[start]
        while state_stack[-1] != end_state:
            state = state_stack[-1]
            action = states[state].get("$END")
            if action.__class__ is str:
                state_stack[-1] = states[state_stack[-2]][action]
            elif action is None:
                self._unexpected(state, "$END", "", None, text, None, values)
            else:
                self._reduce(action, state_stack, values, locs)

    def _resume(self, state_stack: list, values: list, locs: list, keyword: str) -> bool:
        """Drop the broken statement: pop the stack to where `keyword` starts a statement, or
        keep it whole where what it holds can end before `keyword` (the tokens that broke it
        were skipped, and were never pushed). False (the stack untouched) where neither."""
        if self._accepts(state_stack, keyword):
            return True
        depth = len(state_stack) - 1
        while self.states[state_stack[depth]].get(keyword).__class__ is not int:
            if depth == 0:
                return False
            depth -= 1
        del state_stack[depth + 1:], values[depth:], locs[depth:]
        return True

    def _after_units(self, key: tuple) -> int:
        below, state, kind = key
        while True:
            action = self.states[state].get(kind)
            if action.__class__ is not str:
                return state
            state = self.states[below][action]

    def _reduce(self, info: tuple, state_stack: list, values: list, locs: list) -> None:
        size, origin, build, kind, first, last = info
        children = values[-size:]
        where = locs[-size:]
        del values[-size:], locs[-size:], state_stack[-size:]
        if kind == _LEAF:  # one token: its position, no depth
            value = build(children, where, where[0])
            loc = where[0]
        else:
            left = where[0]
            depth = links = 0
            for child in where[kind == _CHAIN:]:
                if child[4] > depth:
                    depth = child[4]
                if child[5] > links:
                    links = child[5]
            meta = None
            if kind == _STAR:  # a list of items is no level of the tree
                value = build(children, where, meta)
            else:
                if kind == _PLAIN:
                    depth += 1
                elif left[6] == origin:  # continuing a chain (`a + b` + c) is a link
                    depth, links = max(depth + 1, left[4]), max(links, left[5] + 1)
                else:  # starting one (`(a) + b`) is nesting, as any other rule
                    depth, links = max(depth, left[4]) + 1, max(links, left[5])
                meta = _meta(where)
                if depth > MAX_DEPTH and origin not in _STATEMENT_RULES:
                    raise _NodeError(Diagnostic(
                        "E902", f"expression nested more than {MAX_DEPTH} levels deep",
                        _span(meta), "split it with `let` definitions, or use `sum {i in I} ...`"))
                if links >= MAX_CHAIN:  # a chain has one operator more than links
                    raise _NodeError(Diagnostic(
                        "E902", f"expression chain longer than {MAX_CHAIN:,} operators",
                        _span(meta), "split it with `let` definitions, or use `sum {i in I} ...`"))
                value = build(children, where, meta)
            chain = origin if kind == _CHAIN else None
            if first is None:
                loc = (None, None, None, None, depth, links, chain)
            else:
                a, b = where[first], where[last]
                loc = (a[0], a[1], b[2], b[3], depth, links, chain)
        state_stack.append(self.states[state_stack[-1]][origin])
        values.append(value)
        locs.append(loc)

    def _unexpected(self, state: int, kind: str, value: str, loc: _Loc | None, text: str,
                    before: _Loc | None, values: list):
        """`before`: the previous token's location, when this token opens its line; `values`,
        the parse stack."""
        expected = {t for t in self.states[state] if t.isupper()}
        raise _NodeError(_syntax_diagnostic(kind, value, loc, expected, text, before, values))


def _rule_info(rule) -> tuple | None:
    """How the driver reduces a rule: None for a unit rule that passes its child on unchanged;
    else (size, origin, build, kind, first, last), `first`/`last` the children whose positions
    make the value's (None: no position)."""
    size = len(rule.expansion)
    origin = str(rule.origin.name)
    name = str(rule.alias or origin)
    if any(symbol.is_term and symbol.filter_out for symbol in rule.expansion):
        # Lark drops an anonymous terminal from a rule's children; the builders count them.
        raise ValueError(f"grammar rule `{rule}` has an anonymous terminal: name every terminal")
    if size == 1 and rule.options.expand1 and not rule.alias:
        return None
    if origin.startswith("_"):  # a repetition Lark made from `x*`: collect the items
        left_recursive = rule.expansion[0].name == origin
        return (size, origin, _repeat if left_recursive else _first_item, _STAR,
                0 if left_recursive else -1, -1)
    if size == 1 and rule.expansion[0].is_term:
        kind = _LEAF
    elif rule.expansion[0].name == origin and name in ("binary", "logical"):
        kind = _CHAIN
    else:
        kind = _PLAIN
    first, last = _VALUE_FROM.get(name, (0, -1)) or (None, None)
    return (size, origin, _BUILDERS[name], kind, first, last)


@lru_cache(maxsize=1)
def _tables() -> _Tables:
    return _Tables()


def _meta(where: list[_Loc]) -> _Loc:
    """The text a rule covers: from its first child's position to its last child's."""
    a, b = where[0], where[-1]
    if a[0] is None or b[0] is None:
        placed = [loc for loc in where if loc[0] is not None] or [(1, 1, 1, 2)]
        a, b = placed[0], placed[-1]
    return a[:4] if a is b else (a[0], a[1], b[2], b[3])


def _span(loc: _Loc) -> ir.Span:
    return ir.Span(loc[0], loc[1], loc[2], loc[3])


# ---------------------------------------------------------------- syntax errors


class _NodeError(Exception):
    def __init__(self, diagnostic: Diagnostic):
        self.diagnostic = diagnostic


class _SyntaxErrors(Exception):
    def __init__(self, diagnostics: list[Diagnostic]):
        self.diagnostics = diagnostics


_INCOMPLETE = ("the file ends in the middle of a statement", "this statement is incomplete")


def _with_opener(diagnostic: Diagnostic, values: list, locs: list) -> Diagnostic:
    """A statement cut short: point at the innermost bracket it left open (a bracket still on
    the parse stack, as its own text, was never closed)."""
    if diagnostic.message not in _INCOMPLETE:
        return diagnostic
    closed = 0  # brackets closed above: `sum {i in I}` waits for its body with both on the stack
    for value, loc in zip(reversed(values), reversed(locs)):
        if value.__class__ is not str:
            continue
        if value in _CLOSERS.values():
            closed += 1
        elif value in _CLOSERS:
            if closed:
                closed -= 1
                continue
            note = f"the `{value}` at line {loc[0]}, column {loc[1]} is not closed by " \
                f"`{_CLOSERS[value]}`"
            return dataclasses.replace(diagnostic, notes=(*diagnostic.notes, note))
    return diagnostic


_CLOSERS = {"(": ")", "[": "]", "{": "}"}


_CHARACTER_HINTS = {
    ";": "a statement ends where the next one starts: no `;` is needed",
    "&": "write `and`",
    "|": "write `or`",
    "!": "write `not` (and `!=` for not equal)",
    "%": "brl has no remainder operator",
    "'": 'strings are written in double quotes: "like this"',
    "`": 'strings are written in double quotes: "like this"',
    "\u201c": 'write straight double quotes: "like this"',
    "\u201d": 'write straight double quotes: "like this"',
    "\u2018": 'strings are written in straight double quotes: "like this"',
    "\u2019": 'strings are written in straight double quotes: "like this"',
    "\u2212": "write the minus sign as `-`",
    "\u2013": "write the minus sign as `-`",
    "\u00d7": "write multiplication as `*`",
    "\u00f7": "write division as `/`",
    "\u00b7": "write multiplication as `*`",
    "\u03a3": "a sum is written `sum {i in S} ...`",
    "\u2211": "a sum is written `sum {i in S} ...`",
    "\u2264": "write `<=`",
    "\u2265": "write `>=`",
    "\u2260": "write `!=`",
}


def _bad_character(text: str, pos: int, loc: _Loc) -> Diagnostic:
    char = text[pos]
    if not char.isprintable() or char.isspace():
        name = unicodedata.name(char, "a control character").lower()
        return Diagnostic("E100", f"unexpected invisible character U+{ord(char):04X} ({name})",
                          ir.Span(loc[0], loc[1], loc[0], loc[1] + 1),
                          "pasted with the text, perhaps: delete it")
    shown = char
    hint = _CHARACTER_HINTS.get(char)
    if hint is None and char.isalpha():
        hint = "names are written in ASCII letters, digits and `_`"
    if char == '"':
        # the lexer read `""` as an empty string and stopped at the third quote: the string
        # that opens here is never closed
        if text[max(pos - 2, 0):pos] == '""' and loc[1] >= 3 and '"""' not in text[pos + 1:]:
            return Diagnostic("E100", 'unterminated string: this """ is never closed',
                              ir.Span(loc[0], loc[1] - 2, loc[0], loc[1] + 1),
                              'close it with """ after its last line')
        if '"' not in text[pos + 1:].split("\n", 1)[0]:
            return Diagnostic("E100", "unterminated string: this \" has no closing quote on its "
                              "line", ir.Span(loc[0], loc[1], loc[0], loc[1] + 1),
                              'strings are written "like this" on one line, or """like this"""'
                              " over several")
        hint = 'strings are written "like this" on one line, or """like this""" over several'
    return Diagnostic("E100", f"unexpected character `{shown}`",
                      ir.Span(loc[0], loc[1], loc[0], loc[1] + 1), hint)


# Habits of other languages, by the token that follows the one they share with brl
_PAIRS = {
    ("*", "*"): "powers are written `^`: `2 ^ 3`",
    ("/", "/"): "comments start with `#`",
    ("<", ">"): "`not equal` is written `!=`",
    (",", "]"): "remove the comma before the bracket",
    (",", ")"): "remove the comma before the parenthesis",
    ("[", "]"): "an array has at least one entry, such as `[256, 256]`",
}


_OPENERS = {"RPAR": "(", "RSQB": "[", "RBRACE": "{"}


def _syntax_diagnostic(kind: str, value: str, loc: _Loc | None, expected_terminals: set[str],
                       text: str, before: _Loc | None, stack: list) -> Diagnostic:
    """`stack`: the parse stack, whose top is the previous token's text if it was not
    reduced (what some hints look at)."""
    previous = stack[-1] if stack and type(stack[-1]) is str else None
    expected = _expected(expected_terminals)
    if loc is None:  # the end of the input
        lines = text.rstrip().split("\n")
        line, column = len(lines), len(lines[-1]) + 1
        return Diagnostic(
            "E100",
            "the file ends in the middle of a statement",
            ir.Span(line, column, line, column + 1),
            f"expected {expected}" if expected else None,
        )
    shown = value.split("\n", 1)[0]  # a message is one line, even for a """ string
    if shown != value or len(shown) > 40:
        shown = shown[:37] + "..."
    message = f"unexpected `{shown}`"
    hint = f"expected {expected}" if expected else None
    if kind in STATEMENT_KEYWORDS and "BRL" in expected_terminals:
        message = "missing language header"
        hint = "start the file with `brl 1`"
    elif "BRL" in expected_terminals:
        message = f"unexpected `{shown}`: a .brl file starts with the header `brl 1`"
        hint = None
    elif kind in STATEMENT_KEYWORDS and before is not None and before[2] is not None:
        # a keyword opening a line starts the next statement: the one before it stops short
        line, column = before[2], before[3]
        return Diagnostic("E100", "this statement is incomplete",
                          ir.Span(line, column, line, column + 1),
                          f"expected {expected} before `{shown}` on line {loc[0]}")
    elif kind in ("INT", "FLOAT", "NAME", "STRING") and "ADD_OP" in expected_terminals and not (
            kind == "NAME" and did_you_mean(value, [t.lower() for t in STATEMENT_KEYWORDS])):
        hint = "two values in a row: is an operator (`+`, `*`, ...) or a `,` missing before " \
            "it?"
    elif kind == "IF":
        hint = "inside a larger expression, put the conditional in parentheses: " \
            "(if c then a else b)"
    elif kind == "EQUALS" and "CMP_OP" in expected_terminals:
        hint = "to compare two values, write `==`"
    elif kind == "CMP_OP" and "AND" in expected_terminals:  # right after `a < b`
        message = f"comparisons cannot be chained: unexpected `{shown}` after a comparison"
        hint = "join two comparisons with `and`: `lo < x and x < hi`"
    elif (previous, value) in _PAIRS:
        hint = _PAIRS[previous, value]
    elif kind in _OPENERS and _OPENERS[kind] not in (v for v in stack if type(v) is str):
        message = f"unexpected `{shown}`: no `{_OPENERS[kind]}` is open here"
        hint = "remove it, or open the bracket where it should begin"
    elif kind == "ON" and previous == "solve":
        hint = "name the solver before `on`: `solve m_sobirl on cpu` (or `solve auto on cpu`)"
    elif kind != "NAME" and value.isidentifier() and "NAME" in expected_terminals \
            and "LPAR" not in expected_terminals:  # a name, not an expression, was due
        message = f"`{value}` is a reserved word and cannot be a name"
        hint = f"choose another name, such as `{value}_`"
    elif kind == "COMMA" and expected_terminals == {"NAME", "RBRACE"}:
        hint = "the parts of a block are separated by spaces or line breaks, not commas"
    elif kind == "IN" and previous is not None and previous.isidentifier() and len(stack) > 1 \
            and stack[-2] == "(":
        hint = "a sum and the other reductions bind their indices in braces: " \
            "`sum {i in S} w[i]`"
    elif kind == "STRING" and expected_terminals == {"NAME"} and previous == "problem":
        hint = 'a problem has a name, then a title if you like: `problem my_problem "Title"`'
    elif kind == "DOTDOT":
        hint = _range_hint(text, loc)
    elif kind == "ADD_OP" and previous == "seed":
        hint = "a seed is a whole number, 0 or more"
    elif kind == "NAME" and any(t in expected_terminals for t in STATEMENT_KEYWORDS):
        keyword = did_you_mean(value, [t.lower() for t in STATEMENT_KEYWORDS])
        hint = f"{keyword} (a statement starts with a keyword)" if keyword else hint
    return Diagnostic("E100", message, _span(loc), hint)


def _range_hint(text: str, loc: _Loc) -> str:
    """`M..S` where `M.S` was meant, or a range where a set is not expected."""
    line = text.split("\n")[loc[0] - 1]
    left = re.search(r"[A-Za-z_]\w*$", line[: loc[1] - 1])
    right = re.match(r"[A-Za-z_]\w*", line[loc[3] - 1:])
    if left and right:
        return f"a part or a member is written with one dot: `{left[0]}.{right[0]}`"
    return "`..` makes a range, which stands where a set is expected: `set S = 1..5`, " \
        "`sum {i in 1..5} ...`, `card(1..5)`"


def _expected(expected_terminals: set[str]) -> str:
    terminals = set(expected_terminals)
    if {"NAME", "INT", "LPAR"} <= terminals:
        terminals -= {"NAME", "INT", "FLOAT", "STRING", "LPAR", "LSQB", "ADD_OP", "NOT", "IF",
                      "SUM", "PROD", "MAX", "MIN", "MEAN", "LOGSUMEXP"}
        terminals.add("an expression")
    names = sorted({_describe(t) if t != "an expression" else t for t in terminals})
    statement_words = [n for n in names if n.strip("`").upper() in STATEMENT_KEYWORDS]
    others = [n for n in names if n not in statement_words]
    if statement_words:
        others.append("a statement (`param`, `var`, `mdp`, ...)")
    if len(others) > 8:
        others = others[:8] + ["..."]
    if not others:
        return ""
    return others[0] if len(others) == 1 else ", ".join(others[:-1]) + " or " + others[-1]


# ---------------------------------------------------------------- building the IR
#
# One function per rule (or alias) of the grammar, called with the rule's children (a token is
# its text; a repetition is an _Items list), their locations, and the rule's own location.

_Build = Callable[[list, list, _Loc], object]
_BUILDERS: dict[str, _Build] = {}


def _rule(*names: str) -> Callable[[_Build], _Build]:
    def register(build: _Build) -> _Build:
        for name in names:
            _BUILDERS[name] = build
        return build
    return register


def _first_item(c: list, locs: list, meta: _Loc) -> _Items:
    items = _Items([c[-1]])
    items.locs = [locs[-1]]
    return items


def _repeat(c: list, locs: list, meta: _Loc) -> _Items:
    items = c[0]
    items.append(c[-1])
    items.locs.append(locs[-1])
    return items


_ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\"}
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)


def _unescape(body: str) -> str:
    # One regular-expression pass (not a Python loop per character): a 10 MB string stays fast.
    return _ESCAPE.sub(lambda m: _ESCAPES.get(m.group(1), m.group(1)), body)


_UNKNOWN_ESCAPE = re.compile(r'\\[^nt"\\]')


def _string_value(text: str, loc: _Loc) -> str:
    if text.startswith('"""'):
        return text[3:-3]
    body = text[1:-1]
    bad = _UNKNOWN_ESCAPE.search(body.replace("\\\\", "  "))  # `\\` is a known escape
    if bad is not None:
        column = loc[1] + 1 + bad.start()
        raise _NodeError(Diagnostic(
            "E100", f"unknown escape `{body[bad.start():bad.end()]}` in a string",
            ir.Span(loc[0], column, loc[0], column + 2),
            'the escapes are \\n, \\t, \\" and \\\\; write \\\\ for a backslash'))
    return _unescape(body)


def _short(text: str) -> str:
    return text if len(text) <= 30 else text[:27] + "..."


# ---- program and statements


@_rule("start")
def _start(c, locs, meta):
    statements = tuple(c[1]) if len(c) > 1 else ()
    return ir.Program(ir.IR_VERSION, c[0], "", statements)


@_rule("header")
def _header(c, locs, meta):
    version = c[1]
    if len(version) > 18:  # not a version; and int() refuses over 4300 digits
        raise _NodeError(Diagnostic("E102", f"unsupported language version {_short(version)}",
                                    _span(locs[1]), "this compiler reads `brl 1`"))
    return int(version)


@_rule("problem_stmt")
def _problem(c, locs, meta):
    title = _string_value(c[2], locs[2]) if len(c) > 2 else None
    return ir.ProblemDecl(_span(meta), c[1], _span(locs[1]), title)


@_rule("seed_stmt")
def _seed(c, locs, meta):
    digits = c[1]
    value = int(digits) if len(digits) <= 20 else 2**63
    if value >= 2**63:
        raise _NodeError(Diagnostic("E901", "seed is too large", _span(locs[1]),
                                    "use a seed below 2^63"))
    return ir.SeedDecl(_span(meta), value)


@_rule("param_stmt")
def _param(c, locs, meta):
    dims = c[2] if len(c) == 4 else ()
    random, value = c[-1]
    return ir.ParamDecl(_span(meta), c[1], _span(locs[1]), dims, value, random)


@_rule("set_stmt")
def _set(c, locs, meta):
    return ir.SetDecl(_span(meta), c[1], _span(locs[1]), c[3])


@_rule("var_stmt")
def _var(c, locs, meta):
    dims: tuple = ()
    value = None
    random = False
    lower = upper = None
    for child in c[2:]:
        if child[0] == "bounds":
            lower, upper = child[1], child[2]
        elif isinstance(child[0], bool):
            random, value = child
        else:
            dims = child
    return ir.VarDecl(_span(meta), c[1], _span(locs[1]), dims, value, random, lower, upper)


@_rule("let_stmt")
def _let(c, locs, meta):
    dims = c[2] if len(c) == 5 else ()
    return ir.LetDecl(_span(meta), c[1], _span(locs[1]), dims, c[-1])


@_rule("mdp_generator")
def _mdp_generator(c, locs, meta):
    args, keywords = _split_arguments(c[5] if len(c) == 7 else [])
    return ir.MdpDecl(_span(meta), c[1], _span(locs[1]), c[3], _span(locs[3]), False, args,
                      keywords, ())


@_rule("mdp_block")
def _mdp_block(c, locs, meta):
    items = tuple(c[5]) if len(c) == 7 else ()
    return ir.MdpDecl(_span(meta), c[1], _span(locs[1]), c[3], _span(locs[3]), True, (), (),
                      items)


@_rule("lower_stmt")
def _lower(c, locs, meta):
    items = tuple(c[3]) if len(c) == 5 else ()
    return ir.LowerDecl(_span(meta), c[1], _span(locs[1]), items)


@_rule("upper_stmt")
def _upper(c, locs, meta):
    objective = c[2]
    features = ir.objective_features(objective)
    return ir.UpperDecl(_span(meta), c[1], objective, ir.objective_form(features), features)


@_rule("sense", "reducer")
def _token_text(c, locs, meta):
    return c[0]


@_rule("solve_stmt")
def _solve(c, locs, meta):
    # SOLVE NAME (LPAR arguments? RPAR)? (ON NAME)?
    options: tuple = ()
    device = device_span = None
    at = 2
    if at < len(c) and c[at] == "(":
        if isinstance(c[at + 1], list):
            args, options = _split_arguments(c[at + 1])
            if args:
                raise _NodeError(Diagnostic(
                    "E100", "solver options are written `name = value`", args[0].span,
                    "for example: solve m_sobirl(outer = 500, beta = 0.05)"))
            at += 1
        at += 2
    if at < len(c):
        device, device_span = c[at + 1], _span(locs[at + 1])
    return ir.SolveDecl(_span(meta), c[1], _span(locs[1]), options, device, device_span)


@_rule("check_stmt")
def _check(c, locs, meta):
    message = _string_value(c[3], locs[3]) if len(c) == 4 else None
    return ir.CheckDecl(_span(meta), c[1], message)


@_rule("assign")
def _assign(c, locs, meta):
    return (False, c[1])


@_rule("draw")
def _draw(c, locs, meta):
    return (True, c[1])


@_rule("bounds")
def _bounds(c, locs, meta):
    return ("bounds", c[2], c[4])


@_rule("dims")
def _dims(c, locs, meta):
    return (c[1], *c[2]) if len(c) == 4 else (c[1],)


@_rule("named_dim")
def _named_dim(c, locs, meta):
    return ir.Dim(_span(meta), c[0], c[2])


@_rule("plain_dim")
def _plain_dim(c, locs, meta):
    return ir.Dim(_span(meta), None, c[0])


@_rule("item")
def _item(c, locs, meta):
    indices = c[1] if len(c) == 4 else ()
    return ir.Item(_span(meta), c[0], _span(locs[0]), indices, c[-1])


@_rule("item_indices")
def _item_indices(c, locs, meta):
    names = [ir.Name(_span(locs[1]), c[1])]
    if len(c) == 4:
        names += [ir.Name(_span(loc), name) for name, loc in zip(c[2], c[2].locs)]
    return tuple(names)


@_rule("members")
def _members(c, locs, meta):
    members = (c[1], *c[2]) if len(c) == 4 else (c[1],)
    return ir.Members(_span(meta), members)


@_rule("member")
def _member(c, locs, meta):
    return ir.Member(_span(meta), c[0])


# ---- arguments


@_rule("arguments")
def _arguments(c, locs, meta):
    return [c[0], *c[1]] if len(c) == 2 else [c[0]]


@_rule("keyword")
def _keyword(c, locs, meta):
    return ir.Keyword(_span(meta), c[0], c[2])


def _split_arguments(arguments: list) -> tuple[tuple, tuple]:
    args = tuple(a for a in arguments if not isinstance(a, ir.Keyword))
    keywords = tuple(a for a in arguments if isinstance(a, ir.Keyword))
    seen: set[str] = set()
    for kw in keywords:
        if kw.name in seen:
            raise _NodeError(Diagnostic("E202", f"argument `{kw.name}` is given twice", kw.span))
        seen.add(kw.name)
    return args, keywords


# ---- expressions


@_rule("conditional")
def _conditional(c, locs, meta):
    return ir.Conditional(_span(meta), c[1], c[3], c[5])


@_rule("binary", "logical", "comparison")
def _binary(c, locs, meta):
    return ir.Binary(_span(meta), c[1], c[0], c[2])


@_rule("unary")
def _unary(c, locs, meta):
    return ir.Unary(_span(meta), c[0], c[1])


@_rule("range")
def _range(c, locs, meta):
    return ir.Range(_span(meta), c[0], c[2])


@_rule("reduction")
def _reduction(c, locs, meta):
    # reducer LBRACE binder (COMMA binder)* (COLON expr)? RBRACE body: 5 to 8 children
    binders = (c[2], *c[3]) if len(c) in (6, 8) else (c[2],)
    where = c[-3] if len(c) in (7, 8) else None
    return ir.Reduction(_span(meta), c[0], binders, where, c[-1])


@_rule("binder")
def _binder(c, locs, meta):
    return ir.Binder(_span(meta), c[0], c[2])


@_rule("index")
def _index(c, locs, meta):
    args, keywords = _split_arguments(c[2])
    if keywords:
        raise _NodeError(Diagnostic("E100", "an index cannot be a keyword argument",
                                    keywords[0].span))
    return ir.Index(_span(meta), c[0], args)


@_rule("attribute")
def _attribute(c, locs, meta):
    return ir.Attribute(_span(meta), c[0], c[2])


@_rule("call")
def _call(c, locs, meta):
    args, keywords = _split_arguments(c[2] if len(c) == 4 else [])
    return ir.Call(_span(meta), c[0], args, keywords)


@_rule("integer")
def _integer(c, locs, meta):
    digits = c[0]
    if type(digits) is ir.NumberArray:  # an array read whole by the driver's _scan_numbers
        return digits
    value = float(int(digits)) if len(digits) < 309 else math.inf
    return _number(digits, meta, value, True)


@_rule("real")
def _real(c, locs, meta):
    return _number(c[0], meta, float(c[0]), False)


def _number(text: str, loc: _Loc, value: float, is_integer: bool) -> ir.Number:
    if not math.isfinite(value):
        raise _NodeError(Diagnostic(
            "E901", f"the number `{_short(text)}` is too large to represent",
            _span(loc), "numbers must be below about 1.8e308; use `inf` for infinity"))
    return ir.Number(_span(loc), value, is_integer)


@_rule("string")
def _string(c, locs, meta):
    return ir.String(_span(meta), _string_value(c[0], locs[0]))


@_rule("name")
def _name(c, locs, meta):
    return ir.Name(_span(meta), c[0])


@_rule("parens")
def _parens(c, locs, meta):
    return c[1]


@_rule("array")
def _array(c, locs, meta):
    args, keywords = _split_arguments(c[1])
    if keywords:
        raise _NodeError(Diagnostic("E100", "an array literal cannot hold `name = value`",
                                    keywords[0].span))
    return _numbers(_span(meta), args) or ir.ArrayLiteral(_span(meta), args)


# A row of signed numbers, `[1, -2.5, 3e-4]`, as the grammar's tokens (FLOAT before INT, as
# Lark tries them) and spaces; a comment, or anything else, leaves the row to the tables.
_SPACE = r"[ \t\f\r\n]*"
_NUMBER = r"[0-9]+\.[0-9]+(?:[eE][+-]?[0-9]+)?|[0-9]+[eE][+-]?[0-9]+|[0-9]+"
_SIGNS = rf"(?:[-+]{_SPACE})*"
_ROW = re.compile(
    rf"\[{_SPACE}(?:{_SIGNS}(?:{_NUMBER}){_SPACE},{_SPACE})*{_SIGNS}(?:{_NUMBER}){_SPACE}\]")
_NUMBER_IN_ROW = re.compile(rf"({_SIGNS})({_NUMBER})")
_NEXT_ITEM = re.compile(rf"{_SPACE}(?:,{_SPACE}(?=\[)|(\]))")
_OPENING = re.compile(rf"\[{_SPACE}(?=\[)")
_MAX_SCANNED_DEPTH = MAX_DEPTH // 2  # deeper ones are left to the tables, which report them


def _scan_numbers(text: str, pos: int, level: int = 1) -> tuple[tuple, int, int] | None:
    """The array written in numbers at `text[pos]` (a `[`), read by regular expressions:
    ((shape, values, is_integer), its nesting depth as the tables count it, its end), or None
    where it holds anything else. The tables take some 17 microseconds a number."""
    row = _ROW.match(text, pos)
    if row is not None:
        values = []
        integer = True
        most_signs = 0
        for signs, number in _NUMBER_IN_ROW.findall(row.group()):
            value = float(number)
            if value == math.inf or (len(number) >= 309 and number.isdigit()):
                return None  # too large (as _integer has it): the tables' error names it
            if signs:
                minus = signs.count("-")
                most_signs = max(most_signs, minus + signs.count("+"))
                value = -value if minus % 2 else value
            integer = integer and number.isdigit()
            values.append(value)
        # a number is 0 levels deep, each sign adds one, the list of items and the array two
        depth = most_signs + 2
        return (((len(values),), tuple(values), integer), depth, row.end()) \
            if depth <= _MAX_SCANNED_DEPTH else None
    opening = _OPENING.match(text, pos)
    if opening is None or 2 * level >= _MAX_SCANNED_DEPTH:  # each level is two deep
        return None
    items = []
    at = opening.end()
    while True:
        item = _scan_numbers(text, at, level + 1)
        if item is None or item[1] + 2 > _MAX_SCANNED_DEPTH or (
                items and item[0][0] != items[0][0][0]):
            return None
        items.append(item)
        after = _NEXT_ITEM.match(text, item[2])
        if after is None:
            return None
        at = after.end()
        if after.group(1):  # the closing `]`
            break
    shape = (len(items), *items[0][0][0])
    values = tuple(itertools.chain.from_iterable(item[0][1] for item in items))
    depth = max(item[1] for item in items) + 2
    return (shape, values, all(item[0][2] for item in items)), depth, at


def _numbers(span: ir.Span, items: tuple[ir.Expr, ...]) -> ir.NumberArray | None:
    """The items as one NumberArray: signed numbers, or NumberArrays of one shape (folded
    from the inside out); None for anything else, which evaluation checks item by item."""
    first = items[0]
    if type(first) is ir.NumberArray:
        if any(type(item) is not ir.NumberArray or item.shape != first.shape for item in items):
            return None
        values = tuple(itertools.chain.from_iterable(item.values for item in items))
        return ir.NumberArray(span, (len(items), *first.shape), values,
                              all(item.is_integer for item in items))
    numbers = []
    integer = True
    for item in items:
        sign = 1.0
        while type(item) is ir.Unary and item.op in ("-", "+"):
            sign = -sign if item.op == "-" else sign
            item = item.operand
        if type(item) is not ir.Number:
            return None
        numbers.append(sign * item.value)
        integer = integer and item.is_integer
    return ir.NumberArray(span, (len(items),), tuple(numbers), integer)
