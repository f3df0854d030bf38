"""Stage 2: semantic analysis.  Names, shapes, sets, probabilities and `check`s, with diagnostics.

Declarations are elaborated in source order into values (sets, arrays, MDPs); expressions over
the leader's variable and the follower's policy are type-checked by evaluating them once at the
initial point.  A failed declaration is marked so that uses of it report nothing more: one run
reports each independent error once.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import ir
from .data import load_array
from .deep import (
    DeepLower,
    GymMdp,
    deep_lower,
    gym_mdp,
    is_reward_net,
    preference_objective,
    reward_net_var,
)
from .diagnostics import MAX_SHOWN, Diagnostic, DiagnosticBag, SourceFile, did_you_mean
from .evaluate import (
    CONSTANTS,
    FUNCTIONALS,
    FUNCTIONS,
    Binding,
    LetDef,
    Scope,
    VarRef,
    as_real,
    evaluate,
    evaluate_val,
    expand_axes,
    expected_over_next,
    fit_declared,
    integer_value,
    not_finite_origin,
    set_of,
    to_real,
    varying_nodes,
)
from .generators import gridworld, random_mdp
from .softmdp import Transitions
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
    by_name,
)

RESERVED = {"policy", *CONSTANTS, *FUNCTIONS}
GRIDWORLD_OPTIONS = ("map", "slip", "discount", "goal_reward", "step_reward", "terminal_goal")
RANDOM_MDP_OPTIONS = ("states", "actions", "discount", "successors")
TABLE_ITEMS = ("states", "actions", "discount", "initial", "transition", "reward", "terminal")
LOWER_ITEMS = ("temperature", "reward")
DEVICES = ("cpu", "cuda", "auto")
ROW_TOLERANCE = 1e-9
# a table's transition[s, a, t] is evaluated for this many (s, a, t) at a time when larger
TABLE_BLOCK_ENTRIES = 1 << 22
MAX_ELEMENTS = 10**8  # numbers in one declared array (800 MB of float64)

# Given a solver name and its options, a catalog returns problems as
# (code, message, option name or None, hint or None).
SolverCatalog = Callable[[str, dict[str, Any]], list[tuple[str, str, str | None, str | None]]]
# A catalog problem with one of these codes (a value out of its range) is about the option's
# value, and points at it; the others point at the whole `name = value`.
VALUE_CODES = ("E805",)


@dataclass
class VarInfo:
    name: str
    decl: ir.VarDecl
    dims: tuple[SetValue | None, ...]
    x0: torch.Tensor
    lower: torch.Tensor | None
    upper: torch.Tensor | None


@dataclass
class LowerInfo:
    decl: ir.LowerDecl
    mdp: MdpValue
    temperature: float
    indices: tuple[str, ...]  # (s, a) or (s, a, t)
    reward: ir.Expr


@dataclass
class SolveInfo:
    decl: ir.SolveDecl
    solver: str
    options: dict[str, Any]
    device: str | None


@dataclass
class CheckedProgram:
    """A program whose every declaration elaborated: the input to lowering."""

    program: ir.Program
    source: SourceFile
    names: dict[str, object]
    seed: int
    var: VarInfo | None
    lower: LowerInfo | None
    upper: ir.UpperDecl | None
    solve: SolveInfo | None
    base_dir: Path | None = None
    checks: int = 0
    deep: DeepLower | None = None  # a gym MDP's follower (then var and lower are None)
    preferences: Any = None  # its RLHF objective (solvers.deep.problem.PreferenceSpec)
    # a legal file that is probably not what its author meant (W...), said but not refused
    warnings: list[Diagnostic] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.program.name

    def scope(self, device: torch.device, names: dict[str, object] | None = None,
              x: torch.Tensor | None = None, policy: torch.Tensor | None = None) -> Scope:
        return Scope(
            names=self.names if names is None else names,
            device=device,
            x=x,
            policy=policy,
            policy_ref=PolicyRef(self.lower.mdp) if self.lower is not None else None,
        )


def seed_for(seed: int, name: str) -> np.random.Generator:
    """Each declaration draws from its own stream: adding one never changes another's numbers."""
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


class _Elaborator:
    def __init__(
        self,
        program: ir.Program,
        source: SourceFile,
        base_dir: Path | None,
        overrides: dict[str, ir.Expr],
        seed: int | None,
        catalog: SolverCatalog | None,
    ):
        self.program = program
        self.source = source
        self.base_dir = base_dir
        self.overrides = overrides
        self.catalog = catalog
        self.bag = DiagnosticBag(source)
        self.names: dict[str, object] = Names()
        self.declared_at: dict[str, ir.Span] = {}
        self.var: VarInfo | None = None
        self.lower: LowerInfo | None = None
        # the follower's MDP once the lower block has named a valid one, even if the rest of
        # the block then failed: the upper objective is still checked against it
        self.follower: MdpValue | None = None
        self.upper: ir.UpperDecl | None = None
        self.solve: SolveInfo | None = None
        self.checks = 0
        # declarations whose reported error was replaced by a stand-in value so that checking
        # could go on: a `check` that uses one is not judged (its verdict would be false)
        self.stand_ins: set[str] = set()
        self.deep: DeepLower | None = None
        self.preferences: Any = None
        self.policy_lets: set[str] = set()
        self.upper_not_finite: Diagnostic | None = None  # W502, found where the objective is
        self.let_values: dict[str, Val] = {}  # the lets evaluated at x0 (or without x)
        seed_decl = program.first(ir.SeedDecl)
        self.seed = seed if seed is not None else (seed_decl.seed if seed_decl else 0)
        self.device = torch.device("cpu")
        self.all_names = {
            s.name: s.name_span for s in program.statements if hasattr(s, "name_span")
        }

    # ---------------------------------------------------------------- driver
    def run(self) -> CheckedProgram:
        singles: dict[type, ir.Span] = {}
        deferred: list[ir.Statement] = []
        for stmt in self.program.statements:
            kind = type(stmt)
            if kind in (ir.ProblemDecl, ir.SeedDecl, ir.VarDecl, ir.LowerDecl, ir.UpperDecl,
                        ir.SolveDecl):
                if kind in singles:
                    self._only_one(stmt, singles[kind])
                    continue
                singles[kind] = stmt.span
            if isinstance(stmt, (ir.UpperDecl, ir.SolveDecl)):
                deferred.append(stmt)
                continue
            self._statement(stmt)
        for stmt in deferred:
            self._statement(stmt)
        for name in self.overrides:
            if name not in self.names or not isinstance(self.names.get(name), (Val, VarRef)) \
                    and self.names.get(name) is not POISONED:
                params = [s.name for s in self.program.statements
                          if isinstance(s, (ir.ParamDecl, ir.VarDecl))]
                kind = {LetDef: "a `let`", SetValue: "a set", MdpValue: "an MDP",
                        GymMdp: "an MDP"}.get(
                    type(self.names.get(name)))
                if kind is not None:
                    self.bag.error("E201", f"-D {name}: `{name}` is {kind}, not a param or var",
                                   None, "-D overrides a `param` or the `var`'s start; override "
                                   "the params it is computed from")
                    continue
                self.bag.error("E201", f"-D {name}: there is no param or var `{name}` to "
                               "override", None, did_you_mean(name, params))
        self.bag.raise_if_any()
        return CheckedProgram(self.program, self.source, self.names, self.seed, self.var,
                              self.lower, self.upper, self.solve, self.base_dir, self.checks,
                              self.deep, self.preferences, self._warnings())

    def _warnings(self) -> list[Diagnostic]:
        """A leader who cannot move the follower, or an objective that nothing moves: legal
        (the solvers run), and almost always a slip, such as `M.R` written for `x`."""
        if self.var is None or self.lower is None or self.upper is None:
            return []
        reward, objective = self.lower.reward, self.upper.objective
        varying = varying_nodes([reward, objective], self.names)
        found = []
        name = self.var.name
        if id(reward) not in varying:
            found.append(Diagnostic(
                "W401", f"the follower's reward does not depend on `{name}`: the follower acts "
                f"the same for every `{name}`, and only the objective's own terms in `{name}` "
                "are optimised", reward.span, f"write `{name}` into the reward, e.g. "
                f"`reward[s, a] = ... + {name}[s, a]`", severity="warning"))
        if id(objective) not in varying:
            found.append(Diagnostic(
                "W501", f"the objective depends neither on `{name}` nor on the follower's policy: "
                f"every `{name}` is as good as any other", objective.span,
                "use the variable, or `value(M, policy)` and the other policy functionals",
                severity="warning"))
        if self.upper_not_finite is not None:
            found.append(self.upper_not_finite)
        lets = [v.decl.value for v in self.names.values() if isinstance(v, LetDef)]
        for root in (reward, objective, *lets):
            for node in ir.walk(root):
                moving = [i for i in getattr(node, "indices", ()) if id(i) in varying] \
                    if type(node) is ir.Index else []
                if moving:  # checked at x0, where it may be whole; a step later it is not
                    found.append(Diagnostic(
                        "W402", f"this index follows `{name}` (or the policy), whose values "
                        "change during a solve and need not be whole numbers", moving[0].span,
                        "index with params or set elements, and let the variable weigh the "
                        "entries instead (`sum {i in I} w[i] * ...`)", severity="warning"))
        return found

    def _only_one(self, stmt: ir.Statement, first: ir.Span) -> None:
        word = {
            ir.ProblemDecl: "`problem` statement", ir.SeedDecl: "`seed` statement",
            ir.VarDecl: "`var`",
            ir.LowerDecl: "`lower` block", ir.UpperDecl: "`upper` objective",
            ir.SolveDecl: "`solve` statement",
        }[type(stmt)]
        hint = "the leader has one decision variable; make it an array, e.g. `var x[2, 3]`" \
            if isinstance(stmt, ir.VarDecl) else None
        if isinstance(stmt, ir.VarDecl) and isinstance(stmt.value, ir.Call) \
                and stmt.value.function == "reward_net":
            hint = "the leader learns one reward network; widen it (`hidden = [...]`) rather " \
                "than adding another"
        self.bag.error("E202", f"only one {word} is allowed", stmt.span, hint,
                       notes=(f"the first is on line {first.line}",))

    def _statement(self, stmt: ir.Statement) -> None:
        handler = {
            ir.ProblemDecl: lambda s: None,
            ir.SeedDecl: lambda s: None,
            ir.SetDecl: self._set,
            ir.ParamDecl: self._param,
            ir.VarDecl: self._var,
            ir.LetDecl: self._let,
            ir.MdpDecl: self._mdp,
            ir.LowerDecl: self._lower,
            ir.UpperDecl: self._upper,
            ir.SolveDecl: self._solve,
            ir.CheckDecl: self._check,
        }[type(stmt)]
        name = getattr(stmt, "name", None)
        if name is not None and isinstance(stmt, (ir.SetDecl, ir.ParamDecl, ir.VarDecl,
                                                  ir.LetDecl, ir.MdpDecl)):
            if not self._declare(stmt):
                return
        try:
            handler(stmt)
        except Cascade:
            if name is not None:
                self.names[name] = POISONED
        except EvalError as err:
            self._report(err, stmt)
            if name is not None:
                self.names[name] = POISONED
        except (MemoryError, RuntimeError) as exc:
            if not out_of_memory(exc):
                raise
            self.bag.error("E301", "this needs more memory than the machine has", stmt.span,
                           "make the sets or dimensions smaller")
            if name is not None:
                self.names[name] = POISONED

    def _report(self, err: EvalError, stmt: object = None) -> None:
        if isinstance(err, Cascade):  # its cause has been reported
            return
        code, message, hint = err.code, err.message, err.hint
        if code == "E201" and message.startswith(("undefined name `", "undefined MDP `")):
            missing = message.split("`")[1]
            later = self.all_names.get(missing)
            if later is not None and err.span is not None and later.line >= err.span.line:
                code = "E203"
                message = f"`{missing}` is used before its declaration on line {later.line}"
                hint = "declare names before using them"
            elif hint is None and err.span is not None:
                hint = _outside_its_reduction(missing, err.span, stmt)
        self.bag.error(code, message, err.span, hint, err.notes)
        for more in err.also:
            self._report(more, stmt)

    def _declare(self, stmt) -> bool:
        name = stmt.name
        if name in RESERVED:
            self.bag.error("E202", f"`{name}` is a built-in name and cannot be redefined",
                           stmt.name_span, "choose another name")
            return False
        if name in self.declared_at:
            first = self.declared_at[name]
            self.bag.error("E202", f"`{name}` is already defined", stmt.name_span,
                           notes=(f"first defined on line {first.line}",))
            return False
        self.declared_at[name] = stmt.name_span
        return True

    def _value(self, node: ir.Expr) -> Val:
        return evaluate_val(node, self._scope())

    def _scope(self, x: torch.Tensor | None = None) -> Scope:
        scope = Scope(self.names, self.device, x=x)
        scope.load = self._loader
        scope.hints = len(self.bag.items) < MAX_SHOWN
        return scope

    def _loader(self, node: ir.Call, name: str) -> Val:
        array = load_array(name, self.base_dir, node.args[0].span)
        return Val(torch.from_numpy(array), (), (None,) * array.ndim)

    # ---------------------------------------------------------------- declarations
    def _set(self, decl: ir.SetDecl) -> None:
        value = set_of(decl.value, self._scope())
        if isinstance(decl.value, (ir.Range, ir.Members)):
            value = SetValue(decl.name, value.size, value.members, value.start, value.is_range)
        self.names[decl.name] = value

    def _dims(self, dims: tuple[ir.Dim, ...]) -> list[tuple[str | None, SetValue | None, int]]:
        if not dims:  # a single number: most declarations
            return []
        out = []
        scope = self._scope()
        seen: set[str] = set()
        for dim in dims:
            obj = evaluate(dim.domain, scope)
            if isinstance(obj, SetValue):
                out_set, size = obj, obj.size
                if size < 1:
                    raise EvalError("E301", f"a dimension must have at least 1 element, but "
                                    f"{obj.describe()} is empty", dim.domain.span)
            elif isinstance(obj, Val) and not obj.dims and not obj.axes:
                size = integer_value(dim.domain, scope)
                if size < 1:
                    raise EvalError("E301", f"a dimension must have at least 1 element, got {size}",
                                    dim.domain.span)
                out_set = SetValue(str(size), size) if dim.index else None
            else:
                raise EvalError("E305", "a dimension is a set (`S`, `0..9`, `M.S`) or a size",
                                dim.domain.span)
            if dim.index is not None:
                if dim.index in seen:
                    raise EvalError("E202", f"index `{dim.index}` is used twice", dim.span)
                seen.add(dim.index)
            out.append((dim.index, out_set, size))
        if math.prod(size for _, _, size in out) > MAX_ELEMENTS:
            raise EvalError("E301", f"a declaration holds at most {MAX_ELEMENTS:,} numbers, "
                            f"but these dimensions make {math.prod(s for _, _, s in out):,}",
                            dims[0].span if len(dims) == 1 else
                            ir.Span(dims[0].span.line, dims[0].span.column,
                                    dims[-1].span.end_line, dims[-1].span.end_column))
        return out

    def _declared_value(
        self,
        name: str,
        dims: list[tuple[str | None, SetValue | None, int]],
        value_node: ir.Expr,
        random: bool,
        x: torch.Tensor | None = None,
        what: str = "param",
    ) -> Val:
        """Evaluate a declaration's value into the declared shape."""
        scope = self._scope(x)
        shape = tuple(size for _, _, size in dims)
        per_element = any(index is not None for index, _, _ in dims)
        axes = tuple(index or f"#{k}" for k, (index, _, _) in enumerate(dims))
        if per_element:
            for axis, (_, s, size) in zip(axes, dims):
                scope.indices[axis] = Binding(axis, s or SetValue(str(size), size),
                                              torch.device("cpu"))
        if random:
            rng = seed_for(self.seed, name)
            target_axes = axes if per_element else ()
            target_shape = shape if per_element else shape
            scope.draw = lambda f, args, node: _draw(f, args, node, rng, target_axes,
                                                     target_shape, per_element)
        v = fit_declared(evaluate_val(value_node, scope), axes, tuple(dims), name, value_node,
                         what)
        return Val(v.t.clone(), (), v.dims, v.kind)

    def _override(self, decl: ir.ParamDecl | ir.VarDecl,
                  dims: list[tuple[str | None, SetValue | None, int]], what: str) -> Val:
        """The value ``-D name=...`` gives a param or the variable, its errors prefixed with
        the flag and placed at the declaration's name (the value itself has no file)."""
        whole = [(None, s, n) for _, s, n in dims]  # a value, not a formula of the indices
        try:
            return self._declared_value(decl.name, whole, self.overrides[decl.name], False,
                                        what=what)
        except Cascade:
            raise
        except EvalError as err:
            missing = err.message.split("`")[1] if err.message.startswith(
                "undefined name `") else None
            later = self.all_names.get(missing) if missing is not None else None
            if later is not None and later.line >= decl.name_span.line:
                raise EvalError("E203", f"-D {decl.name}: `{missing}` is declared on line "
                                f"{later.line}, after `{decl.name}`", decl.name_span,
                                f"a -D value may use only what is declared before "
                                f"`{decl.name}`") from None
            raise EvalError(err.code, f"-D {decl.name}: {err.message}", decl.name_span,
                            err.hint) from None

    def _param(self, decl: ir.ParamDecl) -> None:
        value_node = self.overrides.get(decl.name, decl.value)
        dims = self._dims(decl.dims)
        if decl.name in self.overrides:
            original = self._declared_value(decl.name, dims, decl.value, decl.random)
            v = self._override(decl, dims, "param")
            if v.shape != original.shape or (original.kind == "int" and v.kind != "int"):
                kind = "an integer" if original.kind == "int" else "a number"
                shape = f" of shape {list(original.shape)}" if original.shape else ""
                hint = f"`{decl.name}` is declared here"
                if (original.kind == "int" and v.shape == original.shape
                        and _literal_numbers(decl.value)):
                    hint = (f"`{decl.name}` is declared with whole numbers, so it is an integer: "
                            "write them with a decimal point (`1.0`) to allow others")
                if v.shape != original.shape:
                    got = f"{v.describe_shape()} of kind {v.kind}"
                elif v.kind == "real":
                    got = "real numbers" if original.shape else "a real number"
                else:
                    got = f"values of kind {v.kind}"
                raise EvalError("E305", f"-D {decl.name}: expected {kind}{shape}, got {got}",
                                decl.name_span, hint)
        else:
            v = self._declared_value(decl.name, dims, value_node, decl.random)
        if not _all_finite(v.t) and not _writes_infinity(value_node, v.t):
            what = _first_not_finite(decl.name, v)
            if decl.name in self.overrides:
                raise EvalError("E305", f"-D {decl.name}: the value is not finite ({what})",
                                decl.name_span, f"`{decl.name}` is declared here")
            raise EvalError("E305", f"param `{decl.name}` is not finite ({what})",
                            value_node.span, "a param may hold infinities only where its "
                            "expression writes `inf` (bounds such as `[1, inf]`), and NaN never; "
                            "a division by zero, log(0) or an overflow makes them")
        self.names[decl.name] = v

    def _var(self, decl: ir.VarDecl) -> None:
        if is_reward_net(decl.value):
            if decl.name in self.overrides:
                raise EvalError("E305", f"-D {decl.name}: a reward network's weights cannot be "
                                "set from the command line", decl.name_span,
                                "its initial weights come from the seed (--seed)")
            self.names[decl.name] = reward_net_var(decl, self.names, self._value)
            return
        dims = self._dims(decl.dims)
        shape = tuple(n for _, _, n in dims)
        if decl.value is None:
            x0 = Val(torch.zeros(shape, dtype=DTYPE), (), tuple(s for _, s, _ in dims))
        else:
            x0 = self._declared_value(decl.name, dims, decl.value, decl.random, what="var")
        if not x0.dims and dims:
            x0 = Val(x0.t.expand(shape).clone(), (), tuple(s for _, s, _ in dims))
        if decl.name in self.overrides:  # -D x=...: another start
            start = self._override(decl, dims, "var")
            if not start.dims and dims:
                start = Val(start.t.expand(shape).clone(), (), x0.dims)
            if start.shape != x0.shape:
                raise EvalError("E305", f"-D {decl.name}: expected a number or shape "
                                f"{list(x0.shape)}, got {start.describe_shape()}",
                                decl.name_span, f"`{decl.name}` is declared here")
            x0 = start
        bounds = []
        for node in (decl.lower, decl.upper):
            if node is None:
                bounds.append(None)
                continue
            b = evaluate_val(node, self._scope())
            if b.axes or (b.shape and b.shape != x0.shape):
                raise EvalError("E301", f"a bound must be a number or have the variable's shape "
                                f"{list(x0.shape)}, got {b.describe_shape()}", node.span)
            b = to_real(b).expand(x0.shape).clone()
            lower_side = node is decl.lower
            unusable = torch.isnan(b) | (b == (math.inf if lower_side else -math.inf))
            if bool(unusable.any()):  # a NaN, or `inf` below: no number lies within
                bad = float(b.reshape(-1)[unusable.reshape(-1)][0])
                what = "NaN (not a number)" if math.isnan(bad) else \
                    f"{bad:g}, which no number is {'above' if lower_side else 'below'}"
                raise EvalError("E701", f"the {'lower' if lower_side else 'upper'} bound of "
                                f"`{decl.name}` is {what}", node.span, "write bounds as `in "
                                "[lower, upper]`, finite or `-inf` below and `inf` above")
            bounds.append(b)
        lower, upper = bounds
        if lower is not None and upper is not None and bool((lower > upper).any()):
            k = int(torch.nonzero((lower > upper).reshape(-1))[0])
            where = f"{decl.name}[{', '.join(map(str, np.unravel_index(k, x0.shape)))}]" \
                if x0.shape else decl.name
            # reported; checking goes on without bounds
            self.bag.error("E701", f"the lower bound {float(lower.reshape(-1)[k]):g} is above "
                           f"the upper bound {float(upper.reshape(-1)[k]):g} for {where}",
                           decl.lower.span, "write bounds as `in [lower, upper]`")
            self.stand_ins.add(decl.name)
            lower = upper = None
        t = to_real(x0).clone()
        if not bool(torch.isfinite(t).all()):
            if decl.name in self.overrides:
                raise EvalError("E305", f"-D {decl.name}: the start is not finite (NaN or "
                                "infinity)", decl.name_span, f"`{decl.name}` is declared here")
            raise EvalError("E305", f"the initial value of `{decl.name}` is not finite",
                            decl.value.span if decl.value is not None else decl.span)
        if lower is not None or upper is not None:
            t = torch.clamp(t, min=lower, max=upper)
        self.var = VarInfo(decl.name, decl, x0.dims, t, lower, upper)
        self.names[decl.name] = VarRef(decl.name, x0.dims)

    def _let(self, decl: ir.LetDecl) -> None:
        let = LetDef(decl, tuple(self._dims(decl.dims)), frozenset(ir.names_in(decl.value)))
        self.names[decl.name] = let
        if _uses_policy(decl.value, self.policy_lets):
            # uses the policy, maybe through another let: checked where the objective uses it
            self.policy_lets.add(decl.name)
            return
        x = self.var.x0 if self.var is not None else None
        scope = self._scope(x)
        scope.let_cache = self.let_values  # each let once, not once per later let using it
        if math.prod(size for _, _, size in let.dims) > TABLE_BLOCK_ENTRIES and all(
                index is not None for index, _, _ in let.dims):
            # checked at its first element only: a large table such as w[s, a, t] may be
            # needed nowhere whole (a reward on sparse P reads it at P's triples)
            first = torch.zeros(1, dtype=torch.long)
            scope.indices = {index: Binding(index, dim_set or SetValue(str(size), size),
                                            scope.device, first)
                             for index, dim_set, size in let.dims}
            v = evaluate_val(decl.value, scope)
            fit_declared(v, tuple(scope.indices), tuple((i, d, 1) for i, d, _ in let.dims),
                         decl.name, decl.value, "let")
            return
        evaluate_val(ir.Name(decl.name_span, decl.name), scope)

    # ---------------------------------------------------------------- MDPs
    def _options(self, decl: ir.MdpDecl, allowed: tuple[str, ...],
                 required: tuple[str, ...]) -> dict[str, ir.Keyword]:
        """A generator's options by name (see ``_by_name``)."""
        if decl.args:
            raise EvalError("E404", f"options of `{decl.kind}` are given by name",
                            decl.args[0].span, f"for example {decl.kind}({allowed[0]} = ...)")
        return self._by_name([(kw.name, kw.span, kw) for kw in decl.keywords], allowed, required,
                             f"`{decl.kind}` has no option",
                             "its options are " + ", ".join(allowed))

    def _number(self, kw: ir.Keyword | None, default: float | None, what: str,
                decl_span: ir.Span) -> float:
        if kw is None:
            if default is None:
                raise EvalError("E404", f"missing option `{what}`", decl_span,
                                f"add `{what} = ...`")
            return default
        v = evaluate_val(kw.value, self._scope())
        if v.axes or v.dims:
            raise EvalError("E301", f"`{what}` must be a single number", kw.value.span)
        return float(v.t)

    def _flag(self, kw: ir.Keyword | None, default: bool, what: str, decl_span: ir.Span) -> bool:
        value = self._number(kw, float(default), what, decl_span)
        if value not in (0.0, 1.0):
            raise EvalError("E305", f"`{what}` is true or false, got {value:g}", kw.value.span,
                            f"write `{what} = true` or `{what} = false`")
        return value == 1.0

    def _discount(self, value: float, span: ir.Span, owner: str) -> float:
        """The discount, or after reporting a bad one a stand-in that lets checking go on."""
        if not (0.0 <= value < 1.0):
            self.bag.error("E402", f"the discount must lie in [0, 1), got {value:g}", span,
                           "a discount of 1 or more makes values infinite; try 0.95 or 0.99"
                           if value >= 1.0 else "a discount weighs the future: 0 for none, "
                           "close to 1 for a long horizon")
            self.stand_ins.add(owner)
            return 0.9
        return value

    def _mdp(self, decl: ir.MdpDecl) -> None:
        if decl.block and decl.kind == "table":
            self.names[decl.name] = self._table(decl)
            return
        if decl.kind == "table":
            raise EvalError("E404", "a table MDP is written as a block: `table { ... }`",
                            decl.kind_span)
        if decl.block:
            raise EvalError("E404", f"`{decl.kind} {{ ... }}` is not an MDP form", decl.kind_span,
                            "use `table { ... }`, or a generator like gridworld(...)")
        if decl.kind == "gym":
            self.names[decl.name] = gym_mdp(decl, self._value)
            return
        if decl.kind == "gridworld":
            opts = self._options(decl, GRIDWORLD_OPTIONS, ("map",))
            if "map" not in opts:
                raise EvalError("E404", "gridworld needs a `map`", decl.span,
                                'for example map = """\n  S..\n  .#G\n"""')
            map_node = opts["map"].value
            if not isinstance(map_node, ir.String):
                raise EvalError("E305", "the map must be a string", map_node.span)
            span_text = self.source.line(map_node.span.line)[map_node.span.column - 1:]
            slip = self._number(opts.get("slip"), 0.0, "slip", decl.span)
            if not 0.0 <= slip <= 1.0:  # reported; checking goes on without slip
                self.bag.error("E405", f"slip is a probability in [0, 1], got {slip:g}",
                               opts["slip"].value.span)
                self.stand_ins.add(decl.name)
                slip = 0.0
            gamma = self._discount(self._number(opts.get("discount"), 0.95, "discount",
                                                decl.span),
                                   opts["discount"].value.span if "discount" in opts
                                   else decl.span, decl.name)
            mdp = gridworld(
                decl.name, map_node.value, map_node.span, span_text.startswith('"""'), slip,
                gamma,
                self._number(opts.get("goal_reward"), 1.0, "goal_reward", decl.span),
                self._number(opts.get("step_reward"), 0.0, "step_reward", decl.span),
                self._flag(opts.get("terminal_goal"), True, "terminal_goal", decl.span),
            )
        elif decl.kind == "random_mdp":
            opts = self._options(decl, RANDOM_MDP_OPTIONS, ("states", "actions"))
            sizes = {}
            for key in ("states", "actions"):
                if key not in opts:
                    raise EvalError("E404", f"random_mdp needs `{key} = ...`", decl.span)
                sizes[key] = integer_value(opts[key].value, self._scope())
                if not 1 <= sizes[key] <= 10_000_000:
                    raise EvalError("E301", f"`{key}` must be between 1 and 10^7",
                                    opts[key].value.span)
            successors = None
            if "successors" in opts:
                successors = integer_value(opts["successors"].value, self._scope())
                if not 1 <= successors <= sizes["states"]:
                    raise EvalError("E301", f"`successors` must be between 1 and the number of "
                                    f"states ({sizes['states']})", opts["successors"].value.span)
                if sizes["states"] > 512 and successors > sizes["states"] // 4:
                    raise EvalError("E301", "with more than 512 states, `successors` must be at "
                                    "most a quarter of the states", opts["successors"].value.span)
            elif sizes["states"] > 512:
                raise EvalError("E404", "random_mdp with more than 512 states needs "
                                "`successors = k`", decl.span,
                                "the paper's draw of up to S - 1 successors per pair is dense")
            gamma = self._discount(self._number(opts.get("discount"), 0.9, "discount", decl.span),
                                   opts["discount"].value.span if "discount" in opts
                                   else decl.span, decl.name)
            mdp = random_mdp(decl.name, sizes["states"], sizes["actions"], gamma, successors,
                             seed_for(self.seed, decl.name))
        else:
            raise EvalError("E404", f"unknown MDP kind `{decl.kind}`", decl.kind_span,
                            did_you_mean(decl.kind, ("gridworld", "random_mdp", "table", "gym"))
                            or "use gridworld(...), random_mdp(...), gym(...) or table { ... }")
        self.names[decl.name] = mdp

    def _table(self, decl: ir.MdpDecl) -> MdpValue:
        items = self._by_name([(item.key, item.key_span, item) for item in decl.items],
                              TABLE_ITEMS, ("states", "actions", "transition"),
                              "a table MDP has no part", "its parts are " + ", ".join(TABLE_ITEMS))
        for required in ("states", "actions", "transition"):
            if required not in items:
                raise EvalError("E404", f"the table MDP `{decl.name}` needs `{required} = ...`",
                                decl.name_span)
        scope = self._scope()
        sets = {}
        for key, short in (("states", "S"), ("actions", "A")):
            item = items[key]
            self._no_indices(item)
            obj = evaluate(item.value, scope)
            if isinstance(obj, Val) and not obj.dims and not obj.axes:
                count = integer_value(item.value, scope)
                if count < 1:
                    raise EvalError("E301", f"`{key}` must be at least 1", item.value.span)
                obj = SetValue(f"{decl.name}.{short}", count)
            elif not isinstance(obj, SetValue):
                raise EvalError("E305", f"`{key}` must be a set or a count", item.value.span)
            elif isinstance(item.value, (ir.Range, ir.Members)):
                obj = SetValue(f"{decl.name}.{short}", obj.size, obj.members, obj.start)
            sets[short] = obj
        S, A = sets["S"], sets["A"]
        # the other parts may name the sets and their members (replaced by the MDP at the end)
        self.names[decl.name] = TableSets(decl.name, S, A)
        terminal = torch.zeros(S.size, dtype=torch.bool)
        if "terminal" in items:
            terminal = self._terminal(items["terminal"], S)
        transitions = self._transitions_in_blocks(items["transition"], S, A, terminal)
        if transitions is None:
            P = self._table_part(items["transition"], (S, A, S), ("s", "a", "t"))
            self._check_rows(P, S, A, terminal, items["transition"])
            transitions = Transitions.auto(P)  # sparse when large and mostly zero
        if "reward" in items:
            item = items["reward"]
            if len(item.indices) == 3 or (not item.indices and self._shape_of(item) == 3):
                reward = self._reward_on_transitions(item, transitions, S, A)
                if reward is None:
                    R3 = self._table_part(item, (S, A, S), ("s", "a", "t"))
                    reward = expected_over_next(transitions, R3)
            else:
                reward = self._table_part(item, (S, A), ("s", "a"))
        else:
            reward = torch.zeros(S.size, A.size, dtype=DTYPE)
        # uniform over the states where an episode can run (all, if all are terminal)
        start = torch.ones(S.size, dtype=DTYPE) if bool(terminal.all()) else (~terminal).to(DTYPE)
        initial = start / start.sum()
        if "initial" in items:  # an error is reported, and checking goes on with the default
            try:
                given = self._table_part(items["initial"], (S,), ("s",))
            except EvalError as err:
                self._report(err)
                self.stand_ins.add(decl.name)
            else:
                if bool((given < 0).any()) or abs(float(given.sum()) - 1.0) > ROW_TOLERANCE:
                    self.stand_ins.add(decl.name)
                    self.bag.error("E401", f"the initial distribution must be non-negative and "
                                   f"sum to 1, but it sums to {float(given.sum()):.6g}",
                                   items["initial"].value.span,
                                   "divide by the total, or write `initial[s] = ...` with "
                                   "entries that sum to 1")
                initial = given
        gamma = 0.9
        if "discount" in items:
            self._no_indices(items["discount"])
            gamma = self._discount(self._number(ir.Keyword(items["discount"].span, "discount",
                                                           items["discount"].value),
                                                None, "discount", decl.span),
                                   items["discount"].value.span, decl.name)
        return MdpValue(decl.name, S, A, transitions, reward, initial, gamma, terminal)

    def _by_name(self, entries: list[tuple[str, ir.Span, Any]], allowed: tuple[str, ...],
                 required: tuple[str, ...], unknown: str, known: str) -> dict[str, Any]:
        """Options or block parts by name (``by_name``), every bad one reported; checking goes
        on without them unless a required one is missing too (most likely misspelt)."""
        found, errors = by_name(entries, allowed, unknown, known)
        for err in errors:
            self._report(err)
        if errors and any(name not in found for name in required):
            raise Cascade()
        return found

    def _shape_of(self, item: ir.Item) -> int:
        return len(evaluate_val(item.value, self._scope()).dims)

    def _no_indices(self, item: ir.Item) -> None:
        if item.indices:
            raise EvalError("E302", f"`{item.key}` takes no indices", item.indices[0].span)

    def _table_part(self, item: ir.Item, sets: tuple[SetValue, ...],
                    default_names: tuple[str, ...]) -> torch.Tensor:
        if item.indices and len(item.indices) != len(sets):
            raise EvalError("E302", f"`{item.key}` takes {len(sets)} indices, "
                            f"got {len(item.indices)}", item.span,
                            f"write {item.key}[{', '.join(default_names)}] = ...")
        dims = [(n.id if item.indices else None, s, s.size)
                for n, s in zip(item.indices or [None] * len(sets), sets)]
        v = self._declared_value(item.key, dims, item.value, False, what="part")
        if not bool(torch.isfinite(to_real(v)).all()):
            raise EvalError("E305", f"`{item.key}` has NaN or infinite entries", item.value.span)
        return to_real(v)

    def _terminal(self, item: ir.Item, S: SetValue) -> torch.Tensor:
        self._no_indices(item)
        terminal = torch.zeros(S.size, dtype=torch.bool)
        if isinstance(item.value, ir.Members):
            for m in item.value.members:
                pos = S.member_position(m.name)
                if pos is None and m.name.isdigit():
                    pos = int(m.name) - S.start
                if pos is None or not 0 <= pos < S.size:
                    known = (f"the states are {', '.join(S.members)}" if S.members else
                             f"the states run from {S.start} to {S.start + S.size - 1}")
                    raise EvalError("E201", f"`{m.name}` is not a state", m.span,
                                    did_you_mean(m.name, S.members or ()) or known)
                terminal[pos] = True
            return terminal
        v = evaluate_val(item.value, self._scope())
        if v.shape != (S.size,):
            raise EvalError("E301", "`terminal` is a set of states `{s1, s2}` or a 0/1 vector "
                            "over the states", item.value.span)
        flags = to_real(v)
        odd = (flags != 0) & (flags != 1)
        if bool(odd.any()):
            s = int(torch.nonzero(odd)[0])
            raise EvalError("E305", f"`terminal` is a 0/1 vector over the states, but its entry "
                            f"for state {_label(S, s)} is {float(flags[s]):g}", item.value.span,
                            "1 marks a terminal state, 0 any other")
        return flags == 1

    def _check_rows(self, P: torch.Tensor, S: SetValue, A: SetValue, terminal: torch.Tensor,
                    item: ir.Item) -> None:
        self._raise_bad_rows(self._bad_rows(P, 0, S, A, terminal, item, (0, None)), S, A, item)

    def _bad_rows(self, P: torch.Tensor, start: int, S: SetValue, A: SetValue,
                  terminal: torch.Tensor, item: ir.Item, tally: tuple[int, Any]
                  ) -> tuple[int, Any]:
        """Check the rows of states ``start, start + 1, ...`` (``P`` holds them): E401 at the
        first negative entry; ``tally`` (rows that are no distribution, and the first of them
        as (s, a, sum)) carried on."""
        negative = P < 0
        if bool(negative.any()):
            s, a, t = (int(i) for i in torch.nonzero(negative)[0])
            raise EvalError("E401", f"transition probability P[{_label(S, start + s)}, "
                            f"{_label(A, a)}, {_label(S, t)}] = {float(P[s, a, t]):.6g} is "
                            "negative", item.value.span)
        sums = P.sum(-1)
        bad = (sums - 1.0).abs() > ROW_TOLERANCE
        # a terminal state may have no successors
        bad &= ~(terminal[start:start + P.shape[0], None] & (sums == 0))
        count, first = tally
        if bool(bad.any()) and first is None:
            s, a = (int(i) for i in torch.nonzero(bad)[0])
            first = (start + s, a, float(sums[s, a]))
        return count + int(bad.sum()), first

    def _raise_bad_rows(self, tally: tuple[int, Any], S: SetValue, A: SetValue,
                        item: ir.Item) -> None:
        count, first = tally
        if count:
            s, a, total = first
            more = f" (and {count - 1} more row{'s' if count > 2 else ''})" if count > 1 else ""
            raise EvalError(
                "E401",
                f"transition row (s = {_label(S, s)}, a = {_label(A, a)}) is not a distribution: "
                f"it sums to {total:.6g}, not 1{more}",
                item.value.span,
                "each row P[s, a, .] must be non-negative and sum to 1",
            )

    def _transitions_in_blocks(self, item: ir.Item, S: SetValue, A: SetValue,
                               terminal: torch.Tensor) -> Transitions | None:
        """A large table's ``transition[s, a, t] = ...`` evaluated for a block of states ``s``
        at a time and kept as its nonzeros: the whole ``S x A x S`` table and the temporaries
        of its expression took 2.6 GiB at 8,000 states and ran out of memory at 16,000, for
        P's 2 S A nonzeros. None where the table is small or the part is not written with
        three indices (then evaluated whole, as are the errors of a value of the wrong
        shape)."""
        names = tuple(n.id for n in item.indices if isinstance(n, ir.Name))
        entries = S.size * A.size * S.size
        if len(names) != 3 or len(set(names)) != 3 or entries <= TABLE_BLOCK_ENTRIES:
            return None
        per = max(1, TABLE_BLOCK_ENTRIES // (A.size * S.size))
        rows, cols, values = [], [], []
        tally: tuple[int, Any] = (0, None)
        for start in range(0, S.size, per):
            stop = min(S.size, start + per)
            scope = self._scope()
            scope.indices = {
                names[0]: Binding(names[0], S, scope.device, torch.arange(start, stop)),
                names[1]: Binding(names[1], A, scope.device),
                names[2]: Binding(names[2], S, scope.device)}
            v = evaluate_val(item.value, scope)
            if v.dims or any(axis not in names for axis in v.axes):
                return None
            block = as_real(expand_axes(v, names, {names[0]: stop - start,
                                                   names[1]: A.size, names[2]: S.size}))
            if not bool(torch.isfinite(block).all()):
                raise EvalError("E305", "`transition` has NaN or infinite entries",
                                item.value.span)
            tally = self._bad_rows(block, start, S, A, terminal, item, tally)
            nonzero = block.nonzero()
            rows.append((nonzero[:, 0] + start) * A.size + nonzero[:, 1])
            cols.append(nonzero[:, 2])
            values.append(block[nonzero[:, 0], nonzero[:, 1], nonzero[:, 2]])
        self._raise_bad_rows(tally, S, A, item)
        return Transitions.auto((torch.cat(rows), torch.cat(cols), torch.cat(values)),
                                S.size, A.size)

    def _reward_on_transitions(self, item: ir.Item, P: Transitions, S: SetValue, A: SetValue
                               ) -> torch.Tensor | None:
        """A table's ``reward[s, a, t]`` averaged over the next state at P's stored triples
        only, where P is sparse; None elsewhere (the whole table is then evaluated, as are the
        errors of a value of the wrong shape)."""
        names = tuple(n.id for n in item.indices if isinstance(n, ir.Name))
        if not P.is_sparse or len(names) != 3 or len(set(names)) != 3:
            return None

        def value(inner: Scope) -> Val | None:
            v = evaluate_val(item.value, inner)
            if v.dims or any(axis != _TRANSITION_AXIS for axis in v.axes):
                return None
            if not bool(torch.isfinite(to_real(v)).all()):
                raise EvalError("E305", "`reward` has NaN or infinite entries", item.value.span)
            return v

        return over_next_on_transitions(P, names, (S, A, S), self._scope(), value)

    # ---------------------------------------------------------------- the bilevel parts
    def _lower(self, decl: ir.LowerDecl) -> None:
        mdp = self.names.get(decl.mdp)
        if mdp is POISONED:
            raise Cascade()
        if not isinstance(mdp, (MdpValue, GymMdp)):
            if mdp is None:
                mdps = [k for k, v in self.names.items() if isinstance(v, (MdpValue, GymMdp))]
                hint = did_you_mean(decl.mdp, mdps)
                if hint is None and len(mdps) == 1:  # a one-letter name resembles no other
                    hint = f"did you mean `{mdps[0]}`, the only MDP declared?"
                elif hint is None and mdps:
                    hint = f"the MDPs declared are {', '.join(f'`{m}`' for m in mdps)}"
                elif hint is None:
                    hint = ("declare it first: `mdp NAME = gridworld(...)` or "
                            "`mdp NAME = table { ... }`")
                raise EvalError("E201", f"undefined MDP `{decl.mdp}`", decl.mdp_span, hint)
            raise EvalError("E305", f"`{decl.mdp}` is not an MDP", decl.mdp_span)
        if isinstance(mdp, MdpValue):
            self.follower = mdp
        items = self._by_name([(item.key, item.key_span, item) for item in decl.items],
                              LOWER_ITEMS, LOWER_ITEMS, "a lower block has no part",
                              "its parts are temperature and reward")
        for required in LOWER_ITEMS:
            if required not in items:
                example = "temperature = 0.1" if required == "temperature" else \
                    "reward[s, a] = ..."
                raise EvalError("E404", f"the lower block needs `{required}`", decl.span,
                                f"add `{example}`")
        if isinstance(mdp, GymMdp):
            self.deep = deep_lower(decl, mdp, items, self.names, self._value)
            return
        temp_item = items["temperature"]
        self._no_indices(temp_item)
        if isinstance(temp_item.value, ir.Name) and temp_item.value.id == "auto" \
                and "auto" not in self.names:
            raise EvalError("E403", "`temperature = auto` is for a follower on a gym "
                            "environment (its SAC tunes the temperature); a tabular follower "
                            "needs a number", temp_item.value.span, "try 0.1 or 0.01")
        tau = self._number(ir.Keyword(temp_item.span, "temperature", temp_item.value), None,
                           "temperature", decl.span)
        if not tau > 0 or not math.isfinite(tau):  # reported; checking goes on with tau = 1
            need = "positive" if math.isfinite(tau) else "finite"
            self.bag.error("E403", f"the temperature must be {need}, got {tau:g}",
                           temp_item.value.span, "it weighs the entropy bonus; try 0.1 or 0.01")
            tau = 1.0
        reward = items["reward"]
        if len(reward.indices) not in (2, 3):
            raise EvalError("E302", "the follower's reward is written reward[s, a] = ... or "
                            "reward[s, a, t] = ... (t the next state)",
                            reward.span)
        names = tuple(n.id for n in reward.indices)
        if len(set(names)) != len(names):
            raise EvalError("E202", "the reward's indices must have different names",
                            reward.span)
        use = _policy_use(reward.value, self.policy_lets)
        if isinstance(use, ir.Name) and use.id in self.policy_lets:  # the let itself is fine
            line = self.declared_at[use.id].line
            raise EvalError("E501", f"`{use.id}` uses the follower's policy (`let {use.id}`, "
                            f"line {line}): a reward cannot depend on it", use.span,
                            "the policy is the follower's answer to this reward; use "
                            f"`{use.id}` in the `upper` objective")
        info = LowerInfo(decl, mdp, tau, names, reward.value)
        x = self.var.x0 if self.var is not None else None
        scope = self._scope(x)
        try:
            r = lower_reward(info, scope)
        except EvalError as err:
            if err.code == "E201" and err.message.startswith("undefined name `") and \
                    err.hint is None and len(names) == 2:
                missing = err.message.split("`")[1]
                raise EvalError(err.code, err.message, err.span,
                                f"if `{missing}` is the next state, name it: `reward[{names[0]}, "
                                f"{names[1]}, {missing}] = ...` (averaged over {missing} ~ "
                                f"P(.|{names[0]}, {names[1]}))") from None
            index = err.message.split("`")[1] if err.code == "E303" else None
            if index in names and names[:2] != ("s", "a"):  # unusual names: say what each is
                sets = ("the states", "the actions", "the next states")
                roles = ", ".join(f"`{n}` ranges over {what}" for n, what in zip(names, sets))
                raise EvalError(err.code, err.message, err.span,
                                f"the reward's indices are positional: {roles}") from None
            raise
        if not bool(torch.isfinite(r).all()):
            span, hint = _not_finite_at(reward.value, scope, mdp if len(names) == 3 else None)
            raise EvalError("E305", "the follower's reward is NaN or infinite at the initial "
                            "point" + (", first here" if span is not reward.value.span else ""),
                            span, hint)
        self.lower = info

    def _upper(self, decl: ir.UpperDecl) -> None:
        if self.deep is not None:
            self.preferences = preference_objective(decl, self.deep, self._value)
            self.upper = decl
            return
        scope = self._scope(self.var.x0 if self.var is not None else None)
        mdp = self.lower.mdp if self.lower is not None else self.follower
        if mdp is not None:
            scope.policy_ref = PolicyRef(mdp)
            scope.policy = torch.full((mdp.states.size, mdp.actions.size),
                                      1.0 / mdp.actions.size, dtype=DTYPE)
        elif decl.features:
            if self.program.first(ir.LowerDecl) is not None:
                raise Cascade()  # the lower block failed and has been reported
            use = ir.first_policy_use(decl.objective)
            raise EvalError("E501", "the objective uses the follower's policy, but no `lower` "
                            "block defines a follower", use.span if use else decl.objective.span,
                            "add `lower M { temperature = ...  reward[s, a] = ... }`")
        scope.exact_trajectories = False
        v = evaluate_val(decl.objective, scope)
        self._check_sampled_terms(decl.objective)
        if v.axes or v.dims:
            raise EvalError("E306", f"the objective must be a single number, but it is "
                            f"{v.describe_shape()}" + (f" over index `{v.axes[0]}`" if v.axes
                                                       else ""),
                            decl.objective.span,
                            "sum it, e.g. `sum {s in M.S} ...`, or take a norm")
        # (sampled terms count as 0 here: `1 / expected_return(...)` is finite where solved)
        if not bool(torch.isfinite(v.t).all()) and self.var is not None \
                and decl.form != ir.TRAJECTORY:
            span, hint = _not_finite_at(decl.objective, scope, mdp)
            policy = " with the uniform policy" if decl.features else ""
            self.upper_not_finite = Diagnostic(
                "W502", f"the objective is {'NaN' if bool(v.t.isnan().any()) else 'infinite'} "
                f"at the initial `{self.var.name}`{policy}"
                + (", first here" if span is not decl.objective.span else "")
                + ": a solve stops at its first iteration", span, hint, severity="warning")
        self.upper = decl

    def _check_sampled_terms(self, objective: ir.Expr) -> None:
        """What a sampled term's tables may depend on: the oracle's `truth` on nothing that
        moves (it labels the pairs once drawn), a `model` or `reward` on `x` but not on the
        policy (the trajectories come from it)."""
        seen, stack, calls = set(), [objective], []
        while stack:
            for node in ir.walk(stack.pop()):
                if isinstance(node, ir.Call) and node.function in ir.TRAJECTORY_FUNCTIONALS:
                    calls.append(node)
                let = self.names.get(node.id) if isinstance(node, ir.Name) else None
                if isinstance(let, LetDef) and node.id not in seen:
                    seen.add(node.id)
                    stack.append(let.decl.value)
        for call in calls:
            tables = {k.name: k.value for k in call.keywords}
            if call.function == "expected_return" and len(call.args) > 2:
                tables["reward"] = call.args[2]
            for name in ("scale", "noise", "horizon", "pairs"):
                if name in tables and id(tables[name]) in varying_nodes([tables[name]],
                                                                        self.names):
                    raise EvalError("E305", f"`{name}` of `{call.function}` cannot depend on the "
                                    "variable or the policy", tables[name].span,
                                    "a number, or a param")
            truth = tables.pop("truth", None)
            if truth is not None and id(truth) in varying_nodes([truth], self.names):
                raise EvalError("E305", "the oracle's reward `truth` cannot depend on the "
                                "variable or the policy: it labels the sampled pairs",
                                truth.span, "use a param or the MDP's reward, e.g. `truth = "
                                f"{_source_text(call.args[0])}.R`")
            for name in ("model", "reward"):
                use = _policy_use(tables[name], self.policy_lets) if name in tables else None
                if use is not None:
                    raise EvalError("E501", f"the `{name}` of `{call.function}` cannot use the "
                                    "follower's policy: its trajectories are the policy's",
                                    use.span, "a reward table in `x` and params only")

    def _solve(self, decl: ir.SolveDecl) -> None:
        options: dict[str, Any] = {}
        spans: dict[str, ir.Span] = {}
        value_spans: dict[str, ir.Span] = {}
        for kw in decl.options:
            value = kw.value
            if isinstance(value, ir.Name) and value.id not in self.names \
                    and value.id not in CONSTANTS:
                options[kw.name] = value.id  # a bare word: a choice such as `fixed_point`
            elif isinstance(value, ir.String):
                options[kw.name] = value.value
            else:
                v = evaluate_val(value, self._scope())
                if v.axes or v.dims:
                    raise EvalError("E803", f"option `{kw.name}` must be a single value",
                                    value.span)
                number = float(v.t)
                options[kw.name] = int(number) if v.kind == "int" else number
            spans[kw.name] = kw.span
            value_spans[kw.name] = value.span
        if self.catalog is not None:
            for code, message, option, hint in self.catalog(decl.solver, options):
                at = value_spans if code in VALUE_CODES else spans
                span = at.get(option, decl.solver_span) if option else decl.solver_span
                self.bag.error(code, message, span, hint)
        if decl.device is not None and decl.device not in DEVICES:
            # reported without stopping, so that errors in the solver and options show too
            hint = ("an NVIDIA GPU is `cuda`" if decl.device.lower() in ("gpu", "nvidia")
                    else did_you_mean(decl.device, DEVICES) or "use cpu, cuda or auto")
            self.bag.error("E305", f"unknown device `{decl.device}`", decl.device_span, hint)
        self.solve = SolveInfo(decl, decl.solver, options, decl.device)

    def _check(self, decl: ir.CheckDecl) -> None:
        x = self.var.x0 if self.var is not None else None
        scope = self._scope(x)
        v = evaluate_val(decl.condition, scope)
        self.checks += 1
        truth = (v.t != 0) & ~v.t.isnan()  # NaN is neither true nor false: it fails
        if bool(truth.all()):
            return
        if self.stand_ins & ir.names_in(decl.condition):
            raise Cascade()  # it read a stand-in for a value already reported as wrong
        notes: list[str] = []
        hint = None
        cond = decl.condition
        if isinstance(cond, ir.Binary) and cond.op in ("==", "!=", "<", "<=", ">", ">="):
            sides = [evaluate_val(node, scope) for node in (cond.left, cond.right)]
            shown = [_show(side) for side in sides]
            if any(bool(side.t.isnan().any()) for side in sides):
                hint = "a side is NaN (not a number: 0/0, log of a negative, ...), which " \
                       "compares false with everything, itself included"
            elif shown[0] == shown[1]:  # apart only in the last digits: show them all
                shown = [_show(side, exact=True) for side in sides]
                if cond.op == "==":
                    hint = "numbers computed in floating point rarely agree to the last digit: " \
                           "compare with a tolerance, e.g. `abs(a - b) <= 1e-9`"
            notes += [f"left side = {shown[0]}", f"right side = {shown[1]}"]
        if bool(v.t.isnan().any()):
            notes.append("the condition is NaN (not a number) where it fails")
        if v.t.numel() > 1:
            failing = int((~truth).sum())
            notes.append(f"{failing} of {v.t.numel()} elements are false")
        message = "check failed" + (f": {decl.message}" if decl.message else "")
        raise EvalError("E702", message, decl.condition.span, hint, tuple(notes))


def _outside_its_reduction(name: str, span: ir.Span, stmt: object) -> str | None:
    """Why an index of a reduction earlier in the statement is undefined here: a reduction's
    body is a product (as in AMPL), so `sum {k in K} a[k] + b[k]` ends before the `+`."""
    for node in ir.walk(stmt):
        if isinstance(node, ir.Reduction) and any(b.name == name for b in node.binders) and (
                (node.span.end_line, node.span.end_column) <= (span.line, span.column)):
            return (f"`{name}` belongs to the `{node.op}` at {node.span.line}:"
                    f"{node.span.column}, whose body ends before here (it is a product); "
                    f"write `{node.op} {{{name} in ...}} (... + ...)`")
    return None


def _all_finite(t: torch.Tensor) -> bool:
    """``torch.isfinite(t).all()``, without three tensor operations for a single number."""
    return math.isfinite(t.item()) if t.dim() == 0 else bool(torch.isfinite(t).all())


_CHILD_FIELDS: dict[type, tuple[str, ...]] = {ir.NumberArray: ()}  # its numbers are no nodes


def _uses_policy(expr: ir.Expr, policy_lets: set[str]) -> bool:
    return _policy_use(expr, policy_lets) is not None


def _source_text(node: ir.Expr) -> str:
    return node.id if isinstance(node, ir.Name) else "M"


def _policy_use(expr: ir.Expr, policy_lets: set[str]) -> ir.Expr | None:
    """A node of `expr` that uses the follower's policy: `policy`, a policy functional, or a
    `let` in `policy_lets`.  One walk that stops at the first use (what ir.objective_features
    and ir.names_in together tell, for a tenth of the time)."""
    stack: list[Any] = [expr]
    while stack:
        node = stack.pop()
        kind = type(node)
        if kind is ir.Name:
            if node.id == "policy" or node.id in policy_lets:
                return node
            continue
        if kind is ir.Call and node.function in FUNCTIONALS:
            return node
        fields = _CHILD_FIELDS.get(kind)
        if fields is None:
            fields = _CHILD_FIELDS[kind] = tuple(
                name for name in getattr(kind, "__dataclass_fields__", ()) if name != "span")
        for name in fields:
            value = getattr(node, name)
            if type(value) is tuple:
                stack.extend(value)
            elif hasattr(value, "__dataclass_fields__"):
                stack.append(value)
    return None


def out_of_memory(exc: BaseException) -> bool:
    """numpy's MemoryError, or torch's failure to allocate a tensor (a RuntimeError)."""
    return isinstance(exc, MemoryError) or "allocate" in str(exc) or "out of memory" in str(exc)


def _label(s: SetValue, position: int) -> str:
    if s.members is not None:
        return s.members[position]
    return str(position + s.start)


def _show(v: Val, exact: bool = False) -> str:
    """A value for a note: a few digits, or with ``exact`` the shortest that give it back."""
    t = v.t.detach().cpu()

    def number(e: float, digits: int) -> str:
        return repr(e) if exact else f"{e:.{digits}g}"

    if t.numel() == 1:
        return number(float(t), 10)
    flat = ", ".join(number(float(e), 6) for e in t.reshape(-1)[:6])
    return f"[{flat}{', ...' if t.numel() > 6 else ''}]"


def _writes_infinity(node: ir.Expr, value: torch.Tensor) -> bool:
    """Infinities that the expression asks for with `inf` (`[1, inf]`, `if i == 0 then 1 else
    inf`), not ones that overflow or come from a data file, and no NaN."""
    return "inf" in ir.names_in(node) and not bool(torch.isnan(value).any())


def _draw(f: str, args: list[Val], node: ir.Call, rng: np.random.Generator,
          axes: tuple[str, ...], shape: tuple[int, ...], per_element: bool) -> Val:
    expected = {"normal": 2, "uniform": 2, "bernoulli": 1}[f]
    if len(args) != expected:
        sig = {"normal": "normal(mean, std)", "uniform": "uniform(low, high)",
               "bernoulli": "bernoulli(p)"}[f]
        raise EvalError("E305", f"`{f}` takes {expected} argument{'s' if expected > 1 else ''}: "
                        f"{sig}", node.span)
    for a, arg_node in zip(args, node.args):
        if a.dims or a.axes:
            raise EvalError("E301", f"the arguments of `{f}` must be single numbers",
                            arg_node.span)
    p = [float(a.t) for a in args]
    if f == "normal":
        if p[1] < 0:
            raise EvalError("E305", "a standard deviation cannot be negative", node.args[1].span)
        sample = rng.normal(p[0], p[1], size=shape)
    elif f == "uniform":
        if p[1] < p[0]:
            raise EvalError("E305", "uniform(low, high) needs low <= high", node.span)
        sample = rng.uniform(p[0], p[1], size=shape)
    else:
        if not 0 <= p[0] <= 1:
            raise EvalError("E305", "bernoulli(p) needs 0 <= p <= 1", node.args[0].span)
        sample = (rng.random(size=shape) < p[0]).astype(np.float64)
    t = torch.as_tensor(np.asarray(sample, dtype=np.float64))
    if per_element:
        return Val(t, axes, ())
    return Val(t, (), (None,) * len(shape))


def lower_reward(info: LowerInfo, scope: Scope) -> torch.Tensor:
    """The follower's reward table r_x (S, A) in the scope's variable value (differentiable).

    A next-state reward is averaged over ``t`` term by term: ``E_t[a + b] = E_t[a] + E_t[b]``,
    so that in ``x[t] + R[s, a]`` the part in ``t`` alone is one product with ``P`` and the
    part without ``t`` is scaled by the row sums (on a 1,100-state sparse MDP: 0.4 against
    36 ms for the ``S x A x S`` table). A term in ``t`` and ``s`` or ``a`` together is
    evaluated, with sparse ``P``, on ``P``'s nonzeros only (``_on_transitions``); with dense
    ``P`` its table is ``P``'s size."""
    mdp = info.mdp
    sets = (mdp.states, mdp.actions, mdp.states)[: len(info.indices)]
    sizes = {}
    for name, s in zip(info.indices, sets):
        scope.indices[name] = Binding(name, s, scope.device)
        sizes[name] = s.size
    if len(info.indices) == 2:
        return as_real(expand_axes(_reward_value(info, info.reward, scope, sets), info.indices,
                                   sizes))
    s, a, t = info.indices
    P = mdp.transitions.to(scope.device)
    total = None
    for sign, term in _summands(info.reward):
        if P.is_sparse and t in (used := ir.names_in(term)) and (s in used or a in used):
            part = _on_transitions(info, term, scope, P, sets)
        elif set((v := _reward_value(info, term, scope, sets)).axes) <= {t}:
            part = P.expect(expand_axes(v, (t,), sizes).to(DTYPE))
        elif t not in v.axes:
            part = as_real(expand_axes(v, (s, a), sizes)) * P.row_sums()
        else:
            part = expected_over_next(P, expand_axes(v, info.indices, sizes).to(DTYPE))
        part = part if sign > 0 else -part
        total = part if total is None else total + part
    return total


# the one axis that a term's (s, a, t) share when evaluated on P's nonzeros (not a name a
# file can write)
_TRANSITION_AXIS = "(s, a, t)"


def _on_transitions(info: LowerInfo, term: ir.Expr, scope: Scope, P: Transitions,
                    sets: tuple) -> torch.Tensor:
    """``sum_t P[s, a, t] v(s, a, t)`` for one term of the follower's reward, on sparse P's
    nonzeros only (``over_next_on_transitions``)."""
    return over_next_on_transitions(
        P, info.indices, sets, scope,
        lambda inner: _reward_value(info, term, inner, sets, shared=_TRANSITION_AXIS))


def over_next_on_transitions(P: Transitions, names: tuple[str, ...], sets: tuple,
                             scope: Scope, value: Callable[[Scope], Val | None]
                             ) -> torch.Tensor | None:
    """``sum_t P[s, a, t] v(s, a, t)`` with ``v = value(scope)`` evaluated at the nonzeros of a
    sparse ``P`` only: the three indices ``names`` walk the stored triples together, along one
    axis, so a 10^4-state maze needs 1.6 * 10^5 values where the full table had 4 * 10^8.
    None where ``value`` gives None (it declines the term)."""
    rows, cols, values = P.coo()
    A = P.n_actions
    at = (torch.div(rows, A, rounding_mode="floor"), rows % A, cols)
    inner = scope.copy()
    inner.indices = {**scope.indices, **{
        name: Binding(_TRANSITION_AXIS, index_set, scope.device, positions)
        for name, index_set, positions in zip(names, sets, at)}}
    v = value(inner)
    if v is None:
        return None
    along = expand_axes(v, (_TRANSITION_AXIS,), {_TRANSITION_AXIS: rows.numel()})
    terms = values * as_real(along)
    out = torch.zeros(P.n_states * A, dtype=terms.dtype, device=terms.device)
    return out.index_add(0, rows, terms).reshape(P.n_states, A)


_NOT_FINITE_HINTS = {
    "log": "`log` is -inf at 0 and NaN below it",
    "sqrt": "`sqrt` is NaN below 0",
    "exp": "`exp` overflows to inf above 709",
    "/": "a division by 0 (inf, or NaN for 0 / 0)",
    "^": "a negative number to a fractional power (NaN), or 0 to a negative one (inf)",
    "*": "0 times inf is NaN",
    "+": "inf + (-inf) is NaN",
    "-": "inf - inf is NaN",
    "sum": "its terms are not all finite (those that a filter leaves out do not count)",
}
# above this many entries of S x A x S, where a NaN first appears is not looked for: the search
# evaluates every sub-expression whole (a reward in (s, a, t) as a table, sums as products),
# which the ordinary paths avoid
_ORIGIN_ENTRIES = 1 << 22


def _not_finite_at(root: ir.Expr, scope: Scope, mdp: MdpValue | None
                   ) -> tuple[ir.Span, str | None]:
    """Where in `root` (evaluated in `scope`) a NaN or an infinity first appears, and what
    makes one there: the place to point at and a hint; `root` itself, unsearched, where `mdp`
    is too large to evaluate its sub-expressions whole."""
    if mdp is not None and mdp.states.size ** 2 * mdp.actions.size > _ORIGIN_ENTRIES:
        return root.span, None
    origin = not_finite_origin(root, scope)
    if origin is None:
        return root.span, None
    if type(origin) in (ir.Name, ir.Index, ir.Attribute):
        return origin.span, "this value is not finite here: where does it come from?"
    key = origin.function if type(origin) is ir.Call else getattr(origin, "op", None)
    said = _NOT_FINITE_HINTS.get(key)
    return origin.span, said or "the operation makes a NaN or an infinity here"


def _first_not_finite(name: str, v: Val) -> str:
    """`b[1] is NaN`: the first entry that is not finite, and what it is."""
    t = v.t.detach()
    k = int(torch.nonzero(~torch.isfinite(t.reshape(-1)))[0])
    entry = float(t.reshape(-1)[k])
    where = f"{name}[{', '.join(map(str, np.unravel_index(k, t.shape)))}]" if t.dim() else name
    return f"{where} is {'NaN' if math.isnan(entry) else f'{entry:g}'}"


def _literal_numbers(node: ir.Expr | None) -> bool:
    """A number or a list of numbers written out, which a decimal point would make real."""
    if isinstance(node, ir.Unary):
        return _literal_numbers(node.operand)
    if isinstance(node, ir.ArrayLiteral):
        return all(_literal_numbers(item) for item in node.items)
    return isinstance(node, (ir.Number, ir.NumberArray))


def _summands(node: ir.Expr) -> list[tuple[int, ir.Expr]]:
    """A sum and difference of terms as ``(sign, term)`` pairs, left to right."""
    if isinstance(node, ir.Binary) and node.op in ("+", "-"):
        right = [(sign if node.op == "+" else -sign, term) for sign, term in _summands(node.right)]
        return _summands(node.left) + right
    if isinstance(node, ir.Unary) and node.op in ("+", "-"):
        return [(sign if node.op == "+" else -sign, term) for sign, term in _summands(node.operand)]
    return [(1, node)]


def _reward_value(info: LowerInfo, node: ir.Expr, scope: Scope, sets: tuple,
                  shared: str | None = None) -> Val:
    """One number per index tuple: what the reward (or one of its terms) must give; with
    ``shared``, the axis its indices walk together (``_on_transitions``)."""
    v = evaluate_val(node, scope)
    stray = [a for a in v.axes if a not in (info.indices if shared is None else (shared,))]
    if stray:
        raise EvalError("E302", f"index `{stray[0]}` is not bound here", node.span)
    if v.dims:
        named = v if shared is None else Val(v.t, tuple(
            name for name in info.indices if name in ir.names_in(node)), v.dims)
        raise EvalError("E301", f"the reward must be one number for each (s, a), but here it "
                        f"is {v.describe_shape()}", node.span,
                        _reward_index_hint(node, named, dict(zip(info.indices, sets))))
    return v


def _reward_index_hint(node: ir.Expr, v: Val, indices: dict[str, SetValue]) -> str:
    """Name the reward's unused indices that would index the dimensions left over, and write
    the indexed expression out when it is a plain `name[i, ...]`."""
    unused = [name for name in indices if name not in v.axes]
    fill = []
    for dim in v.dims:
        match = next((n for n in unused if dim is not None and indices[n].name == dim.name), None)
        if match is None:
            return (f"index it with the reward's indices (`...[{', '.join(indices)}]`), or "
                    "reduce it (`norm(...)`, `sum {...} ...`)")
        unused.remove(match)
        fill.append(match)
    names = ", ".join(f"`{n}`" for n in fill)
    hint = f"index it with {names}" if len(fill) == len(indices) else \
        f"index its {'last dimension' if len(fill) == 1 else 'other dimensions'} with {names} too"
    if isinstance(node, ir.Name) or isinstance(node, ir.Index) and isinstance(
            node.base, ir.Name) and all(isinstance(i, ir.Name) for i in node.indices):
        name = node.id if isinstance(node, ir.Name) else node.base.id
        given = [] if isinstance(node, ir.Name) else [i.id for i in node.indices]
        hint += f": `{name}[{', '.join(given + fill)}]`"
    return hint + ", or reduce it (`sum {...} ...`)"


def elaborate(
    program: ir.Program,
    source: SourceFile,
    base_dir: Path | None = None,
    overrides: dict[str, ir.Expr] | None = None,
    seed: int | None = None,
    solver_catalog: SolverCatalog | None = None,
) -> CheckedProgram:
    return _Elaborator(program, source, base_dir, overrides or {}, seed, solver_catalog).run()


