"""Stoc-SoBiRL (the paper's Algorithms 3 and 4): SoBiRL's estimator with STORM momentum.

Outer iteration ``k``: the follower's solver gives ``pi_k``; a sample ``xi_k`` (``B`` trajectory
tuples in the upper MDP and ``m`` rollouts of ``H'`` steps per start pair in the lower MDP) gives
``h(x_k; xi_k)`` at ``pi_k``, and the *same* sample gives ``h(x_{k-1}; xi_k)`` at ``pi_{k-1}``:
both are drawn from the same generator states (common random numbers: inverse-CDF draws from the
same uniforms, so trajectories coincide wherever the two policies agree closely). Then

    d_k     = h(x_k; xi_k) + (1 - eta_k) (d_{k-1} - h(x_{k-1}; xi_k))      (d_0 = h(x_0; xi_0))
    eta_k   = min(1, c / (k + 1)^(2/3))
    x_{k+1} = project(x_k - beta d_k)

``eta_k = 1`` is plain SoBiRL (and the replay is skipped); smaller ``eta`` averages the noise of
past samples away while the correction term tracks the drift of the hyper-gradient. Two
estimates per iteration once ``eta_k < 1``. With a preference dataset, both fit the same data
``D_k`` (the replay adds nothing to it); the replay's pairs need labels of their own wherever
they differ from the fresh pairs, and are counted as queries. ``history["hypergrad_norm"]``
records ``||d_k||``, the direction actually stepped along.
"""

from __future__ import annotations

from typing import Any

import torch

from bilevel_dsl.instance import TabularProblem

from .modelfree import (
    ESTIMATOR_OPTIONS,
    LOOP_OPTIONS,
    Direction,
    Environment,
    Follower,
    Streams,
    estimate,
    new_queries,
    outer_loop,
    preference_data,
)
from .registry import Option, SolverSpec
from .result import Monitor, SolveResult
from .sobirl import MODEL_FREE


def momentum_weight(k: int, c: float) -> float:
    """``eta_k = min(1, c / (k + 1)^(2/3))``."""
    return min(1.0, c / (k + 1) ** (2.0 / 3.0))


def setup(problem: TabularProblem, options: dict[str, Any]) -> tuple[Follower, Direction]:
    """Algorithms 3-4's follower and momentum direction (``outer_loop`` runs them)."""
    env = Environment.of(problem)
    streams = Streams(problem.seed, problem.device)
    follower = Follower(problem, env, options, streams.rollouts)
    data = preference_data(problem, options)
    state: dict[str, Any] = {"d": None, "x": None, "pi": None}

    def direction(k: int, x: torch.Tensor, pi: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        sample = streams.state()
        e = estimate(problem, env, x, pi, options, streams, data=data)
        d = e.grad
        eta = momentum_weight(k, options["momentum"])
        if state["d"] is not None and eta < 1.0:  # (eta = 1: the correction has weight 0)
            after = streams.state()
            streams.restore(sample)  # the same xi_k at the previous point
            previous = estimate(problem, env, state["x"], state["pi"], options, streams,
                                data=data, record=False)
            streams.restore(after)
            env.queries += new_queries(e, previous)
            d = e.grad + (1.0 - eta) * (state["d"] - previous.grad)
        state.update(d=d, x=x.detach().clone(), pi=pi.detach().clone())
        return d, e.objective, float(torch.linalg.vector_norm(d))

    return follower, direction


def run(problem: TabularProblem, options: dict[str, Any], monitor: Monitor) -> SolveResult:
    """Algorithms 3 and 4 from ``x0`` and the uniform policy."""
    return outer_loop(problem, options, monitor, *setup(problem, options))


SPEC = SolverSpec(
    name="stoc_sobirl",
    aliases=("stocsobirl", "algorithm3"),
    summary="Stoc-SoBiRL (Algorithms 3-4): the model-free estimator with STORM momentum",
    capabilities=MODEL_FREE,
    options=(
        Option("outer", int, 200, "outer iterations K", valid="[1, inf)"),
        Option("beta", float, 0.05, "step size on x", valid="(0, inf)"),
        Option("momentum", float, 1.0, "c in the STORM weight eta_k = min(1, c / (k+1)^(2/3)) "
               "(c >= k^(2/3) for all k: no momentum)", valid="(0, inf)"),
        *LOOP_OPTIONS,
        *ESTIMATOR_OPTIONS,
    ),
    run=run,
)
