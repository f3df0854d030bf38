"""The expression interpreter: IR expressions -> torch operations (so autograd gives gradients).

Nothing here calls Python's eval/exec or imports anything a file names: a .brl file is data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from . import ir, softmdp
from .diagnostics import did_you_mean
from .values import (
    DTYPE,
    POISONED,
    Cascade,
    EvalError,
    MdpValue,
    Names,
    PolicyRef,
    SetValue,
    TableSets,
    Val,
    labelled_sets,
)

ELEMENTWISE = {
    "exp": torch.exp,
    "log": torch.log,
    "sqrt": torch.sqrt,
    "abs": torch.abs,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "softplus": torch.nn.functional.softplus,
    "sin": torch.sin,
    "cos": torch.cos,
}
REDUCERS = ir.REDUCERS
DRAWS = ("normal", "uniform", "bernoulli")
FUNCTIONALS = ir.POLICY_FUNCTIONALS + ir.TRAJECTORY_FUNCTIONALS
OTHER_FUNCTIONS = ("norm", "norm1", "norm2", "dot", "quad", "card", "load")
FUNCTIONS = tuple(ELEMENTWISE) + REDUCERS + DRAWS + FUNCTIONALS + OTHER_FUNCTIONS
CONSTANTS = {"inf": math.inf, "true": 1.0, "false": 0.0}
MAX_TERMS = 10**9  # terms of one reduction
MAX_HORIZON = 100_000  # steps of expected_return and preference_loss
# trajectory steps one estimate of a sampled term draws (pairs x 2 x horizon for a preference
# loss): the samplers hold them all at once, about 100 bytes each
MAX_SAMPLED_STEPS = 20_000_000


@dataclass
class LetDef:
    decl: ir.LetDecl
    dims: tuple[tuple[str | None, SetValue | None, int], ...]  # (index name, set, size)
    uses: frozenset[str] = frozenset()  # every name its value mentions


@dataclass
class VarRef:
    name: str
    dims: tuple[SetValue | None, ...]


@dataclass
class Binding:
    """An index bound to a set: along `axis` its elements are the set's positions 0..n-1, or,
    with `at`, the given positions, along an axis that several indices may share (a reward
    in `(s, a, t)` evaluated on the nonzeros of a sparse `P` only, one entry per triple)."""

    axis: str
    set: SetValue
    device: torch.device
    at: torch.Tensor | None = None

    @property
    def positions(self) -> torch.Tensor:
        return arange(self.set.size, self.device) if self.at is None else self.at

    def values(self) -> torch.Tensor:
        """The index's values: its positions, or for a range such as `1..5` the numbers."""
        if self.at is None:
            return arange(self.set.size, self.device, self.set.start)
        return self.at.to(DTYPE) + self.set.start


@dataclass
class Scope:
    """Everything a name can mean while one expression is evaluated."""

    names: dict[str, object]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    indices: dict[str, Binding] = field(default_factory=dict)
    x: torch.Tensor | None = None
    policy: torch.Tensor | None = None
    policy_ref: PolicyRef | None = None
    draw: Callable[[str, list[Val], ir.Call], Val] | None = None  # set inside `~` initialisers
    load: Callable[[ir.Call, str], Val] | None = None
    let_cache: dict[str, Val] = field(default_factory=dict)
    # False: trajectory terms (expected_return, preference_loss) are checked and count as 0
    exact_trajectories: bool = True
    constants: ConstantCache | None = None  # set by lowering: reuse what x and pi cannot change
    lets: tuple[str, ...] = ()  # the lets being evaluated, innermost last
    hints: bool = True  # False once a file has more errors than are shown: no "did you mean"
    watch: Callable[[ir.Expr, object], None] | None = None  # sees each node's value (not_finite)

    def copy(self) -> Scope:
        """A shallow copy (no dataclass machinery: expressions are evaluated at every solver
        iteration)."""
        inner = object.__new__(Scope)
        inner.__dict__.update(self.__dict__)
        return inner

    def bind(self, name: str, binding: Binding) -> Scope:
        """The scope inside a reduction or comprehension over ``name``. It shares the let
        cache: a let is evaluated without the caller's indices (``_let``), so its value is the
        same everywhere in one evaluation, and a let used inside a sum was otherwise evaluated
        again for every sum (exponential in a chain of such lets)."""
        inner = self.copy()
        inner.indices = {**self.indices, name: binding}
        return inner


@dataclass
class ConstantCache:
    """Values of the sub-expressions that depend neither on the variable nor on the policy.

    A lowered closure evaluates the same expressions with the same index bindings at every
    call, so such a sub-expression (``maze.P[s, a, t]``, ``c[s, a]``) is computed once.
    """

    varying: set[int]  # ids of the nodes that do depend on x or the policy
    values: dict[int, object] = field(default_factory=dict)
    # the last solutions of each policy functional's linear systems: the next evaluation's
    # iterative solves start there
    warm: dict[int, softmdp.WarmStart] = field(default_factory=dict)
    finite: dict[int, bool] = field(default_factory=dict)  # of constant factors of sums


def varying_nodes(roots: list[ir.Expr], names: dict[str, object]) -> set[int]:
    """The nodes under `roots` whose value can change with the variable or the policy."""
    varying: set[int] = set()
    lets: dict[str, bool] = {}

    def own(node: object) -> bool:
        if isinstance(node, ir.Name):
            obj = names.get(node.id)
            if node.id == "policy" or isinstance(obj, VarRef):
                return True
            if isinstance(obj, LetDef):
                if node.id not in lets:
                    lets[node.id] = False  # a let cannot refer to itself
                    lets[node.id] = visit(obj.decl.value)
                return lets[node.id]
        return isinstance(node, ir.Call) and node.function in FUNCTIONALS

    def visit(root: object) -> bool:
        # Children before parents, on an explicit stack: a chain `a1 + ... + an` is a tree as
        # deep as it is long, deeper than Python's recursion allows.
        done: list[bool] = []  # whether each finished node moves, in finishing order
        stack: list[tuple[object, int]] = [(root, -1)]
        while stack:
            node, count = stack.pop()
            if count < 0:
                children = _children(node)
                stack.append((node, len(children)))
                stack.extend((child, -1) for child in reversed(children))
                continue
            moves = own(node)
            if count:
                moves = any(done[-count:]) or moves
                del done[-count:]
            if moves:
                varying.add(id(node))
            done.append(moves)
        return done[0]

    # every let first, in the order declared: a let uses only earlier ones, so each finds
    # those it uses settled, and a chain of thousands of lets never recurses through `own`
    for name, obj in names.items():
        if isinstance(obj, LetDef) and name not in lets:
            lets[name] = False
            lets[name] = visit(obj.decl.value)
    for root in roots:
        visit(root)
    return varying


def _children(node: object) -> list[object]:
    out: list[object] = []
    if type(node) is ir.NumberArray:
        return out
    for name in getattr(node, "__dataclass_fields__", ()):
        value = getattr(node, name)
        if isinstance(value, tuple):
            out.extend(v for v in value if hasattr(v, "__dataclass_fields__"))
        elif hasattr(value, "__dataclass_fields__") and not isinstance(value, ir.Span):
            out.append(value)
    return out


def not_finite_origin(root: ir.Expr, scope: Scope) -> ir.Expr | None:
    """Where a NaN or an infinity in `root`'s value first appears: evaluated again with every
    sub-expression's value seen (no caches, no contractions), the innermost node on a path of
    values with NaN from `root` down (for an infinite `root`, with infinities). A NaN made of
    infinities (`0 * inf`) is placed at the operation; for an infinite `root` a `log(-1)`
    that a filter or an `if` leaves out does not count. None if `root` is finite there, or
    fails to evaluate."""
    bad: dict[int, tuple[bool, bool]] = {}  # (has NaN, has an infinity)

    def watch(node: ir.Expr, value: object) -> None:
        if (isinstance(value, Val) and value.t.is_floating_point()
                and not bool(torch.isfinite(value.t).all())):
            bad[id(node)] = (bool(value.t.isnan().any()), bool(value.t.isinf().any()))

    inner = scope.copy()
    inner.watch, inner.constants, inner.let_cache = watch, None, {}
    inner.indices = dict(scope.indices)
    try:
        evaluate(root, inner)
    except EvalError:
        return None
    if id(root) not in bad:
        return None
    kind = 0 if bad[id(root)][0] else 1  # follow NaN, or else infinities
    node = root
    while True:
        children = _children(node)
        let = scope.names.get(node.id) if type(node) is ir.Name else None
        if isinstance(let, LetDef) and node.id not in scope.indices:
            children.append(let.decl.value)
        inside = next((c for c in children if id(c) in bad and bad[id(c)][kind]), None)
        if inside is None:
            return node
        node = inside


# ------------------------------------------------------------------ helpers


_CONSTANTS_CACHE: dict[tuple[float, torch.device], torch.Tensor] = {}
_ARANGE_CACHE: dict[tuple[int, torch.device, int | None], torch.Tensor] = {}
_CACHE_LIMIT = 4096


def arange(size: int, device: torch.device, start: int | None = None) -> torch.Tensor:
    """``0..size-1`` (int64), or ``start..start+size-1`` as reals; shared between calls, since
    index values are never modified in place."""
    key = (size, device, start)
    t = _ARANGE_CACHE.get(key)
    if t is None:
        # outside inference mode, so that a cached tensor can be saved for autograd later;
        # cleared when full, so that the positions of problems gone do not stay in memory
        with torch.inference_mode(False):
            t = torch.arange(size, device=device)
            if start is not None:
                t = t.to(DTYPE) + start
        if len(_ARANGE_CACHE) >= _CACHE_LIMIT:
            _ARANGE_CACHE.clear()
        _ARANGE_CACHE[key] = t
    return t


def scalar(value: float, device: torch.device, kind: str = "real") -> Val:
    """A 0-d tensor; literals are cached (values are never modified in place)."""
    key = (value, device)
    t = _CONSTANTS_CACHE.get(key)
    if t is None:
        with torch.inference_mode(False):  # see arange()
            t = torch.tensor(value, dtype=DTYPE, device=device)
        if len(_CONSTANTS_CACHE) < _CACHE_LIMIT:
            _CONSTANTS_CACHE[key] = t
    return Val(t, kind=kind)


# align()'s layout for a signature of its inputs (named axes, shape, dimension sets): a closure
# evaluates the same expressions on same-shaped tensors at every call, so the checks and the
# permutations are worked out once. The key holds the sets, which keeps their identities unique.
_ALIGN_PLANS: dict[tuple, tuple] = {}


def align(values: list[Val], span: ir.Span) -> tuple[tuple[str, ...], list[torch.Tensor], tuple]:
    """Put values on a common set of named axes and broadcastable trailing dimensions."""
    first = values[0]
    if all(v.axes == first.axes and not v.dims for v in values):
        return first.axes, [v.t for v in values], ()  # the common case: element-wise scalars
    key = tuple((v.axes, v.t.shape, v.dims) for v in values)
    plan = _ALIGN_PLANS.get(key)
    if plan is None:
        plan = _align_plan(values, span)
        if len(_ALIGN_PLANS) >= _CACHE_LIMIT:
            _ALIGN_PLANS.clear()
        _ALIGN_PLANS[key] = plan
    axes, layouts, out_dims = plan
    tensors = []
    for v, (perm, shape) in zip(values, layouts):
        t = v.t if perm is None else v.t.permute(perm)
        tensors.append(t if shape is None else t.reshape(shape))
    return axes, tensors, out_dims


def _align_plan(values: list[Val], span: ir.Span) -> tuple:
    """``align``'s common axes, each value's (permutation or None, shape), and the dims."""
    axes: list[str] = []
    for v in values:
        for a in v.axes:
            if a not in axes:
                axes.append(a)
    ndim = max(len(v.dims) for v in values)
    out_dims: list[SetValue | None] = [None] * ndim
    out_sizes = [1] * ndim
    for v in values:
        for k, (d, n) in enumerate(zip(v.dims, v.shape)):
            pos = ndim - len(v.dims) + k
            if n != 1 and out_sizes[pos] not in (1, n):
                raise EvalError("E301", f"shapes do not match: {_shapes(values)}", span,
                                "arrays combined element by element need the same shape")
            if d is not None and out_dims[pos] is not None and d is not out_dims[pos]:
                raise EvalError(
                    "E303",
                    f"cannot combine an array over {d.describe()} with one over "
                    f"{out_dims[pos].describe()}",
                    span,
                    "the dimensions are indexed by different sets",
                )
            out_sizes[pos] = max(out_sizes[pos], n)
            if d is not None:
                out_dims[pos] = d
    axis_sizes: dict[str, int] = {}
    for v in values:
        for a, n in zip(v.axes, v.t.shape):
            axis_sizes[a] = max(axis_sizes.get(a, 1), n)
    total = math.prod(axis_sizes.values()) * math.prod(out_sizes)
    if total > MAX_TERMS:  # refused before torch tries to allocate it
        raise EvalError("E301", f"this expression would hold {total:,} numbers, more than "
                        f"{MAX_TERMS:,}", span, "index over smaller sets")
    layouts = []
    for v in values:
        perm = [v.axes.index(a) for a in axes if a in v.axes]
        sizes = {a: v.t.shape[v.axes.index(a)] for a in v.axes}
        shape = [sizes.get(a, 1) for a in axes]
        shape += [1] * (ndim - len(v.dims)) + list(v.shape)
        permutation = (*perm, *range(len(v.axes), v.t.dim())) if perm != sorted(perm) else None
        same = permutation is None and tuple(shape) == tuple(v.t.shape)
        layouts.append((permutation, None if same else tuple(shape)))
    return tuple(axes), layouts, tuple(out_dims)


def _shapes(values: list[Val]) -> str:
    return " and ".join(v.describe_shape() for v in values)


def expand_axes(v: Val, axes: tuple[str, ...], sizes: dict[str, int]) -> torch.Tensor:
    """The tensor of `v` with exactly `axes` as leading dims, in that order (broadcast)."""
    if v.axes == axes and all(v.t.shape[i] == sizes[a] for i, a in enumerate(axes)):
        return v.t  # already in place: the common case of a table over its own indices
    present = [a for a in axes if a in v.axes]
    perm = [v.axes.index(a) for a in present]
    t = v.t.permute((*perm, *range(len(v.axes), v.t.dim()))) if perm != sorted(perm) else v.t
    shape = []
    it = iter(t.shape[: len(present)])
    got = dict(zip(present, it))
    for a in axes:
        shape.append(got.get(a, 1))
    t = t.reshape((*shape, *v.shape))
    return t.expand((*[sizes[a] for a in axes], *v.shape))


def to_real(v: Val) -> torch.Tensor:
    return as_real(v.t)


def as_real(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == DTYPE else t.to(DTYPE)


def need_val(obj: object, node: ir.Expr) -> Val:
    if isinstance(obj, Val):
        return obj
    raise EvalError("E305", f"{_what(obj)} cannot be used as a number here", node.span,
                    _value_hint(obj))


def _what(obj: object) -> str:
    if isinstance(obj, SetValue):
        return f"the set `{obj.name}`"
    if isinstance(obj, (MdpValue, TableSets)):
        return f"the MDP `{obj.name}`"
    if isinstance(obj, PolicyRef):
        return "`policy`"
    if isinstance(obj, str):
        return "a string"
    return "this"


def _value_hint(obj: object) -> str | None:
    if isinstance(obj, SetValue):
        return f"to count its elements write `card({obj.name})`"
    if isinstance(obj, MdpValue):
        return f"use one of its parts, such as `{obj.name}.P` or `{obj.name}.R`"
    return None


# ------------------------------------------------------------------ evaluation


def evaluate(node: ir.Expr, scope: Scope) -> object:
    method = _DISPATCH.get(type(node))
    if method is None:  # pragma: no cover - every IR expression type is dispatched
        raise EvalError("E100", "unsupported expression", getattr(node, "span", None))
    cache = scope.constants
    if cache is not None and id(node) not in cache.varying:
        value = cache.values.get(id(node))
        if value is None:
            value = cache.values[id(node)] = method(node, scope)
        return value
    if scope.watch is not None:
        value = method(node, scope)
        scope.watch(node, value)
        return value
    return method(node, scope)


def evaluate_val(node: ir.Expr, scope: Scope) -> Val:
    return need_val(evaluate(node, scope), node)


def _number(node: ir.Number, scope: Scope) -> Val:
    return scalar(node.value, scope.device, "int" if node.is_integer else "real")


def _string(node: ir.String, scope: Scope) -> str:
    return node.value


def _name(node: ir.Name, scope: Scope) -> object:
    binding = scope.indices.get(node.id)
    if binding is not None:
        return Val(binding.values(), (binding.axis,), (), "int", binding.set)
    if node.id == "policy":
        if scope.policy_ref is None:
            raise EvalError("E501", "`policy` is only defined in the upper objective", node.span,
                            "it is the follower's answer to the `lower` block: use it in the "
                            "`upper` objective (rewards, params and checks are fixed before "
                            "the follower answers)")
        if scope.policy is None:  # checking without a lower level
            raise EvalError("E501", "`policy` is used but no `lower` block defines a follower",
                            node.span, "add `lower M { temperature = ...  reward[s, a] = ... }`")
        return Val(scope.policy, (), (scope.policy_ref.mdp.states, scope.policy_ref.mdp.actions))
    if node.id in scope.names:
        obj = scope.names[node.id]
        if obj is POISONED:
            raise Cascade()
        if isinstance(obj, VarRef):
            if scope.x is None:
                raise EvalError("E305", f"the variable `{node.id}` has no value here", node.span,
                                "a constant is needed here; the variable can appear in the "
                                "reward, the objective and `let` definitions")
            return Val(scope.x, (), obj.dims)
        if isinstance(obj, LetDef):
            return _let(node, obj, scope)
        if isinstance(obj, float):
            return scalar(obj, scope.device)
        if isinstance(obj, Val) and obj.t.device != scope.device:
            return Val(obj.t.to(scope.device), obj.axes, obj.dims, obj.kind)
        return obj
    if node.id in CONSTANTS:
        return scalar(CONSTANTS[node.id], scope.device)
    member = _member(node.id, scope)
    if member is not None:
        return member
    owners = _member_sets(node.id, scope)
    if owners:  # a member of several sets, at different positions
        where = " and ".join(f"`{label}`" for label, _, _ in owners)
        raise EvalError("E201", f"the member `{node.id}` is ambiguous: it is in {where}, at "
                        "different positions", node.span,
                        f"name its set, e.g. `{owners[0][0]}.{node.id}`")
    if node.id in FUNCTIONS:
        raise EvalError("E305", f"`{node.id}` is a function: call it as `{node.id}(...)`",
                        node.span)
    hint = None
    if scope.hints:  # (each hint reads every name: thousands of errors took minutes)
        known = list(scope.names) + list(scope.indices) + list(CONSTANTS) + _member_names(scope)
        hint = did_you_mean(node.id, known)
    if node.id.lower() == "nan":  # -D x=nan, say: a value the language has no name for
        hint = "brl has no NaN value: write a number (`inf` is infinity)"
    raise EvalError("E201", f"undefined name `{node.id}`", node.span, hint)


def _member_names(scope: Scope) -> list[str]:
    """Every named set member in scope, for a "did you mean" on a misspelt bare member."""
    return [member for _, s in _named_sets(scope) for member in s.members or ()]


def _named_sets(scope: Scope) -> Iterator[tuple[str, SetValue]]:
    """Each set in scope, as written in a file (`Colors`, `M.S`), with its value."""
    if isinstance(scope.names, Names):
        for labelled in scope.names.sets.values():
            yield from labelled
        return
    for key, obj in scope.names.items():
        yield from labelled_sets(key, obj)


def _member(name: str, scope: Scope) -> Val | None:
    """A bare set member (`left`) means its position, when every set that has it agrees; it
    remembers those sets, so that indexing or comparing it with another set's is an error."""
    owners = _member_sets(name, scope)
    if len({pos for _, _, pos in owners}) == 1:
        return _member_value(owners[0][2], tuple(s for _, s, _ in owners), scope.device)
    return None


def _member_value(position: int, sets: tuple[SetValue, ...], device: torch.device) -> Val:
    return replace(scalar(float(position), device, "int"), member_of=sets)


def _member_sets(name: str, scope: Scope) -> list[tuple[str, SetValue, int]]:
    """(the set, as written in a file; the set; the member's position) for each set that has
    `name`."""
    found: list[tuple[str, SetValue, int]] = []
    for label, s in _named_sets(scope):
        pos = s.member_position(name)
        if pos is not None:
            found.append((label, s, pos))
    return found


def _let(node: ir.Name, let: LetDef, scope: Scope) -> Val:
    cached = scope.let_cache.get(node.id)
    if cached is not None:
        return cached
    if node.id in scope.lets:
        through = scope.lets[scope.lets.index(node.id) + 1:]
        via = f" (through {', '.join(f'`{n}`' for n in through)})" if through else ""
        raise EvalError("E203", f"`{node.id}` is defined in terms of itself{via}", node.span,
                        "a definition can only use names declared before it")
    if not scope.lets:
        # a chain of lets, each using the one before, would recurse once per link (and 300
        # links exceed Python's stack): the lets this one uses go first, oldest first, so
        # each finds those it uses evaluated
        for name in _lets_used(node.id, scope):
            _let(ir.Name(node.span, name), scope.names[name], scope)
    inner = scope.copy()  # sharing the cache: a let's value depends on x and pi, not on where
    inner.indices = {}
    inner.lets = (*scope.lets, node.id)
    names: list[str] = []
    for i, (index, set_value, size) in enumerate(let.dims):
        axis = index or f"#{node.id}{i}"
        names.append(axis)
        inner.indices[axis] = Binding(axis, set_value or SetValue(f"{size}", size), scope.device)
    v = evaluate_val(let.decl.value, inner)
    if let.dims:
        v = fit_declared(v, tuple(names), let.dims, node.id, let.decl.value, "let")
    scope.let_cache[node.id] = v
    return v


def _lets_used(name: str, scope: Scope) -> list[str]:
    """The lets declared before let ``name`` that it uses, directly or through others, and that
    are not evaluated yet, each after the lets it uses itself. (A use of a later let, which
    only a cycle through the policy's lets can make, is left to the evaluation, which reports
    the cycle.)"""
    order: list[str] = []
    seen, stack = {name}, [(name, False)]
    while stack:
        current, expanded = stack.pop()
        if expanded:
            order.append(current)
            continue
        stack.append((current, True))
        here = scope.names[current].decl.span
        for used in scope.names[current].uses:
            let = scope.names.get(used)
            if (used not in seen and used not in scope.let_cache and isinstance(let, LetDef)
                    and (let.decl.span.line, let.decl.span.column) < (here.line, here.column)):
                seen.add(used)
                stack.append((used, False))
    return order[:-1]  # the last is `name` itself


def fit_declared(v: Val, axes: tuple[str, ...], dims: tuple[tuple[str | None, SetValue | None,
                 int], ...], name: str, value_node: ir.Expr, what: str) -> Val:
    """A declaration's value in its declared shape, as `param`, `var` and `let` share it: with
    bound indices (`[s in S]`) a number per element over `axes`; else an array of the declared
    shape, or a number broadcast to it."""
    shape = tuple(size for _, _, size in dims)
    declared_dims = tuple(s for _, s, _ in dims)
    if any(index is not None for index, _, _ in dims):
        stray = [a for a in v.axes if a not in axes]
        if stray:
            raise EvalError("E302", f"index `{stray[0]}` is not bound here", value_node.span)
        if v.dims:
            raise EvalError("E301", f"each element of `{name}` must be a number, but the "
                            f"value has {v.describe_shape()}", value_node.span)
        t = expand_axes(v, axes, dict(zip(axes, shape)))
        return Val(t, (), declared_dims, v.kind)
    if v.axes:
        raise EvalError("E302", f"index `{v.axes[0]}` is not bound here", value_node.span,
                        f"bind it in the declaration: `{what} c[s in S] = ...`")
    if not dims:
        return v
    if v.shape == ():
        return Val(v.t.expand(shape), (), declared_dims, v.kind)
    loaded = isinstance(value_node, ir.Call) and value_node.function == "load"
    if loaded and len(v.shape) == 1 and len(shape) == 2 and 1 in shape and \
            math.prod(shape) == v.shape[0]:
        # a loaded vector (a .csv file of one line or one column reads as one) fills a
        # declared [1, n] or [n, 1]
        return Val(v.t.reshape(shape), (), declared_dims, v.kind)
    if v.shape != shape:
        code = "E602" if loaded else "E301"
        declared = ", ".join(s.name if s is not None else str(n) for _, s, n in dims)
        sizes = ", ".join(str(n) for n in shape)
        size_note = "" if sizes == declared else f" (shape [{sizes}])"
        raise EvalError(code, f"{what} `{name}` is declared [{declared}]{size_note} but its "
                        f"value has shape [{', '.join(str(n) for n in v.shape)}]",
                        value_node.span)
    for k, (d, declared_set) in enumerate(zip(v.dims, declared_dims)):
        if d is not None and declared_set is not None and d is not declared_set:
            raise EvalError("E303", f"dimension {k + 1} of `{name}` is declared over "
                            f"{declared_set.describe()} but the value is over {d.describe()}",
                            value_node.span)
    dims_out = tuple(ds if ds is not None else d for d, ds in zip(v.dims, declared_dims))
    return Val(v.t, (), dims_out, v.kind)


def _attribute(node: ir.Attribute, scope: Scope) -> object:
    base = evaluate(node.base, scope)
    if isinstance(base, MdpValue):
        return mdp_attribute(base, node.attr, node, scope.device)
    if isinstance(base, TableSets):
        if node.attr in ("S", "A"):
            return base.states if node.attr == "S" else base.actions
        raise EvalError("E203", f"`{base.name}.{node.attr}` is not defined yet: this is "
                        f"`{base.name}`'s own definition", node.span,
                        f"only `{base.name}.S`, `{base.name}.A` and their members can be used "
                        "inside it")
    if isinstance(base, SetValue):
        pos = base.member_position(node.attr)
        if pos is None:
            raise EvalError("E201", f"the set `{base.name}` has no member `{node.attr}`",
                            node.span, did_you_mean(node.attr, base.members or ()))
        return _member_value(pos, (base,), scope.device)
    raise EvalError("E305", f"{_what(base)} has no attributes", node.span)


MDP_ATTRIBUTES = ("S", "A", "P", "R", "initial", "discount", "terminal")


def mdp_attribute(mdp: MdpValue, attr: str, node: ir.Expr, device: torch.device) -> object:
    if attr == "S":
        return mdp.states
    if attr == "A":
        return mdp.actions
    if attr == "P":
        return Val(mdp.dense_transitions(node.span).to(device), (), (mdp.states, mdp.actions,
                                                                    mdp.states))
    if attr == "R":
        return Val(mdp.reward.to(device), (), (mdp.states, mdp.actions))
    if attr == "initial":
        return Val(mdp.initial.to(device), (), (mdp.states,))
    if attr == "discount":
        return scalar(mdp.discount, device)
    if attr == "terminal":
        return Val(mdp.terminal.to(device=device, dtype=DTYPE), (), (mdp.states,))
    if attr in mdp.extras:
        v = mdp.extras[attr]
        return Val(v.t.to(device), v.axes, v.dims, v.kind)
    known = list(MDP_ATTRIBUTES) + list(mdp.extras)
    raise EvalError("E201", f"the MDP `{mdp.name}` has no part `{attr}`", node.span,
                    did_you_mean(attr, known) or "its parts are " + ", ".join(known))


def _index(node: ir.Index, scope: Scope) -> Val:
    along = _let_along_transitions(node, scope)
    if along is not None:
        return along
    base = evaluate(node.base, scope)
    if isinstance(base, PolicyRef):  # pragma: no cover - policy evaluates to a Val
        base = _name(ir.Name(node.span, "policy"), scope)
    base = need_val(base, node.base)
    if len(node.indices) > len(base.dims):
        hint = f"it is {base.describe_shape()}"
        name = node.base.id if isinstance(node.base, ir.Name) else None
        if name in scope.indices and name in scope.names:  # an index hides a declaration
            hint = (f"`{name}` here is an index, which hides the declared `{name}`: rename one "
                    "of them")
        raise EvalError(
            "E302",
            f"too many indices: {_describe(node.base)} has {len(base.dims)} "
            f"dimension{'s' if len(base.dims) != 1 else ''} but {len(node.indices)} "
            f"indices are given",
            node.span,
            hint,
        )
    result, first = _along_transitions(base, node.indices, scope)
    for k in range(first, len(node.indices)):
        result = _index_one(result, node.indices[k], scope, k, node)
    return result


def _let_along_transitions(node: ir.Index, scope: Scope) -> Val | None:
    """``w[s, a, t]`` for ``let w[s in M.S, a in M.A, t in M.S] = ...`` where the indices walk
    sparse P's stored triples together: the let's body with its indices bound to those triples,
    one value per transition, rather than the whole ``S x A x S`` table and then a selection
    from it (quadratic in the states: 12 s and 1.7 GiB at 4,000 states, against 0.4 s inline).
    None where that does not apply (the let is then evaluated whole, as everywhere else,
    which also reports a body of the wrong shape)."""
    name = node.base.id if isinstance(node.base, ir.Name) else None
    let = scope.names.get(name) if name not in scope.indices else None
    if (not isinstance(let, LetDef) or len(node.indices) != len(let.dims) or not let.dims
            or name in scope.lets or any(index is None for index, _, _ in let.dims)):
        return None
    bindings = [scope.indices.get(i.id) if isinstance(i, ir.Name) else None
                for i in node.indices]
    if any(b is None or b.at is None or b.axis != bindings[0].axis or b.set is not dim_set
           for b, (_, dim_set, _) in zip(bindings, let.dims)):
        return None
    inner = scope.copy()
    inner.indices = {index: b for (index, _, _), b in zip(let.dims, bindings)}
    inner.lets = (*scope.lets, name)
    # the body's nodes mean other numbers here than where the let is evaluated whole, and than
    # in the other orders it may be read in (`phi[t] - phi[s]`): the cache of constant nodes,
    # which knows a node by itself only, must neither give nor keep them
    inner.constants = None
    v = evaluate_val(let.decl.value, inner)
    if v.dims or any(axis != bindings[0].axis for axis in v.axes):
        return None
    return v


def _along_transitions(base: Val, indices: list[ir.Expr], scope: Scope) -> tuple[Val, int]:
    """``D[s, t]``, ``x[t]`` where the indices walk sparse P's stored triples together
    (``Binding.at``): one selection of the flat positions, not first a row of ``D`` for every
    triple (nnz x S numbers, and as many in the gradient). Only leading indices that are bare
    names over the very sets of ``base``'s dimensions (which ``_index_one`` checks would pass)
    are taken here; ``(base, 0)`` otherwise."""
    bindings: list[Binding] = []
    for j, index_node in enumerate(indices[: len(base.dims)]):
        binding = scope.indices.get(index_node.id) if isinstance(index_node, ir.Name) else None
        if (binding is None or binding.at is None or base.dims[j] is not binding.set
                or base.shape[j] != binding.set.size
                or (bindings and binding.axis != bindings[0].axis)):
            break
        bindings.append(binding)
    if not bindings or bindings[0].axis in base.axes:
        return base, 0
    flat = bindings[0].at
    for binding, size in zip(bindings[1:], base.shape[1 : len(bindings)]):
        flat = flat * size + binding.at
    lead = len(base.axes)
    t = base.t.flatten(lead, lead + len(bindings) - 1) if len(bindings) > 1 else base.t
    return (Val(t.index_select(lead, flat), base.axes + (bindings[0].axis,),
                base.dims[len(bindings):], base.kind), len(bindings))


def _describe(node: ir.Expr) -> str:
    if isinstance(node, ir.Name):
        return f"`{node.id}`"
    if isinstance(node, ir.Attribute):
        return f"`{_source_name(node)}`"
    return "this value"


def _source_name(node: ir.Expr) -> str:
    if isinstance(node, ir.Name):
        return node.id
    if isinstance(node, ir.Attribute):
        return f"{_source_name(node.base)}.{node.attr}"
    return "..."


def _index_one(base: Val, index_node: ir.Expr, scope: Scope, k: int, whole: ir.Index) -> Val:
    """Index the first remaining trailing dimension of `base` (position k in the source)."""
    dim_set = base.dims[0]
    size = base.shape[0]
    idx = evaluate_val(index_node, scope)
    if idx.dims:
        raise EvalError("E301", f"an index must be a single number, not {idx.describe_shape()}",
                        index_node.span)
    # A bare index is matched to the dimension's set by position.  A dimension declared by a
    # size is numbered from 0, so an index over an integer range other than 0..n-1 (`i in 1..3`,
    # `k in 0..1` into a dimension of 4) indexes it by value, like any integer expression: v[i]
    # and v[1] agree when i = 1, and values outside the dimension are E304. An index over a set
    # of named members or an MDP's states or actions must match the dimension's size (E303).
    iset = idx.index_set
    if idx.member_of and dim_set is not None and all(s is not dim_set for s in idx.member_of):
        raise EvalError(
            "E303",
            f"`{_source_name(index_node)}` is a member of {idx.member_of[0].describe()} but "
            f"dimension {k + 1} of {_describe(whole.base)} is indexed by {dim_set.describe()}",
            index_node.span,
            _member_hint(dim_set),
        )
    by_value = (iset is not None and dim_set is None and iset.is_range
                and not (iset.start == 0 and iset.size == size))
    if iset is not None and not by_value:
        if dim_set is not None and iset is not dim_set:
            raise EvalError(
                "E303",
                f"index `{_source_name(index_node)}` ranges over {iset.describe()} but dimension "
                f"{k + 1} of {_describe(whole.base)} is indexed by {dim_set.describe()}",
                index_node.span,
                f"use an index that ranges over `{dim_set.name}`",
            )
        if dim_set is None and iset.size != size:
            raise EvalError(
                "E303",
                f"index `{_source_name(index_node)}` ranges over {iset.describe()} but dimension "
                f"{k + 1} of {_describe(whole.base)} has {size} elements",
                index_node.span,
            )
        binding = scope.indices[_source_name(index_node)]
        positions = binding.positions
        axis = binding.axis
        if axis not in base.axes and binding.at is None and positions.numel() == size:
            # Fast path: the first trailing dimension simply becomes a named axis (no copy).
            return Val(base.t, base.axes + (axis,), base.dims[1:], base.kind)
        pos_val = Val(positions, (axis,), (), "int")
    else:
        if idx.kind == "real" and not _integral(idx.t):
            raise _not_an_index(idx, index_node, scope)
        start = dim_set.start if dim_set is not None else 0
        real = to_real(idx).detach()
        if real.numel() and (float(real.min()) < start or float(real.max()) >= start + size):
            # (checked before the conversion to int64, which would wrap 1e20 round to < 0)
            bad = float(real.min()) if float(real.min()) < start else float(real.max())
            lo, hi = start, start + size - 1
            raise EvalError(
                "E304",
                f"index {bad:.17g} is out of range for dimension {k + 1} of "
                f"{_describe(whole.base)}, which runs from {lo} to {hi}",
                index_node.span,
            )
        pos_t = torch.round(real).to(torch.int64) - start
        pos_val = Val(pos_t, idx.axes, (), "int")
    return _gather(base, pos_val)


def _not_an_index(idx: Val, node: ir.Expr, scope: Scope) -> EvalError:
    t = idx.t.detach().reshape(-1)
    value = float(t[t != torch.round(t)][0])
    variables = sorted(name for name in ir.names_in(node)
                       if isinstance(scope.names.get(name), VarRef))
    hint = None
    if variables:
        hint = (f"it follows the variable `{variables[0]}`, whose values change during a solve "
                "and need not be whole numbers: index with a param or a set's elements, and "
                "let the variable weigh the entries instead (`sum {i in I} w[i] * ...`)")
    return EvalError("E305", f"an index must be an integer, not {value:.6g}", node.span, hint)


def _integral(t: torch.Tensor) -> bool:
    return bool(torch.all(t == torch.round(t)))


def _gather(base: Val, pos: Val) -> Val:
    """base[..., pos, ...] on the first trailing dim, broadcasting named axes."""
    if len(pos.axes) == 1 and pos.axes[0] not in base.axes and pos.t.dim() == 1:
        # a new axis: a selection, whose gradient is base's size (a gather over base expanded
        # along the axis made one of base's size for every position)
        return Val(base.t.index_select(len(base.axes), pos.t), base.axes + pos.axes,
                   base.dims[1:], base.kind)
    axes = list(base.axes)
    for a in pos.axes:
        if a not in axes:
            axes.append(a)
    sizes: dict[str, int] = {}
    for v in (base, pos):
        for i, a in enumerate(v.axes):
            sizes[a] = max(sizes.get(a, 1), v.t.shape[i])
    # one selection of rows of base flattened over its axes and the indexed dimension: a
    # gather from base expanded along pos's own axes had a gradient of that expanded size
    # (x[s1[i, h], a1[i, h]] for 3,000 x 20 pairs: 54 million numbers for a 225 x 4 table)
    flat = expand_axes(Val(pos.t, pos.axes), tuple(axes), sizes)
    stride = base.shape[0]
    for k in reversed(range(len(base.axes))):  # base's axes lead `axes`, in base's order
        n = base.t.shape[k]
        if n != 1:  # (an axis base is broadcast along reads its one row)
            flat = flat + torch.arange(n, device=flat.device).reshape(
                [n if j == k else 1 for j in range(len(axes))]) * stride
        stride *= n
    rest = base.shape[1:]
    out = base.t.reshape(-1, *rest).index_select(0, flat.reshape(-1))
    return Val(out.reshape((*flat.shape, *rest)), tuple(axes), base.dims[1:], base.kind)


def _unary(node: ir.Unary, scope: Scope) -> Val:
    v = evaluate_val(node.operand, scope)
    if node.op == "-":
        return Val(-to_real(v) if v.kind == "bool" else -v.t, v.axes, v.dims,
                   "real" if v.kind == "bool" else v.kind)
    if node.op == "+":
        return Val(v.t, v.axes, v.dims, v.kind)
    return Val((v.t == 0).to(DTYPE), v.axes, v.dims, "bool")


_ARITH = {"+": torch.add, "-": torch.sub, "*": torch.mul, "/": torch.div, "^": torch.pow}
_COMPARE = {
    "==": torch.eq, "!=": torch.ne, "<": torch.lt, "<=": torch.le, ">": torch.gt, ">=": torch.ge,
}


def _binary(node: ir.Binary, scope: Scope) -> Val:
    # A chain `a1 + a2 + ... + an` leans left as deep as it is long: walk its left spine in a
    # loop, not by recursion, computing (and caching) each link as evaluate() would.
    cache = scope.constants
    spine = [node]
    left_node = node.left
    while type(left_node) is ir.Binary and (
        cache is None or id(left_node) in cache.varying or id(left_node) not in cache.values
    ):
        spine.append(left_node)
        left_node = left_node.left
    left = evaluate_val(left_node, scope)
    for link in reversed(spine):
        left = _binary_values(link, left, evaluate_val(link.right, scope))
        if scope.watch is not None and link is not node:
            scope.watch(link, left)
        if link is not node and cache is not None and id(link) not in cache.varying:
            cache.values[id(link)] = left
    return left


def _member_hint(s: SetValue) -> str:
    if s.members:
        shown = ", ".join(s.members[:4]) + (", ..." if len(s.members) > 4 else "")
        return f"use a member of `{s.name}` ({shown})"
    return f"use an index that ranges over `{s.name}`"


def _same_sets(node: ir.Binary, left: Val, right: Val) -> None:
    """A comparison of an index or member of one set with a member of another compares
    positions, which means nothing: `a == Dir.east` with `a` over `Act`."""
    for one, other in ((left, right), (right, left)):
        if not one.member_of:
            continue
        sets = (other.index_set,) if other.index_set is not None else other.member_of
        if sets and not any(s is t for s in sets for t in one.member_of):
            raise EvalError("E303", f"this compares {_set_side(other)} with a member of "
                            f"{one.member_of[0].describe()}: their positions mean different "
                            "things", node.span, _member_hint(sets[0]))


def _set_side(v: Val) -> str:
    if v.index_set is not None:
        return f"an index over {v.index_set.describe()}"
    return f"a member of {v.member_of[0].describe()}"


def _binary_values(node: ir.Binary, left: Val, right: Val) -> Val:
    if node.op in _COMPARE and (left.member_of or right.member_of):
        _same_sets(node, left, right)
    axes, (a, b), dims = align([left, right], node.span)
    if a.dtype != DTYPE:
        a = a.to(DTYPE)
    if b.dtype != DTYPE:
        b = b.to(DTYPE)
    if node.op in _ARITH:
        kind = "int" if left.kind == right.kind == "int" and node.op in "+-*" else "real"
        if node.op == "^" and left.kind == "int" and right.kind == "int":
            kind = "int"
        if node.op == "^" and b.dim() == 0 and not b.requires_grad:
            # a constant exponent: pow with a Python number is several times faster on big tables
            return Val(torch.pow(a, float(b)), axes, dims, kind)
        return Val(_ARITH[node.op](a, b), axes, dims, kind)
    if node.op in _COMPARE:
        return Val(_COMPARE[node.op](a, b).to(DTYPE), axes, dims, "bool")
    if node.op == "and":
        return Val(((a != 0) & (b != 0)).to(DTYPE), axes, dims, "bool")
    return Val(((a != 0) | (b != 0)).to(DTYPE), axes, dims, "bool")


def _conditional(node: ir.Conditional, scope: Scope) -> Val:
    c = evaluate_val(node.condition, scope)
    a = evaluate_val(node.then, scope)
    b = evaluate_val(node.otherwise, scope)
    axes, (tc, ta, tb), dims = align([c, a, b], node.span)
    kind = a.kind if a.kind == b.kind else "real"
    return Val(torch.where(tc != 0, as_real(ta), as_real(tb)), axes, dims, kind)


def _array(node: ir.ArrayLiteral, scope: Scope) -> Val:
    items = [evaluate_val(item, scope) for item in node.items]
    shapes = {v.shape for v in items}
    if len(shapes) > 1:
        raise EvalError("E301", "the items of an array literal must all have the same shape",
                        node.span, "found " + _shapes(items))
    axes, tensors, dims = align(items, node.span)
    n_axes = len(axes)
    sizes = [1] * max(t.dim() for t in tensors)  # torch.broadcast_shapes would import sympy
    for t in tensors:
        for i, n in enumerate(t.shape, len(sizes) - t.dim()):
            sizes[i] = n if n != 1 else sizes[i]
    stacked = torch.stack([t.to(DTYPE).expand(sizes) for t in tensors], dim=n_axes)
    kind = "int" if all(v.kind == "int" for v in items) else "real"
    return Val(stacked, axes, (None,) + dims, kind)


def _number_array(node: ir.NumberArray, scope: Scope) -> Val:
    t = torch.tensor(node.values, dtype=DTYPE, device=scope.device).reshape(node.shape)
    return Val(t, (), (None,) * len(node.shape), "int" if node.is_integer else "real")


def set_of(node: ir.Expr, scope: Scope) -> SetValue:
    obj = evaluate(node, scope)
    if isinstance(obj, SetValue):
        return obj
    raise EvalError("E305", f"expected a set here, but {_what(obj)} is not a set", node.span,
                    "write a set name such as `S` or `maze.S`, a range `0..9`, or `{a, b}`")


def _range(node: ir.Range, scope: Scope) -> SetValue:
    left = scope.names.get(node.start.id) if type(node.start) is ir.Name and \
        node.start.id not in scope.indices else None
    if isinstance(left, (MdpValue, SetValue)) and type(node.stop) is ir.Name:
        part = node.stop.id
        meant = part in (MDP_ATTRIBUTES + tuple(left.extras) if isinstance(left, MdpValue)
                         else left.members or ())
        raise EvalError("E305", f"`{node.start.id}..{part}` is a range of numbers, and "
                        f"`{node.start.id}` is no number", node.span,
                        f"a part or a member is written with one dot: `{node.start.id}.{part}`"
                        if meant else None)
    start = _integer(node.start, scope)
    stop = _integer(node.stop, scope)
    if stop < start - 1:
        raise EvalError("E301", f"the range {start}..{stop} runs backwards", node.span)
    if stop - start + 1 > 50_000_000:
        raise EvalError("E301", f"the range {start}..{stop} is too large", node.span)
    return SetValue(f"{start}..{stop}", stop - start + 1, None, start, is_range=True)


def integer_value(node: ir.Expr, scope: Scope) -> int:
    return _integer(node, scope)


def _integer(node: ir.Expr, scope: Scope) -> int:
    v = evaluate_val(node, scope)
    if v.axes or v.dims:
        raise EvalError("E301", f"expected one integer, not {v.describe_shape()}", node.span)
    value = float(v.t)
    if not math.isfinite(value) or value != round(value):
        raise EvalError("E305", f"expected an integer, got {value:g}", node.span)
    if abs(value) > 2**53:
        raise EvalError("E901", "this integer is too large", node.span)
    return int(value)


def _members(node: ir.Members, scope: Scope) -> SetValue:
    names = [m.name for m in node.members]
    seen: set[str] = set()
    for m in node.members:
        if m.name[0].isdigit():  # it would mean its position, not its value
            raise EvalError("E305", f"`{m.name}` is a number, but the members of a set are "
                            "names", m.span, "write a range such as `1..5` for consecutive "
                            f"numbers, or names such as `n{m.name}`")
        if m.name in seen:
            raise EvalError("E202", f"member `{m.name}` is listed twice", m.span)
        seen.add(m.name)
    return SetValue("{" + ", ".join(names) + "}", len(names), tuple(names), 0)


def _reduction(node: ir.Reduction, scope: Scope) -> Val:
    inner = scope
    names: list[str] = []
    for binder in node.binders:
        domain = set_of(binder.domain, inner)
        if binder.name in inner.indices or binder.name in names:
            raise EvalError("E202", f"index `{binder.name}` is already bound here", binder.span,
                            "use a different index name")
        inner = inner.bind(
            binder.name,
            Binding(binder.name, domain, scope.device),
        )
        names.append(binder.name)
    body = None
    if node.op == "sum" and node.where is None and scope.watch is None:
        body, summed = _sum_of_product(node.body, names, inner)
        if summed:
            return body
    if body is None:
        body = evaluate_val(node.body, inner)
    cond = None if node.where is None else evaluate_val(node.where, inner)
    if cond is not None and cond.dims:
        raise EvalError("E301", "a filter must be one true/false value per element",
                        node.where.span)
    sizes = {n: inner.indices[n].set.size for n in names}
    empty = [n for n in names if sizes[n] == 0]
    if empty and node.op in ("max", "min", "mean"):
        domain = inner.indices[empty[0]].set.describe()
        raise EvalError("E301", f"`{node.op}` over an empty set has no value", node.span,
                        f"`{empty[0]}` ranges over {domain}")
    present = body.axes if cond is None else \
        body.axes + tuple(a for a in cond.axes if a not in body.axes)
    for v in (body, cond):
        for i, a in enumerate(v.axes if v is not None else ()):
            sizes.setdefault(a, v.t.shape[i])
    # the indices of outer reductions that the body or the filter uses (`b < a`) stay
    keep = tuple(a for a in present if a not in names)
    axes = keep + tuple(names)
    terms = math.prod(sizes[a] for a in axes) * math.prod(body.shape)
    if terms > MAX_TERMS:  # a broadcast view costs nothing; summing it could take hours
        raise EvalError("E301", f"this reduction has {terms:,} terms, more than "
                        f"{MAX_TERMS:,}", node.span, "reduce over smaller sets")
    t = as_real(expand_axes(body, axes, sizes))
    mask = None
    if cond is not None:
        mask = expand_axes(cond, axes, sizes) != 0
        mask = mask.reshape((*mask.shape, *([1] * len(body.shape))))
    red = tuple(range(len(keep), len(axes)))
    op = node.op
    if mask is not None:
        # (with outer indices an empty group may be one that an outer filter or `if` drops,
        # so only a single reduction is judged here; empty groups give -inf, inf or NaN)
        if op in ("max", "min", "mean") and not keep and not bool(mask.any()):
            raise EvalError("E301", f"`{op}` over an empty set has no value: the filter leaves "
                            "no element", node.span)
        fill = {"sum": 0.0, "mean": 0.0, "prod": 1.0, "max": -math.inf, "min": math.inf,
                "logsumexp": -math.inf}[op]
        t = torch.where(mask, t, torch.tensor(fill, dtype=DTYPE, device=t.device))
    if op == "sum":
        out = t.sum(dim=red)
    elif op == "mean":
        count = mask.sum(dim=red).to(DTYPE) if mask is not None else float(np.prod(
            [sizes[n] for n in names]))
        out = t.sum(dim=red) / count
    elif op == "prod":
        out = t.flatten(len(keep), len(axes) - 1).prod(dim=len(keep))
    elif op == "max":
        out = t.flatten(len(keep), len(axes) - 1).amax(dim=len(keep))
    elif op == "min":
        out = t.flatten(len(keep), len(axes) - 1).amin(dim=len(keep))
    else:
        out = torch.logsumexp(t.flatten(len(keep), len(axes) - 1), dim=len(keep))
    kind = body.kind if op in ("sum", "max", "min", "prod") and body.kind != "bool" else "real"
    return Val(out, keep, body.dims, kind)


def _sum_of_product(body: ir.Expr, names: list[str], scope: Scope) -> tuple[Val | None, bool]:
    """`sum {names} f1 * ... * fn` without the product over every index: ``(the sum, True)``
    by ``P.expect`` (a factor `M.P[s, a, t]`) or one einsum; else ``(the product, False)``
    built link by link from the factors already evaluated, or ``(None, False)`` where the body
    is left to be evaluated whole (no product, or one that neither x nor pi moves). Factors
    that are not finite keep the term-by-term sum rather than an einsum, which sums an index
    out of one factor before multiplying by the others (`0 * inf` would not be NaN)."""
    if not (type(body) is ir.Binary and body.op == "*"):
        return None, False
    cache = scope.constants
    every = _product_factors(body, None)
    found = _transition_factor(every, names, scope)
    # with M.P among the factors, each factor alone (a constant group `M.P[s, a, t] * c[t]`
    # would hide it), so that check and solve take the same path
    grouping = None if found else cache
    if not found and not _is_product(body, cache):
        return None, False
    nodes = every if found else _product_factors(body, cache)
    factors = [None if found and k == found[0] else evaluate_val(f, scope)
               for k, f in enumerate(nodes)]
    if found:  # an expectation over t ~ P: with P sparse, a t that P never reaches counts 0
        summed = _expect_over_next(found[1], nodes[found[0]], factors, scope)
        if summed is not None:
            return summed, True
        factors[found[0]] = evaluate_val(nodes[found[0]], scope)
    summed = _contract(factors, names, scope) if _all_finite(factors, nodes, cache) else None
    if summed is not None:
        return summed, True
    return _multiply(body, iter(factors), grouping), False


def _all_finite(factors: list[Val | None], nodes: list[ir.Expr], cache: ConstantCache | None
                ) -> bool:
    """Whether every factor is finite; a constant factor's answer is kept."""
    checks = []
    for f, n in zip(factors, nodes):
        if f is None or not f.t.is_floating_point():
            continue
        if cache is not None and id(n) not in cache.varying:
            known = cache.finite.get(id(n))
            if known is None:
                known = cache.finite[id(n)] = bool(torch.isfinite(f.t).all())
            if not known:
                return False
        else:
            checks.append(torch.isfinite(f.t).all())
    return not checks or bool(torch.stack(checks).all())


def _is_product(node: ir.Expr, cache: ConstantCache | None) -> bool:
    """Whether `node` is a product that ``_contract`` may sum without building it: one that
    can change with x or pi (a constant one is computed once and kept, so it is left whole)."""
    return (type(node) is ir.Binary and node.op == "*"
            and (cache is None or id(node) in cache.varying))


def _product_factors(node: ir.Expr, cache: ConstantCache | None) -> list[ir.Expr]:
    """The factors of a product, left to right (the order in which `_binary` evaluates them);
    a constant sub-product is one factor, so that it stays cached."""
    factors, pending = [], [node]
    while pending:
        top = pending.pop()
        if _is_product(top, cache):
            pending += (top.right, top.left)
        else:
            factors.append(top)
    return factors


def _multiply(node: ir.Expr, factors: Iterator[Val], cache: ConstantCache | None) -> Val:
    """The product of already evaluated factors, link by link as `_binary` would build it
    (same spans in its errors); a chain's left spine in a loop, as there (thousands long)."""
    spine = []
    while _is_product(node, cache):
        spine.append(node)
        node = node.left
    value = next(factors)
    for link in reversed(spine):
        value = _binary_values(link, value, _multiply(link.right, factors, cache))
    return value


_AXIS_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _contract(factors: list[Val], names: list[str], scope: Scope) -> Val | None:
    """`sum {names} f1 * ... * fn` as one einsum: the product over every index at once is
    never built (``sum {t} P[s, a, t] * c[t]`` is a matrix-vector product, not an
    (S, A, S) table then a sum). None where this does not apply: arrays with dimensions of
    their own, an index that no factor uses, a product too large to be allowed."""
    if any(f.dims for f in factors):
        return None
    sizes: dict[str, int] = {}
    for f in factors:
        for a, n in zip(f.axes, f.t.shape):
            sizes[a] = max(sizes.get(a, 1), n)
    if len(sizes) > len(_AXIS_LETTERS) or math.prod(sizes.values()) > MAX_TERMS or any(
            sizes.get(n) != scope.indices[n].set.size for n in names):
        return None  # the product's own path says what is wrong, or counts a missing index
    letter = dict(zip(sizes, _AXIS_LETTERS))
    keep = tuple(a for a in sizes if a not in names)
    spec = ",".join("".join(letter[a] for a in f.axes) for f in factors)
    out = torch.einsum(f"{spec}->{''.join(letter[a] for a in keep)}",
                       *(as_real(f.t) for f in factors))
    kind = "int" if all(f.kind == "int" for f in factors) else "real"
    return Val(out, keep, (), kind)


def _transition_factor(factors: list[ir.Expr], names: list[str], scope: Scope
                       ) -> tuple[int, MdpValue] | None:
    """Where `sum {t in M.S} ... * M.P[s, a, t] * ...` has its factor `M.P[s, a, t]` (with
    `s`, `a` bound outside the sum to M's states and actions, whole): its position and `M`."""
    if len(names) != 1:
        return None
    for k, f in enumerate(factors):
        if not (type(f) is ir.Index and type(f.base) is ir.Attribute and f.base.attr == "P"
                and type(f.base.base) is ir.Name and len(f.indices) == 3
                and all(type(i) is ir.Name for i in f.indices)):
            continue
        ids = [i.id for i in f.indices]
        mdp = scope.names.get(f.base.base.id) if f.base.base.id not in scope.indices else None
        bindings = [scope.indices.get(i) for i in ids]
        if (ids[2] == names[0] and ids[0] != ids[1] and names[0] not in ids[:2]
                and isinstance(mdp, MdpValue)
                and all(b is not None and b.at is None for b in bindings)
                and bindings[0].set is mdp.states and bindings[1].set is mdp.actions
                and bindings[2].set is mdp.states):
            return k, mdp
    return None


def _expect_over_next(mdp: MdpValue, p_node: ir.Index, factors: list[Val | None],
                      scope: Scope) -> Val | None:
    """`sum {t in M.S} M.P[s, a, t] * f(t) * g(s, a)` as ``P.expect(f) * g``: one product
    with P as it is stored (sparse on large MDPs), not the (S, A, S) table (which large MDPs
    cannot index entry by entry). None unless the factors in `t` leave `s` and `a` alone."""
    s, a, t = (scope.indices[i.id].axis for i in p_node.indices)
    others = [f for f in factors if f is not None]
    if any(f.dims for f in others):
        return None
    near = [f for f in others if t in f.axes]
    if any(s in f.axes or a in f.axes for f in near):
        return None
    S = mdp.states.size
    h = _contract(near, [], scope) if near else Val(torch.ones(S, dtype=DTYPE,
                                                               device=scope.device), (t,))
    if h is None or h.t.shape[h.axes.index(t)] != S:
        return None
    rest = tuple(x for x in h.axes if x != t)
    out = mdp.transitions.to(scope.device).expect(as_real(h.t.movedim(h.axes.index(t), 0)))
    summed = Val(out, (s, a, *rest))
    far = [f for f in others if t not in f.axes]
    return _contract([summed, *far], [], scope) if far else summed


# ------------------------------------------------------------------ calls


def _call(node: ir.Call, scope: Scope) -> object:
    f = node.function
    if f in ELEMENTWISE:
        (v,) = _args(node, scope, 1)
        return Val(ELEMENTWISE[f](to_real(v)), v.axes, v.dims)
    if f in REDUCERS:
        return _reduce_call(node, scope)
    if f in ("norm", "norm1", "norm2"):
        (v,) = _args(node, scope, 1)
        t = to_real(v)
        red = tuple(range(len(v.axes), t.dim()))
        if f == "norm":
            # sqrt with a safe gradient at zero (the norm of a zero vector has subgradient 0)
            sq = (t * t).sum(dim=red) if red else t * t
            out = torch.where(sq > 0, torch.sqrt(torch.clamp(sq, min=1e-300)), sq * 0)
        elif f == "norm1":
            out = t.abs().sum(dim=red) if red else t.abs()
        elif red and len(red) == t.dim():
            out = _SquaredNorm.apply(t)
        else:
            out = (t * t).sum(dim=red) if red else t * t
        return Val(out, v.axes, ())
    if f == "dot":
        u, v = _args(node, scope, 2)
        if u.shape != v.shape:
            raise EvalError("E301", "dot needs two arrays of the same shape, got "
                            + _shapes([u, v]),
                            node.span)
        axes, (a, b), _ = align([u, v], node.span)
        prod = as_real(a) * as_real(b)
        red = tuple(range(len(axes), prod.dim()))
        return Val(prod.sum(dim=red) if red else prod, axes, ())
    if f == "quad":
        x, m = _args(node, scope, 2)
        if len(x.dims) != 1 or len(m.dims) != 2 or m.shape != (x.shape[0], x.shape[0]):
            raise EvalError(
                "E301",
                f"quad(x, M) needs a vector x of size n and an n x n matrix M; got "
                f"{_shapes([x, m])}",
                node.span,
            )
        axes, (a, b), _ = align([Val(x.t, x.axes, (None,)), Val(m.t, m.axes, (None, None))],
                                node.span)
        a, b = as_real(a).squeeze(-2), as_real(b)
        if a.dim() == 1 and b.dim() == 2:  # no named axes: two products, not an einsum
            out = a @ (b @ a)
        else:
            out = torch.einsum("...i,...ij,...j->...", a, b, a)
        return Val(out, axes, ())
    if f == "card":
        if len(node.args) != 1 or node.keywords:
            raise EvalError("E305", "card takes one set: card(S)", node.span)
        s = set_of(node.args[0], scope)
        return scalar(float(s.size), scope.device, "int")
    if f in DRAWS:
        if scope.draw is None:
            raise EvalError("E305", f"`{f}(...)` draws random numbers, which only a `~` "
                            "declaration may do", node.span,
                            f"declare it as `param NAME[...] ~ {f}(...)`")
        return scope.draw(f, [evaluate_val(a, scope) for a in node.args], node)
    if f == "load":
        if len(node.args) != 1 or not isinstance(node.args[0], ir.String) or node.keywords:
            raise EvalError("E305", 'load takes one file name in quotes: load("costs.npy")',
                            node.span)
        if scope.load is None:
            raise EvalError("E305", "data can only be loaded in a declaration", node.span)
        return scope.load(node, node.args[0].value)
    if f in FUNCTIONALS:
        return _functional(node, scope)
    raise EvalError("E201", f"unknown function `{f}`", node.span,
                    did_you_mean(f, FUNCTIONS) or "see docs/language.md for the functions")


class _SquaredNorm(torch.autograd.Function):
    """``sum(t * t)`` over every entry as one dot product, with the gradient ``2 g t`` in one
    pass: autograd's ``(t * t).sum()`` costs five passes over ``t`` (a regulariser such as
    ``norm2(x)`` is as large as ``x``, which can have an entry per state and action)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(t)
        flat = t.reshape(-1)
        return torch.dot(flat, flat)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (t,) = ctx.saved_tensors
        return t * (2 * grad)  # differentiable: second derivatives still work


def _args(node: ir.Call, scope: Scope, n: int) -> list[Val]:
    if len(node.args) != n or node.keywords:
        plural = "s" if n != 1 else ""
        raise EvalError("E305", f"`{node.function}` takes {n} argument{plural}, "
                        f"got {len(node.args) + len(node.keywords)}", node.span)
    return [evaluate_val(a, scope) for a in node.args]


def _reduce_call(node: ir.Call, scope: Scope) -> Val:
    f = node.function
    if f in ("max", "min") and len(node.args) > 2:
        raise EvalError("E305", f"`{f}` takes 1 argument (an array) or 2 (element by element), "
                        f"got {len(node.args)}", node.span,
                        f"nest it for more: `{f}(a, {f}(b, c))`")
    if f in ("max", "min") and len(node.args) == 2:
        a, b = _args(node, scope, 2)
        axes, (ta, tb), dims = align([a, b], node.span)
        fn = torch.maximum if f == "max" else torch.minimum
        return Val(fn(as_real(ta), as_real(tb)), axes, dims)
    (v,) = _args(node, scope, 1)
    t = to_real(v)
    red = tuple(range(len(v.axes), t.dim()))
    if not red:
        return Val(t, v.axes, ())
    flat = t.flatten(len(v.axes))
    d = len(v.axes)
    if flat.shape[d] == 0 and f in ("max", "min", "mean"):
        raise EvalError("E301", f"`{f}` of an empty array has no value", node.span)
    out = {
        "sum": lambda: flat.sum(dim=d),
        "prod": lambda: flat.prod(dim=d),
        "max": lambda: flat.amax(dim=d),
        "min": lambda: flat.amin(dim=d),
        "mean": lambda: flat.mean(dim=d),
        "logsumexp": lambda: torch.logsumexp(flat, dim=d),
    }[f]()
    return Val(out, v.axes, ())


# ------------------------------------------------------------------ policy functionals


def _functional(node: ir.Call, scope: Scope) -> Val:
    f = node.function
    if scope.policy_ref is None:
        raise EvalError("E501", f"`{f}(...)` is a function of the follower's policy and can "
                        "only appear in the `upper` objective", node.span)
    kw = {k.name: k for k in node.keywords}
    allowed = {
        "value": ("reward",),
        "occupancy": (),
        "entropy": (),
        "expected_return": ("horizon", "reward"),
        "preference_loss": ("truth", "horizon", "pairs", "scale", "noise", "model"),
    }[f]
    for name, k in kw.items():
        if name not in allowed:
            raise EvalError("E305", f"`{f}` has no argument `{name}`", k.span,
                            did_you_mean(name, allowed) or (
                                "its arguments are " + ", ".join(allowed) if allowed else None))
    if f == "entropy":
        if len(node.args) != 1:
            raise EvalError("E305", "entropy takes the policy: entropy(policy)", node.span)
        pi = _policy_arg(node.args[0], scope)
        mdp = scope.policy_ref.mdp
        h = -(pi.t * torch.log(torch.clamp(pi.t, min=1e-300))).sum(-1)
        return Val(h, (), (mdp.states,))
    if len(node.args) < 2:
        raise EvalError("E305", f"`{f}` takes an MDP and the policy: {f}(M, policy, ...)",
                        node.span)
    mdp = evaluate(node.args[0], scope)
    if not isinstance(mdp, MdpValue):
        raise EvalError("E305", f"the first argument of `{f}` must be an MDP", node.args[0].span)
    pi = _policy_arg(node.args[1], scope)
    follower = scope.policy_ref.mdp
    if (mdp.states.size, mdp.actions.size) != (follower.states.size, follower.actions.size):
        raise EvalError(
            "E301",
            f"the MDP `{mdp.name}` has {mdp.states.size} states and {mdp.actions.size} actions "
            f"but the follower's policy is over {follower.states.size} x {follower.actions.size}",
            node.args[0].span,
        )
    extra_args = node.args[2:]
    if f == "value" and len(extra_args) == 1 and "reward" not in kw:
        reward_node: ir.Expr | None = extra_args[0]
    elif extra_args:
        raise EvalError("E305", f"too many arguments for `{f}`", extra_args[0].span)
    else:
        reward_node = kw["reward"].value if "reward" in kw else None
    P = mdp.dynamics().to(scope.device)
    rho = mdp.initial.to(scope.device)
    warm = None
    if scope.constants is not None and f in ("value", "occupancy"):
        warm = scope.constants.warm.setdefault(id(node), softmdp.WarmStart())
    if f in ("value", "expected_return"):
        r = (_table_arg(reward_node, mdp, scope) if reward_node is not None
             else mdp.reward.to(scope.device))
        if f == "value":
            v = softmdp.policy_evaluation(P, r, pi.t, mdp.discount, warm=warm)
            return Val((rho * v).sum())
        horizon = _positive_int(kw.get("horizon"), node, scope, "horizon")
        if not scope.exact_trajectories:
            return scalar(0.0, scope.device)  # checked; a trajectory term counts as 0 here
        return Val(_finite_horizon_return(P, r, pi.t, rho, mdp.discount, horizon))
    if f == "occupancy":
        d = softmdp.occupancy(P, pi.t, rho, mdp.discount, warm=warm)
        return Val(d, (), (mdp.states, mdp.actions))
    # preference_loss: a sampled objective; its arguments are checked here.
    if "truth" not in kw:
        raise EvalError("E305", "preference_loss needs the true reward of the oracle: "
                        "truth = ...", node.span)
    _table_arg(kw["truth"].value, mdp, scope)
    if "model" in kw:
        _table_arg(kw["model"].value, mdp, scope)
    horizon = _positive_int(kw.get("horizon"), node, scope, "horizon")
    if "pairs" in kw:
        pairs = _positive_int(kw["pairs"], node, scope, "pairs")
        if 2 * pairs * horizon > MAX_SAMPLED_STEPS:
            raise EvalError("E305", f"{pairs:,} pairs of {horizon:,} steps are "
                            f"{2 * pairs * horizon:,} sampled steps an estimate, more than "
                            f"{MAX_SAMPLED_STEPS:,}", kw["pairs"].value.span,
                            "fewer pairs, or a shorter horizon: each estimate holds all its "
                            "trajectories at once")
    for name in ("scale", "noise"):
        if name in kw:
            value = float(evaluate_val(kw[name].value, scope).t)
            if value < 0 or (name == "noise" and value > 0.5):
                raise EvalError("E305", f"`{name}` out of range: {value:g}", kw[name].span,
                                "noise is a label-flip probability in [0, 0.5]; scale is >= 0")
    if scope.exact_trajectories:
        raise EvalError("E305", "preference_loss has no closed form; it is estimated from "
                        "sampled trajectories by a model-free solver", node.span,
                        "solve it with sobirl, stoc_sobirl or drlhf; what needs phi exactly "
                        "(brl gradcheck, the exact solvers) cannot take it")
    return scalar(0.0, scope.device)


def _policy_arg(node: ir.Expr, scope: Scope) -> Val:
    if not (isinstance(node, ir.Name) and node.id == "policy"):
        raise EvalError("E305", "this argument must be the follower's `policy`", node.span)
    return evaluate_val(node, scope)


def _table_arg(node: ir.Expr, mdp: MdpValue, scope: Scope) -> torch.Tensor:
    """A reward table over (S, A), or over (S, A, S) which is averaged over the next state."""
    v = evaluate_val(node, scope)
    if v.axes:
        raise EvalError("E302", f"index `{v.axes[0]}` is not bound here", node.span,
                        "pass a whole table, e.g. a `let r[s in M.S, a in M.A] = ...`")
    S, A = mdp.states.size, mdp.actions.size
    if v.shape == (S, A):
        return to_real(v)
    if v.shape == (S, A, S):
        return expected_over_next(mdp.transitions.to(scope.device), to_real(v))
    raise EvalError("E301", f"a reward table for `{mdp.name}` must have shape [{S}, {A}] "
                    f"(or [{S}, {A}, {S}]), got {v.describe_shape()}", node.span)


def expected_over_next(P: softmdp.Transitions, v: torch.Tensor) -> torch.Tensor:
    """sum_t P[s, a, t] v[s, a, t] for a full (S, A, S) table v, on the nonzeros of P only."""
    if not P.is_sparse:
        return (P.dense() * v).sum(-1)
    rows, cols, values = P.coo()
    A = P.n_actions
    terms = values * v[rows // A, rows % A, cols]
    out = torch.zeros(P.n_states * A, dtype=v.dtype, device=v.device).index_add(0, rows, terms)
    return out.reshape(P.n_states, A)


def _positive_int(kw: ir.Keyword | None, node: ir.Call, scope: Scope, name: str) -> int:
    if kw is None:
        raise EvalError("E305", f"`{node.function}` needs `{name} = ...`", node.span)
    value = _integer(kw.value, scope)
    if value < 1:
        raise EvalError("E305", f"`{name}` must be at least 1, got {value}", kw.value.span)
    if name == "horizon" and value > MAX_HORIZON:  # one step per Python iteration
        raise EvalError("E305", f"`horizon` must be at most {MAX_HORIZON:,}, got {value}",
                        kw.value.span, "for an unbounded horizon use value(M, policy, R)")
    return value


def _finite_horizon_return(P, r, pi, rho, gamma: float, horizon: int) -> torch.Tensor:
    """E[sum_{t<H} gamma^t r(s_t, a_t)], s_0 ~ rho: H products with P_pi, differentiable.

    Autograd keeps every step's products, up to S * A numbers a step (1.25 GiB at H = 20,000 on
    2,000 states and 4 actions; 32 GB at the limit H = 100,000 on 10^4). Where that would pass
    1 GiB the steps go in segments of about sqrt(H) whose insides the backward pass computes
    again (``torch.utils.checkpoint``): about 2 sqrt(H) steps kept, for one more pass of H
    products (twice the time, docs/benchmarks.md section 18). Discounted, the sum stops where
    its rest is below 1e-20 of the largest reward (``_terms_that_count``)."""
    horizon = _terms_that_count(gamma, horizon)
    r_pi = (pi * r).sum(-1)

    def steps(d: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        total = torch.zeros((), dtype=r.dtype, device=r.device)
        for t in range(start, stop):
            total = total + (gamma**t) * (d * r_pi).sum()
            if t + 1 < horizon:
                d = softmdp.policy_rmatvec(P, pi, d)
        return total, d

    recorded = torch.is_grad_enabled() and any(
        isinstance(v, torch.Tensor) and v.requires_grad for v in (r, pi, rho))
    if not recorded or horizon * pi.numel() * pi.element_size() <= _SEGMENT_ABOVE_BYTES:
        return steps(rho, 0, horizon)[0]
    length = math.isqrt(horizon)
    total, d = torch.zeros((), dtype=r.dtype, device=r.device), rho
    for start in range(0, horizon, length):
        part, d = torch.utils.checkpoint.checkpoint(steps, d, start, min(start + length, horizon),
                                                    use_reentrant=False)
        total = total + part
    return total


_SEGMENT_ABOVE_BYTES = 1 << 30  # what keeping every step may take before the steps are segmented


def _terms_that_count(gamma: float, horizon: int) -> int:
    """The first T terms of a discounted sum whose rest, at most gamma^T / (1 - gamma) times
    the largest |reward| (a state distribution's mass is at most 1), is below 1e-20 of it:
    5,041 at gamma = 0.99, where H = 100,000 took 20 times as long for the same number."""
    if gamma >= 1.0 or horizon <= 1:
        return horizon
    if gamma <= 0.0:
        return 1
    return min(horizon, math.ceil(math.log(1e-20 * (1.0 - gamma)) / math.log(gamma)))


_DISPATCH: dict[type, Callable] = {
    ir.Number: _number,
    ir.String: _string,
    ir.Name: _name,
    ir.Attribute: _attribute,
    ir.Index: _index,
    ir.Call: _call,
    ir.Unary: _unary,
    ir.Binary: _binary,
    ir.Conditional: _conditional,
    ir.ArrayLiteral: _array,
    ir.NumberArray: _number_array,
    ir.Range: _range,
    ir.Members: _members,
    ir.Reduction: _reduction,
}
