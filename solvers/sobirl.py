"""SoBiRL (the paper's Algorithm 1): model-free hyper-gradient descent on trajectory objectives.

Each outer iteration runs a few warm-started iterations of the follower's solver (policy mirror
descent on sampled soft Q estimates, or soft Bellman steps with ``follower = exact``) to get
``pi_k``, then steps ``x <- project(x - beta h_k)`` with ``h_k`` the sampled hyper-gradient of
MATH.md's eqs. (12)-(13) at ``pi_k`` (``solvers.modelfree.estimate``). Only a simulator of the
MDPs and reward gradients along sampled trajectories are used: the upper objective must be a
linear combination of ``expected_return`` / ``preference_loss`` terms plus a policy-free rest.
Preference pairs are kept in a dataset (option ``queue``) that the reward model is fitted to,
as RLHF does (see ``solvers.modelfree``).

Randomness comes from generators seeded with the problem's ``seed``: the same seed gives the
same run.
"""

from __future__ import annotations

from typing import Any

import torch

from bilevel_dsl.instance import TabularProblem
from bilevel_dsl.ir import TRAJECTORY

from .modelfree import (
    ESTIMATOR_OPTIONS,
    LOOP_OPTIONS,
    Direction,
    Environment,
    Follower,
    Streams,
    estimate,
    outer_loop,
    preference_data,
)
from .registry import Capabilities, Option, SolverSpec
from .result import Monitor, SolveResult

MODEL_FREE = Capabilities(
    model_based=False,
    environments=frozenset({"tabular"}),
    forms=frozenset({TRAJECTORY}),
    features=frozenset({"policy", "expected_return", "preference_loss"}),
    devices=frozenset({"cpu", "cuda"}),
    needs_linear_terms=True,
)


def setup(problem: TabularProblem, options: dict[str, Any]) -> tuple[Follower, Direction]:
    """Algorithm 1's follower and step direction (``outer_loop`` runs them)."""
    env = Environment.of(problem, options)
    streams = Streams(problem.seed, problem.device)
    follower = Follower(problem, env, options, streams.rollouts)
    data = preference_data(problem, options)

    def direction(k: int, x: torch.Tensor, pi: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        e = estimate(problem, env, x, pi, options, streams, data=data)
        return e.grad, e.objective, float(torch.linalg.vector_norm(e.grad))

    return follower, direction


def run(problem: TabularProblem, options: dict[str, Any], monitor: Monitor) -> SolveResult:
    """Algorithm 1 from ``x0`` and the uniform policy."""
    return outer_loop(problem, options, monitor, *setup(problem, options))


SPEC = SolverSpec(
    name="sobirl",
    aliases=("algorithm1",),
    summary="SoBiRL (Algorithm 1): model-free hyper-gradient descent from sampled trajectories "
            "and rollouts, a few follower iterations per step",
    capabilities=MODEL_FREE,
    options=(
        Option("outer", int, 200, "outer iterations K", valid="[1, inf)"),
        Option("beta", float, 0.05, "step size on x", valid="(0, inf)"),
        *LOOP_OPTIONS,
        *ESTIMATOR_OPTIONS,
    ),
    run=run,
)
