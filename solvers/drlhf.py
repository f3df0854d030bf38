"""DRLHF: the decoupled RLHF baseline, with no implicit (follower's-response) term.

Alternates fitting the reward model to preferences and solving the follower: each outer
iteration improves the follower's policy for the current reward model (a few warm-started
iterations, as in sobirl), samples and labels ``B`` trajectory pairs from it, adds them to the
preference dataset (the last ``queue`` pairs), and takes a gradient step on the Bradley-Terry
loss over the dataset with the policy held fixed, i.e. only term (12) of MATH.md's model-free
hyper-gradient. It is what sobirl and stoc_sobirl add term (13) to.
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


def setup(problem: TabularProblem, options: dict[str, Any]) -> tuple[Follower, Direction]:
    """The follower and the reward-fitting direction (``outer_loop`` runs them)."""
    env = Environment.of(problem, options)
    streams = Streams(problem.seed, problem.device)
    follower = Follower(problem, env, options, streams.rollouts)
    data = preference_data(problem, options)

    def direction(k: int, x: torch.Tensor, pi: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        e = estimate(problem, env, x, pi, options, streams, score=False, data=data)
        return e.grad, e.objective, float(torch.linalg.vector_norm(e.grad))

    return follower, direction


def run(problem: TabularProblem, options: dict[str, Any], monitor: Monitor) -> SolveResult:
    """Alternating reward fitting and follower improvement from ``x0`` and the uniform policy."""
    return outer_loop(problem, options, monitor, *setup(problem, options))


# rollouts, rollout_horizon: for the sampled follower; share, baseline: unused (no term 13)
_ESTIMATOR = ESTIMATOR_OPTIONS

SPEC = SolverSpec(
    name="drlhf",
    aliases=("rlhf", "decoupled_rlhf"),
    summary="decoupled RLHF baseline: alternate reward-model fitting on sampled preference "
            "pairs and follower improvement, without the implicit term",
    capabilities=Capabilities(
        model_based=False,
        environments=frozenset({"tabular"}),
        forms=frozenset({TRAJECTORY}),
        features=frozenset({"policy", "preference_loss"}),
        devices=frozenset({"cpu", "cuda"}),
        needs_linear_terms=True,
    ),
    options=(
        Option("outer", int, 200, "outer iterations K", valid="[1, inf)"),
        Option("beta", float, 0.05, "step size on x", valid="(0, inf)"),
        *LOOP_OPTIONS,
        *_ESTIMATOR,
    ),
    run=run,
)
