"""The lowered problem instance: what every tabular solver consumes.

Solvers see only this object (tensors and differentiable callables), never the IR or Lark.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .ir import POLICY_FUNCTIONAL
from .softmdp import Transitions


@dataclass(frozen=True)
class GridLayout:
    """Where each state of a grid world sits, for pictures of policies and goals."""

    rows: int
    cols: int
    cells: tuple[tuple[int, int], ...]  # (row, col) of each state, in state order
    walls: tuple[tuple[int, int], ...]
    start: int
    goal: int
    action_names: tuple[str, ...]
    action_moves: tuple[tuple[int, int], ...]  # (d_row, d_col) of each action


@dataclass(frozen=True)
class TrajectoryTerm:
    """One expectation over sampled trajectories in the upper objective (MATH.md, Section 5).

    The minimised objective is ``sum(term.coefficient * E[l_term]) + policy_free(x)``.
    ``expected_return``: ``l = sum_{t<H} gamma^t reward_x(s_t, a_t)`` over trajectories of the
    upper MDP. ``preference_loss``: ``l = BCE(y, sigmoid(R_x(xi1) - R_x(xi2)))`` over pairs, with
    ``R_x(xi) = sum_t model_x(s_t, a_t)`` and ``y ~ Bernoulli(sigmoid(scale * (R_true(xi1) -
    R_true(xi2))))`` flipped with probability ``noise``.
    """

    kind: str  # "expected_return" | "preference_loss"
    coefficient: float
    transitions: Transitions  # the upper MDP's dynamics (sub-stochastic into terminal states)
    initial: torch.Tensor  # (S,)
    discount: float
    horizon: int
    reward: Callable[[torch.Tensor], torch.Tensor]  # x -> (S, A): return reward, or reward model
    truth: torch.Tensor | None = None  # (S, A): the oracle's reward (preference_loss)
    pairs: int = 64
    scale: float = 1.0
    noise: float = 0.0


@dataclass
class TabularProblem:
    """A bilevel problem over one tabular lower MDP, lowered onto a device.

    ``objective(x, pi)`` is always to be *minimised*: a ``maximize`` objective is negated here and
    ``sense`` records it, so solvers need no sign logic; reports multiply by ``sign``.
    """

    name: str
    transitions: Transitions  # P of the lower MDP; rows into terminal states are sub-stochastic
    discount: float
    initial: torch.Tensor  # (S,) initial-state distribution
    temperature: float
    reward: Callable[[torch.Tensor], torch.Tensor]  # x -> r_x, shape (S, A), differentiable in x
    objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, pi) -> scalar
    x0: torch.Tensor  # initial value of the decision variable (its declared shape)
    var_name: str = "x"
    sense: str = "minimize"
    form: str = POLICY_FUNCTIONAL
    features: frozenset[str] = frozenset()  # e.g. {"value", "occupancy", "expected_return"}
    lower_bound: torch.Tensor | None = None  # broadcastable to x0.shape
    upper_bound: torch.Tensor | None = None
    solver: str | None = None  # from the file's `solve` statement
    solver_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    grid: GridLayout | None = None
    # The objective's trajectory form, for model-free solvers: `trajectory_terms` plus the
    # policy-free rest; None when the objective is not such a linear combination.
    trajectory_terms: tuple[TrajectoryTerm, ...] | None = None
    policy_free: Callable[[torch.Tensor], torch.Tensor] | None = None
    # where the objective's iterative solves (`value(...)`, `occupancy(...)`) keep their last
    # answers to start the next ones from; cleared for a run of its own, or for evaluations
    # that must not depend on what came before (the finite differences of gradcheck)
    warm_starts: dict = field(default_factory=dict, repr=False, compare=False)

    def cold_solves(self) -> None:
        """Forget the last solves: the next evaluations start from zero, as a fresh problem's."""
        self.warm_starts.clear()

    @property
    def n_states(self) -> int:
        return self.transitions.n_states

    @property
    def n_actions(self) -> int:
        return self.transitions.n_actions

    @property
    def device(self) -> torch.device:
        return self.x0.device

    @property
    def sign(self) -> float:
        """Multiply a minimised objective by this to report it in the user's sense."""
        return -1.0 if self.sense == "maximize" else 1.0

    @property
    def bounded(self) -> bool:
        """Whether ``x`` has box bounds (``project`` is the identity otherwise)."""
        return self.lower_bound is not None or self.upper_bound is not None

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Euclidean projection onto the variable's box bounds (identity without bounds)."""
        if self.bounded:
            x = torch.clamp(x, min=self.lower_bound, max=self.upper_bound)
        return x
