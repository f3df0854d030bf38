"""Stage 1: text -> IR.  Lark LALR parse (grammar/brl.lark), then a Transformer into `ir` nodes.

Syntax errors become located diagnostics; no input (empty, binary, huge, deeply nested) escapes as
a Python exception.
"""

from __future__ import annotations

import dataclasses
import math
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path

from lark import Lark, Token, Transformer, Tree
from lark.exceptions import (
    UnexpectedCharacters,
    UnexpectedEOF,
    UnexpectedInput,
    UnexpectedToken,
    VisitError,
)

from . import ir
from .diagnostics import BrlError, Diagnostic, SourceFile

_HEADER = re.compile(r"(?:[ \t\f\r\n]|#[^\n]*)*brl[ \t\f\r\n]+([0-9]+)")
MAX_DEPTH = 200  # deepest expression nesting accepted; keeps every later stage's recursion safe

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


_TRANSFORMER: _ToIR | None = None


@lru_cache(maxsize=1)
def _lark() -> Lark:
    """The parser, with the IR transformer applied during the LALR parse (no parse tree)."""
    global _TRANSFORMER
    _TRANSFORMER = _ToIR()
    return Lark(
        grammar_text(),
        parser="lalr",
        strict=True,
        start=["start", "expr"],
        maybe_placeholders=False,
        lexer="basic",  # keywords are reserved everywhere; 1.5x faster than the contextual lexer
        transformer=_TRANSFORMER,
    )


def _parse(text: str, start: str, source: SourceFile):
    lark = _lark()
    assert _TRANSFORMER is not None
    _TRANSFORMER.reset()
    try:
        return lark.parse(text, start=start)
    except UnexpectedInput as exc:
        raise BrlError([_syntax_diagnostic(exc, text)], source) from None
    except _NodeError as exc:
        raise BrlError([exc.diagnostic], source) from None
    except VisitError as exc:
        if isinstance(exc.orig_exc, _NodeError):
            raise BrlError([exc.orig_exc.diagnostic], source) from None
        raise
    finally:
        _TRANSFORMER.reset()


def decode(data: bytes, name: str) -> SourceFile:
    """Bytes -> text, rejecting what is not UTF-8 text with a located error."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start].decode("utf-8", errors="replace")
        line = before.count("\n") + 1
        column = len(before) - (before.rfind("\n") + 1) + 1
        source = SourceFile(name, before)
        span = ir.Span(line, column, line, column + 1)
        raise BrlError(
            [Diagnostic("E001", "this file is not UTF-8 text (is it a binary file?)", span,
                        "a .brl file is plain text that starts with `brl 1`")],
            source,
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    return SourceFile(name, text)


def parse_source(source: SourceFile) -> ir.Program:
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
    return ir.with_let_features(dataclasses.replace(program, source=source.name))


def parse_expression(text: str, name: str = "<expression>") -> ir.Expr:
    """Parse one expression (used for `-D name=value` overrides)."""
    return _parse(text, "expr", SourceFile(name, text))


def _has_code(text: str) -> bool:
    return any(line.strip() and not line.strip().startswith("#") for line in text.splitlines())


def _syntax_diagnostic(exc: UnexpectedInput, text: str) -> Diagnostic:
    line, column = exc.line, exc.column
    if isinstance(exc, UnexpectedToken) and exc.token.type == "$END" or isinstance(
        exc, UnexpectedEOF
    ):
        lines = text.rstrip().split("\n")
        line, column = len(lines), len(lines[-1]) + 1
        expected = _expected(exc)
        return Diagnostic(
            "E100",
            "the file ends in the middle of a statement",
            ir.Span(line, column, line, column + 1),
            f"expected {expected}" if expected else None,
        )
    if isinstance(exc, UnexpectedCharacters):
        char = text[exc.pos_in_stream] if exc.pos_in_stream < len(text) else "?"
        shown = char if char.isprintable() else repr(char)
        hint = None
        if char == '"':
            hint = 'strings are written "like this" on one line, or """like this""" over several'
        return Diagnostic(
            "E100", f"unexpected character `{shown}`",
            ir.Span(line, column, line, column + 1), hint,
        )
    assert isinstance(exc, UnexpectedToken)
    token = exc.token
    value = str(token)
    shown = value.split("\n", 1)[0]  # a message is one line, even for a """ string
    if shown != value or len(shown) > 40:
        shown = shown[:37] + "..."
    expected = _expected(exc)
    message = f"unexpected `{shown}`"
    hint = f"expected {expected}" if expected else None
    if token.type in STATEMENT_KEYWORDS and exc.expected and "BRL" in exc.expected:
        message = "missing language header"
        hint = "start the file with `brl 1`"
    elif exc.expected and "BRL" in exc.expected:
        message = f"unexpected `{shown}`: a .brl file starts with the header `brl 1`"
        hint = None
    elif token.type == "IF":
        hint = "inside a larger expression, put the conditional in parentheses: " \
            "(if c then a else b)"
    elif token.type == "EQUALS" and exc.expected and "CMP_OP" in exc.expected:
        hint = "to compare two values, write `==`"
    return Diagnostic("E100", message, _span_of(token), hint)


def _expected(exc: UnexpectedInput) -> str:
    terminals = set(getattr(exc, "expected", None) or ())
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


def _span_of(node: Tree | Token) -> ir.Span:
    if isinstance(node, Token):
        line = node.line or 1
        column = node.column or 1
        end_line = node.end_line or line
        end_column = node.end_column or column + 1
        return ir.Span(line, column, end_line, end_column)
    meta = node.meta
    if getattr(meta, "empty", True):
        return ir.Span(1, 1, 1, 2)
    return ir.Span(meta.line, meta.column, meta.end_line, meta.end_column)


class _NodeError(Exception):
    def __init__(self, diagnostic: Diagnostic):
        self.diagnostic = diagnostic


_ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\"}
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)


def _unescape(body: str) -> str:
    # One regular-expression pass (not a Python loop per character): a 10 MB string stays fast.
    return _ESCAPE.sub(lambda m: _ESCAPES.get(m.group(1), m.group(1)), body)


def _string_value(token: Token) -> str:
    text = str(token)
    if text.startswith('"""'):
        return text[3:-3]
    return _unescape(text[1:-1])


def _start(child) -> tuple[int, int] | None:
    if isinstance(child, Token):
        return (child.line, child.column)
    span = getattr(child, "span", None)
    if span is not None:
        return (span.line, span.column)
    if isinstance(child, (tuple, list)):
        for item in child:
            found = _start(item)
            if found is not None:
                return found
    return None


def _end(child) -> tuple[int, int] | None:
    if isinstance(child, Token):
        return (child.end_line, child.end_column)
    span = getattr(child, "span", None)
    if span is not None:
        return (span.end_line, span.end_column)
    if isinstance(child, (tuple, list)):
        for item in reversed(child):
            found = _end(item)
            if found is not None:
                return found
    return None


class _Meta:
    """The span of a rule's text, from its first and last child (Lark's propagate_positions
    doubled the parse time of large files)."""

    __slots__ = ("line", "column", "end_line", "end_column")

    def __init__(self, children: list):
        start = _start(children[0]) if children else None
        if start is None:
            start = _start(children) or (1, 1)
        end = _end(children[-1]) if children else None
        if end is None:
            end = _end(children) or (start[0], start[1] + 1)
        self.line, self.column = start
        self.end_line, self.end_column = end


def _with_span(method):
    """Give a rule method its span, and keep every expression at most MAX_DEPTH deep so that
    later (recursive) stages are safe."""

    def wrapper(self, children):
        meta = _Meta(children)
        get = self.depth.get
        depth = 1
        for c in children:
            d = get(id(c), 0)
            if d >= depth:
                depth = d + 1
        if depth > MAX_DEPTH:
            raise _NodeError(Diagnostic(
                "E902", f"expression nested more than {MAX_DEPTH} levels deep",
                _ToIR._span(meta), "split it with `let` definitions, or use `sum {i in I} ...`"))
        result = method(self, meta, children)
        self.depth[id(result)] = depth
        self.keep.append(result)  # ids stay unique while the parse runs
        return result

    wrapper.__name__ = method.__name__
    return wrapper


class _ToIR(Transformer):
    """Parse tree -> IR; every node gets the span of the text it came from."""

    def __init__(self) -> None:
        super().__init__(visit_tokens=False)
        self.reset()

    def reset(self) -> None:
        self.depth: dict[int, int] = {}
        self.keep: list[object] = []

    @staticmethod
    def _span(meta) -> ir.Span:
        return ir.Span(meta.line, meta.column, meta.end_line, meta.end_column)

    # ---- program and statements
    def start(self, meta, children):
        header, *statements = children
        return ir.Program(ir.IR_VERSION, header, "", tuple(statements))

    def header(self, meta, children):
        version = str(children[1])
        if len(version) > 18:  # not a version; and int() refuses over 4300 digits
            raise _NodeError(Diagnostic("E102", f"unsupported language version {_short(version)}",
                                        _span_of(children[1]), "this compiler reads `brl 1`"))
        return int(version)

    def problem_stmt(self, meta, children):
        name = children[1]
        title = _string_value(children[2]) if len(children) > 2 else None
        return ir.ProblemDecl(self._span(meta), str(name), _span_of(name), title)

    def seed_stmt(self, meta, children):
        digits = str(children[1])
        value = int(digits) if len(digits) <= 20 else 2**63
        if value >= 2**63:
            raise _NodeError(Diagnostic("E901", "seed is too large", _span_of(children[1]),
                                        "use a seed below 2^63"))
        return ir.SeedDecl(self._span(meta), value)

    def param_stmt(self, meta, children):
        name = children[1]
        dims = children[2] if len(children) == 4 else ()
        random, value = children[-1]
        return ir.ParamDecl(self._span(meta), str(name), _span_of(name), dims, value, random)

    def set_stmt(self, meta, children):
        name = children[1]
        return ir.SetDecl(self._span(meta), str(name), _span_of(name), children[3])

    def var_stmt(self, meta, children):
        name = children[1]
        dims: tuple = ()
        value = None
        random = False
        lower = upper = None
        for child in children[2:]:
            if isinstance(child, tuple) and child and isinstance(child[0], ir.Dim):
                dims = child
            elif isinstance(child, tuple) and len(child) == 2 and isinstance(child[0], bool):
                random, value = child
            elif isinstance(child, tuple) and len(child) == 3 and child[0] == "bounds":
                lower, upper = child[1], child[2]
        return ir.VarDecl(
            self._span(meta), str(name), _span_of(name), dims, value, random, lower, upper
        )

    def let_stmt(self, meta, children):
        name = children[1]
        dims = children[2] if len(children) == 5 else ()
        return ir.LetDecl(self._span(meta), str(name), _span_of(name), dims, children[-1])

    def mdp_generator(self, meta, children):
        name, kind = children[1], children[3]
        args, keywords = self._split_arguments(children[5] if len(children) == 7 else [])
        return ir.MdpDecl(self._span(meta), str(name), _span_of(name), str(kind), _span_of(kind),
                          False, args, keywords, ())

    def mdp_block(self, meta, children):
        name, kind = children[1], children[3]
        items = tuple(c for c in children[5:-1])
        return ir.MdpDecl(self._span(meta), str(name), _span_of(name), str(kind), _span_of(kind),
                          True, (), (), items)

    def lower_stmt(self, meta, children):
        mdp = children[1]
        items = tuple(children[3:-1])
        return ir.LowerDecl(self._span(meta), str(mdp), _span_of(mdp), items)

    def upper_stmt(self, meta, children):
        sense, objective = children[1], children[2]
        features = ir.objective_features(objective)
        return ir.UpperDecl(self._span(meta), sense, objective, ir.objective_form(features),
                            features)

    def sense(self, children):
        return str(children[0])

    def solve_stmt(self, meta, children):
        solver = children[1]
        options: tuple = ()
        device = device_span = None
        rest = children[2:]
        if rest and isinstance(rest[0], Token) and rest[0].type == "LPAR":
            if len(rest) > 2 and isinstance(rest[1], list):
                args, options = self._split_arguments(rest[1])
                if args:
                    raise _NodeError(Diagnostic(
                        "E100", "solver options are written `name = value`", args[0].span,
                        "for example: solve m_sobirl(outer = 500, beta = 0.05)"))
            rest = rest[3:] if len(rest) > 2 and isinstance(rest[1], list) else rest[2:]
        if rest:
            device, device_span = str(rest[1]), _span_of(rest[1])
        return ir.SolveDecl(self._span(meta), str(solver), _span_of(solver), options, device,
                            device_span)

    def check_stmt(self, meta, children):
        message = _string_value(children[3]) if len(children) == 4 else None
        return ir.CheckDecl(self._span(meta), children[1], message)

    def assign(self, meta, children):
        return (False, children[1])

    def draw(self, meta, children):
        return (True, children[1])

    def bounds(self, meta, children):
        return ("bounds", children[2], children[4])

    def dims(self, meta, children):
        return tuple(c for c in children if isinstance(c, ir.Dim))

    def named_dim(self, meta, children):
        return ir.Dim(self._span(meta), str(children[0]), children[2])

    def plain_dim(self, meta, children):
        return ir.Dim(self._span(meta), None, children[0])

    def item(self, meta, children):
        key = children[0]
        indices = children[1] if len(children) == 4 else ()
        return ir.Item(self._span(meta), str(key), _span_of(key), indices, children[-1])

    def item_indices(self, meta, children):
        return tuple(ir.Name(_span_of(t), str(t)) for t in children if t.type == "NAME")

    def members(self, meta, children):
        return ir.Members(self._span(meta), tuple(c for c in children if isinstance(c, ir.Member)))

    def member(self, children):
        return ir.Member(_span_of(children[0]), str(children[0]))

    # ---- arguments
    def arguments(self, meta, children):
        return [c for c in children if not isinstance(c, Token)]

    def keyword(self, meta, children):
        return ir.Keyword(self._span(meta), str(children[0]), children[2])

    def _split_arguments(self, arguments):
        args = tuple(a for a in arguments if not isinstance(a, ir.Keyword))
        keywords = tuple(a for a in arguments if isinstance(a, ir.Keyword))
        seen: set[str] = set()
        for kw in keywords:
            if kw.name in seen:
                raise _NodeError(Diagnostic("E202", f"argument `{kw.name}` is given twice",
                                            kw.span))
            seen.add(kw.name)
        return args, keywords

    # ---- expressions
    def conditional(self, meta, children):
        return ir.Conditional(self._span(meta), children[1], children[3], children[5])

    def logical(self, meta, children):
        return ir.Binary(self._span(meta), str(children[1]), children[0], children[2])

    def unary(self, meta, children):
        return ir.Unary(self._span(meta), str(children[0]), children[1])

    def comparison(self, meta, children):
        return ir.Binary(self._span(meta), str(children[1]), children[0], children[2])

    def binary(self, meta, children):
        return ir.Binary(self._span(meta), str(children[1]), children[0], children[2])

    def range(self, meta, children):
        return ir.Range(self._span(meta), children[0], children[2])

    def reduction(self, meta, children):
        op = str(children[0])
        binders = tuple(c for c in children if isinstance(c, ir.Binder))
        where = None
        for i, child in enumerate(children):
            if isinstance(child, Token) and child.type == "COLON":
                where = children[i + 1]
        return ir.Reduction(self._span(meta), op, binders, where, children[-1])

    def reducer(self, children):
        return children[0]  # the token (a str): its position starts the reduction's span

    def binder(self, meta, children):
        return ir.Binder(self._span(meta), str(children[0]), children[2])

    def index(self, meta, children):
        args, keywords = self._split_arguments(children[2])
        if keywords:
            raise _NodeError(Diagnostic("E100", "an index cannot be a keyword argument",
                                        keywords[0].span))
        return ir.Index(self._span(meta), children[0], args)

    def attribute(self, meta, children):
        return ir.Attribute(self._span(meta), children[0], str(children[2]))

    def call(self, meta, children):
        function = str(children[0])
        arguments = children[2] if len(children) == 4 else []
        args, keywords = self._split_arguments(arguments)
        return ir.Call(self._span(meta), function, args, keywords)

    def integer(self, children):
        token = children[0]
        value = float(int(str(token))) if len(str(token)) < 309 else math.inf
        return self._number(token, value, True)

    def real(self, children):
        return self._number(children[0], float(str(children[0])), False)

    def _number(self, token: Token, value: float, is_integer: bool) -> ir.Number:
        if not math.isfinite(value):
            raise _NodeError(Diagnostic(
                "E901", f"the number `{_short(str(token))}` is too large to represent",
                _span_of(token), "numbers must be below about 1.8e308; use `inf` for infinity"))
        return ir.Number(_span_of(token), value, is_integer)

    def string(self, children):
        return ir.String(_span_of(children[0]), _string_value(children[0]))

    def name(self, children):
        return ir.Name(_span_of(children[0]), str(children[0]))

    def parens(self, meta, children):
        return children[1]

    def array(self, meta, children):
        args, keywords = self._split_arguments(children[1])
        if keywords:
            raise _NodeError(Diagnostic("E100", "an array literal cannot hold `name = value`",
                                        keywords[0].span))
        return ir.ArrayLiteral(self._span(meta), args)


_LEAVES = {"integer", "real", "string", "name", "member", "sense", "reducer", "reset"}
for _name, _method in list(vars(_ToIR).items()):
    if not _name.startswith("_") and _name not in _LEAVES and callable(_method):
        setattr(_ToIR, _name, _with_span(_method))


def _short(text: str) -> str:
    return text if len(text) <= 30 else text[:27] + "..."
