"""The brl intermediate representation: frozen dataclasses, each carrying its source span.

The IR is *lifted*: it keeps index sets, sizes and expressions symbolic, exactly as written, so it
is the contract with other tools (see docs/ir.md).  Numbers are produced later, by elaboration
(`bilevel_dsl.elaborate`) and lowering (`bilevel_dsl.lowering`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Union

IR_VERSION = 2
READABLE_IR_VERSIONS = (1, 2)  # version 1 is version 2 without NumberArray


@dataclass(frozen=True)
class Span:
    """1-based line and column of the first character; the end is exclusive."""

    line: int
    column: int
    end_line: int
    end_column: int


# ---------------------------------------------------------------- expressions


@dataclass(frozen=True)
class Number:
    span: Span
    value: float
    is_integer: bool


@dataclass(frozen=True)
class String:
    span: Span
    value: str


@dataclass(frozen=True)
class Name:
    span: Span
    id: str


@dataclass(frozen=True)
class Attribute:
    span: Span
    base: Expr
    attr: str


@dataclass(frozen=True)
class Index:
    span: Span
    base: Expr
    indices: tuple[Expr, ...]


@dataclass(frozen=True)
class Keyword:
    span: Span
    name: str
    value: Expr


@dataclass(frozen=True)
class Call:
    span: Span
    function: str
    args: tuple[Expr, ...]
    keywords: tuple[Keyword, ...]


@dataclass(frozen=True)
class Unary:
    span: Span
    op: str  # "-", "+", "not"
    operand: Expr


@dataclass(frozen=True)
class Binary:
    span: Span
    op: str  # "+", "-", "*", "/", "^", "and", "or", "==", "!=", "<", "<=", ">", ">="
    left: Expr
    right: Expr


@dataclass(frozen=True)
class Conditional:
    span: Span
    condition: Expr
    then: Expr
    otherwise: Expr


@dataclass(frozen=True)
class ArrayLiteral:
    span: Span
    items: tuple[Expr, ...]


@dataclass(frozen=True)
class NumberArray:
    """An array written out in numbers (`[[0.1, 0.9], [-1, 2]]`), folded whole by the parser:
    a table pasted into a file would cost a node, 2 KiB and tens of microseconds a number.
    `values` in row-major order; `is_integer` when every number is written without a point."""

    span: Span
    shape: tuple[int, ...]
    values: tuple[float, ...]
    is_integer: bool


@dataclass(frozen=True)
class Range:
    """The integer set ``start..stop``, both ends included."""

    span: Span
    start: Expr
    stop: Expr


@dataclass(frozen=True)
class Member:
    span: Span
    name: str


@dataclass(frozen=True)
class Members:
    """A set given by its members: ``{left, right}``."""

    span: Span
    members: tuple[Member, ...]


@dataclass(frozen=True)
class Binder:
    span: Span
    name: str
    domain: Expr


@dataclass(frozen=True)
class Reduction:
    span: Span
    op: str  # sum, prod, max, min, mean, logsumexp
    binders: tuple[Binder, ...]
    where: Expr | None
    body: Expr


Expr = Union[  # noqa: UP007 - the schema generator reads this Union
    Number,
    String,
    Name,
    Attribute,
    Index,
    Call,
    Unary,
    Binary,
    Conditional,
    ArrayLiteral,
    NumberArray,
    Range,
    Members,
    Reduction,
]


# ---------------------------------------------------------------- statements


@dataclass(frozen=True)
class Dim:
    """One dimension of a declaration: ``S``, ``10``, or ``s in S`` (binds an index name)."""

    span: Span
    index: str | None
    domain: Expr


@dataclass(frozen=True)
class Item:
    """``key[i, j] = value`` inside an ``mdp ... { }`` or ``lower ... { }`` block."""

    span: Span
    key: str
    key_span: Span
    indices: tuple[Name, ...]
    value: Expr


@dataclass(frozen=True)
class ProblemDecl:
    span: Span
    name: str
    name_span: Span
    title: str | None


@dataclass(frozen=True)
class SeedDecl:
    span: Span
    seed: int


@dataclass(frozen=True)
class ParamDecl:
    span: Span
    name: str
    name_span: Span
    dims: tuple[Dim, ...]
    value: Expr
    random: bool  # declared with `~`: draw functions are allowed in `value`


@dataclass(frozen=True)
class SetDecl:
    span: Span
    name: str
    name_span: Span
    value: Expr


@dataclass(frozen=True)
class VarDecl:
    span: Span
    name: str
    name_span: Span
    dims: tuple[Dim, ...]
    value: Expr | None
    random: bool
    lower: Expr | None
    upper: Expr | None


@dataclass(frozen=True)
class LetDecl:
    span: Span
    name: str
    name_span: Span
    dims: tuple[Dim, ...]
    value: Expr


@dataclass(frozen=True)
class MdpDecl:
    """``mdp M = generator(args)`` (``block`` false) or ``mdp M = table { items }``."""

    span: Span
    name: str
    name_span: Span
    kind: str
    kind_span: Span
    block: bool
    args: tuple[Expr, ...]
    keywords: tuple[Keyword, ...]
    items: tuple[Item, ...]


@dataclass(frozen=True)
class LowerDecl:
    span: Span
    mdp: str
    mdp_span: Span
    items: tuple[Item, ...]


@dataclass(frozen=True)
class UpperDecl:
    """The leader's objective.  ``form`` and ``features`` say what a solver must support."""

    span: Span
    sense: str  # "minimize" | "maximize"
    objective: Expr
    form: str  # "policy_functional" | "trajectory"
    features: tuple[str, ...]


@dataclass(frozen=True)
class SolveDecl:
    span: Span
    solver: str
    solver_span: Span
    options: tuple[Keyword, ...]
    device: str | None
    device_span: Span | None


@dataclass(frozen=True)
class CheckDecl:
    span: Span
    condition: Expr
    message: str | None


Statement = Union[  # noqa: UP007
    ProblemDecl,
    SeedDecl,
    ParamDecl,
    SetDecl,
    VarDecl,
    LetDecl,
    MdpDecl,
    LowerDecl,
    UpperDecl,
    SolveDecl,
    CheckDecl,
]


@dataclass(frozen=True)
class Program:
    ir_version: int
    language_version: int
    source: str  # the file name the program came from (for diagnostics)
    statements: tuple[Statement, ...]

    def first(self, kind: type) -> Statement | None:
        return next((s for s in self.statements if isinstance(s, kind)), None)

    @property
    def name(self) -> str:
        decl = self.first(ProblemDecl)
        if decl is not None:
            return decl.name
        stem = self.source.rsplit("/", 1)[-1]
        return stem[:-4] if stem.endswith(".brl") else stem or "problem"


# The words a node's string fields may hold (the schema enumerates them; from_json checks them).
UNARY_OPS = ("-", "+", "not")
BINARY_OPS = ("+", "-", "*", "/", "^", "and", "or", "==", "!=", "<", "<=", ">", ">=")
REDUCERS = ("sum", "prod", "max", "min", "mean", "logsumexp")
SENSES = ("minimize", "maximize")
MDP_KINDS = ("gridworld", "random_mdp", "gym", "table")
POLICY_FUNCTIONAL = "policy_functional"  # a differentiable function of x and the policy table
TRAJECTORY = "trajectory"  # an expectation over sampled trajectories
FORMS = (POLICY_FUNCTIONAL, TRAJECTORY)

# Functions of the follower's policy that an upper objective may use, and their form.
POLICY_FUNCTIONALS = ("value", "occupancy", "entropy")
TRAJECTORY_FUNCTIONALS = ("expected_return", "preference_loss")


def walk(root: object) -> Iterator[object]:
    """Every node under `root`, itself included; a loop, not recursion (expressions nest deep)."""
    stack: list[object] = [root]
    while stack:
        node = stack.pop()
        yield node
        if type(node) is NumberArray:  # its numbers are no nodes
            continue
        for name in getattr(node, "__dataclass_fields__", ()):
            value = getattr(node, name)
            if isinstance(value, tuple):
                stack.extend(value)
            elif hasattr(value, "__dataclass_fields__"):
                stack.append(value)


def _policy_uses(expr: Expr):
    """Yield (feature, node) for every use of the follower's policy inside `expr`."""
    for node in walk(expr):
        if isinstance(node, Name) and node.id == "policy":
            yield "policy", node
        elif isinstance(node, Call) and node.function in (
            POLICY_FUNCTIONALS + TRAJECTORY_FUNCTIONALS
        ):
            yield node.function, node


def objective_features(expr: Expr) -> tuple[str, ...]:
    """The policy features an objective uses: what a solver must support to handle it."""
    return tuple(sorted({feature for feature, _ in _policy_uses(expr)}))


def first_policy_use(expr: Expr) -> Expr | None:
    return min((node for _, node in _policy_uses(expr)),
               key=lambda n: (n.span.line, n.span.column), default=None)


def objective_form(features: tuple[str, ...]) -> str:
    if any(f in TRAJECTORY_FUNCTIONALS for f in features):
        return TRAJECTORY
    return POLICY_FUNCTIONAL


def names_in(expr: Expr) -> set[str]:
    """Every name an expression mentions."""
    return {node.id for node in walk(expr) if isinstance(node, Name)}


def with_features(program: Program) -> Program:
    """The program with each objective's `features` and `form` computed from what it uses,
    through `let`s too (`let d = occupancy(M, policy)` ... `upper maximize sum(d)` uses
    `occupancy`): what a solver must support, never taken on trust from a document."""
    lets = {s.name: s.value for s in program.statements if isinstance(s, LetDecl)}
    statements = []
    for stmt in program.statements:
        if isinstance(stmt, UpperDecl):
            found: set[str] = set()
            seen: set[str] = set()
            stack = [stmt.objective]
            while stack:
                expr = stack.pop()
                found.update(objective_features(expr))
                for name in names_in(expr):
                    if name in lets and name not in seen:
                        seen.add(name)
                        stack.append(lets[name])
            features = tuple(sorted(found))
            if features != stmt.features or stmt.form != objective_form(features):
                stmt = replace(stmt, features=features, form=objective_form(features))
        statements.append(stmt)
    return replace(program, statements=tuple(statements))
