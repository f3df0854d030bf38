"""Runtime values of the interpreter: sets, arrays with named index axes, MDPs.

An array value (`Val`) is a torch tensor whose *leading* dimensions are free index names
(``axes``, e.g. ``s`` and ``a`` while evaluating ``reward[s, a] = ...``) and whose *trailing*
dimensions are positional (``dims``, each optionally tied to the set it is indexed by).  Binary
operations align axes by name and broadcast trailing dimensions, so an expression written per
element runs as whole-tensor operations: no Python loop over states or actions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from .diagnostics import did_you_mean
from .instance import GridLayout
from .ir import Span
from .softmdp import Transitions

DTYPE = torch.float64


class EvalError(Exception):
    """A located error found while evaluating; elaboration turns it into a Diagnostic."""

    def __init__(
        self,
        code: str,
        message: str,
        span: Span | None,
        hint: str | None = None,
        notes: tuple[str, ...] = (),
        also: tuple[EvalError, ...] = (),
    ):
        super().__init__(message)
        self.code = code
        self.message = message
        self.span = span
        self.hint = hint
        self.notes = notes
        self.also = also  # more independent errors found in the same place, reported too


def by_name(entries: list[tuple[str, Span, Any]], allowed: tuple[str, ...], unknown: str,
            known: str) -> tuple[dict[str, Any], list[EvalError]]:
    """Options or block parts ``(name, span, entry)`` by name, and an error for every unknown
    or repeated one (``unknown``: "`gym` has no option"; ``known``: the hint without a close
    name), so that a file's every misspelling is reported at once."""
    found: dict[str, Any] = {}
    errors: list[EvalError] = []
    for name, span, entry in entries:
        if name not in allowed:
            errors.append(EvalError("E404", f"{unknown} `{name}`", span,
                                    did_you_mean(name, allowed) or known))
        elif name in found:
            errors.append(EvalError("E202", f"`{name}` is given twice", span))
        else:
            found[name] = entry
    return found, errors


class Cascade(EvalError):
    """Raised on use of a name whose own declaration failed: that error is already reported."""

    def __init__(self) -> None:
        super().__init__("E000", "cascade", None)


POISONED = object()  # stands for a declaration that failed to elaborate

DENSE_INDEXING_LIMIT = 50_000_000  # entries of P beyond which `M.P[s, a, t]` is refused


@dataclass(frozen=True, eq=False)
class SetValue:
    """A finite index set.  Identity matters: indexing checks compare sets by identity."""

    name: str
    size: int
    members: tuple[str, ...] | None = None  # named members, in order
    start: int = 0  # numeric value of the first element (`1..5` starts at 1)
    is_range: bool = False  # a range of integers (`0..4`, `set K = 1..3`), not members or an MDP's

    def describe(self) -> str:
        return f"`{self.name}` ({self.size} elements)"

    def member_position(self, name: str) -> int | None:
        return self._positions.get(name) if self.members is not None else None

    @cached_property
    def _positions(self) -> dict[str, int]:
        """Member name -> position: a file that names a member per line of a set of 10^4 took a
        scan of the members for each."""
        return {member: i for i, member in enumerate(self.members or ())}


@dataclass
class Val:
    """A tensor value: leading dims are the named ``axes``, trailing dims are ``dims``."""

    t: torch.Tensor
    axes: tuple[str, ...] = ()
    dims: tuple[SetValue | None, ...] = ()
    kind: str = "real"  # "real", "int" or "bool"
    index_set: SetValue | None = None  # set when this is a bare index variable
    member_of: tuple[SetValue, ...] = ()  # the sets of a bare member (`left`, `A.left`)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.t.shape[len(self.axes) :])

    def describe_shape(self) -> str:
        if not self.dims:
            return "a scalar"
        parts = [d.name if d is not None else str(n) for d, n in zip(self.dims, self.shape)]
        return "shape [" + ", ".join(parts) + "]"


@dataclass
class MdpValue:
    """A tabular MDP as declared: the full stochastic ``P`` and which states are terminal."""

    name: str
    states: SetValue
    actions: SetValue
    transitions: Transitions  # rows are distributions (terminal rows may be zero)
    reward: torch.Tensor  # (S, A) expected immediate reward
    initial: torch.Tensor  # (S,)
    discount: float
    terminal: torch.Tensor  # (S,) bool
    extras: dict[str, Val] = field(default_factory=dict)
    grid: GridLayout | None = None
    _dynamics: Transitions | None = field(default=None, repr=False)
    _dense: torch.Tensor | None = field(default=None, repr=False)

    def dense_transitions(self, span: Span | None) -> torch.Tensor:
        """P as a dense (S, A, S) tensor, for expressions that index it entry by entry."""
        if self._dense is None:
            S, A = self.states.size, self.actions.size
            if S * A * S > DENSE_INDEXING_LIMIT:
                raise EvalError(
                    "E301", f"`{self.name}.P` has {S * A * S:,} entries: too many to index one "
                    "by one", span,
                    "in a `lower` block, write the reward over the next state instead: "
                    "`reward[s, a, t] = ...` is averaged over t ~ P(.|s, a) without forming P "
                    "densely; elsewhere, the policy functionals (value, occupancy, "
                    "expected_return) apply P without forming it")
            self._dense = self.transitions.dense()
        return self._dense

    def dynamics(self) -> Transitions:
        """P with the mass that enters a terminal state removed: the episode ends there."""
        if self._dynamics is None:
            if not bool(self.terminal.any()):
                self._dynamics = self.transitions
            else:
                keep = (~self.terminal).to(DTYPE)
                rows, cols, values = self.transitions.coo()
                values = values * keep[cols] * keep[rows // self.actions.size]
                mask = values != 0
                self._dynamics = Transitions.from_coo(
                    rows[mask], cols[mask], values[mask], self.states.size, self.actions.size
                ) if self.transitions.is_sparse else Transitions.from_dense(
                    self.transitions.dense() * keep[None, None, :] * keep[:, None, None]
                )
        return self._dynamics

    def to(self, device: torch.device) -> MdpValue:
        return MdpValue(
            self.name,
            self.states,
            self.actions,
            self.transitions.to(device),
            self.reward.to(device),
            self.initial.to(device),
            self.discount,
            self.terminal.to(device),
            {k: Val(v.t.to(device), v.axes, v.dims, v.kind) for k, v in self.extras.items()},
            self.grid,
            self.dynamics().to(device),
        )


@dataclass(frozen=True)
class TableSets:
    """A table MDP while its own parts are evaluated: only its sets exist yet, so that
    `transition` can say `a == buy` or `a == inv.A.buy` for an inline action set."""

    name: str
    states: SetValue
    actions: SetValue


@dataclass(frozen=True)
class PolicyRef:
    """The follower's policy: a name that is only bound while evaluating the upper level."""

    mdp: MdpValue


class Names(dict):
    """A file's names, which also keep its sets by the name they are declared under: a bare
    member (``left``) is looked up in every set, and scanning every declaration for each made
    a file with thousands of such uses, or of undefined names, quadratic. Assign with
    ``names[key] = value``, which keeps the index."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sets: dict[str, tuple[tuple[str, SetValue], ...]] = {}
        for key, value in self.items():
            self._index(key, value)

    def __setitem__(self, key: str, value: object) -> None:
        super().__setitem__(key, value)
        self._index(key, value)

    def __reduce__(self) -> tuple:  # a copy or pickle rebuilds the index from the names
        return (Names, (dict(self),))

    def _index(self, key: str, value: object) -> None:
        labelled = labelled_sets(key, value)
        if labelled:
            self.sets[key] = labelled
        else:
            self.sets.pop(key, None)


def labelled_sets(key: str, value: object) -> tuple[tuple[str, SetValue], ...]:
    """The sets that the name ``key`` declares, each as a file writes it (``Colors``, ``M.S``)."""
    if isinstance(value, SetValue):
        return ((key, value),)
    if isinstance(value, (MdpValue, TableSets)):
        return ((f"{key}.S", value.states), (f"{key}.A", value.actions))
    return ()
