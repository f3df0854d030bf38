"""Stoc-SoBiRL (the paper's Algorithms 3 and 4): SoBiRL's estimator with STORM momentum.

Outer iteration ``k``: the follower's solver gives ``pi_k``; a sample ``xi_k`` (``B`` trajectory
tuples in the upper MDP and ``m`` rollouts of ``H'`` steps per start pair in the lower MDP,
drawn under ``pi_k``) gives ``h(x_k; xi_k)``, and the *same* trajectories, labels and rollouts,
reweighted by the importance ratios ``prod_t pi_{k-1}(a_t|s_t) / pi_k(a_t|s_t)``, give
``h(x_{k-1}; xi_k)`` (``modelfree.estimates``), unbiased at the previous point and smooth in
``x``. Then

    d_k     = h(x_k; xi_k) + (1 - eta_k) (d_{k-1} - h(x_{k-1}; xi_k))      (d_0 = h(x_0; xi_0))
    eta_k   = min(1, max(c / (k + 1)^(2/3), sqrt(V_diff / V_h)))
    x_{k+1} = project(x_k - beta d_k)

``eta_k = 1`` is plain SoBiRL (and the replay is skipped); smaller ``eta`` averages the noise of
past samples away while the correction term tracks the drift of the hyper-gradient, but it
also adds up the noise of the replayed differences: the error settles near ``(eta^2 V_h +
V_diff) / (2 eta)``, with ``V_h`` the variance of an estimate and ``V_diff`` that of
``h(x_k; xi) - h(x_{k-1}; xi)``. The paper's schedule assumes ``V_diff`` small (a smooth
per-sample gradient and short steps); on trajectory objectives the ratios over ``H`` steps make
it as large as ``V_h`` at the default step size (docs/solvers.md has the measurements), and
the schedule alone then diverges. The ``sqrt(V_diff / V_h)`` floor (option ``adaptive``) is
the weight that minimises that error; both variances are estimated at no extra cost, from the
replay against the fresh estimate (``V_diff``) and against the previous iteration's fresh
estimate at the same point (``2 V_h``), in decayed sums. Two estimates' work per iteration once
``eta_k < 1``, but no extra queries: the replay reuses the fresh pairs and their labels. With
a preference dataset both fit the same data ``D_k``. ``history["hypergrad_norm"]`` records
``||d_k||``, the direction actually stepped along.
"""

from __future__ import annotations

import math
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
    estimates,
    outer_loop,
    preference_data,
)
from .registry import Option, SolverSpec
from .result import Monitor, SolveResult
from .sobirl import MODEL_FREE

# per iteration, the weight of the past in the noise estimates of the adaptive eta_k
NOISE_DECAY = 0.9


def momentum_weight(k: int, c: float) -> float:
    """``eta_k = min(1, c / (k + 1)^(2/3))``."""
    return min(1.0, c / (k + 1) ** (2.0 / 3.0))


def adaptive_weight(eta: float, diff: float, twice: float) -> float:
    """``max(eta, sqrt(V_diff / V_h))``, at most 1: STORM's error settles near ``(eta^2 V_h +
    V_diff) / (2 eta)``, least at ``eta = sqrt(V_diff / V_h)`` and never below plain SGD's
    ``V_h`` once ``V_diff >= V_h`` (``diff`` estimates ``V_diff``, ``twice`` ``2 V_h``)."""
    if twice <= 0.0:
        return 1.0 if diff > 0.0 else eta
    return min(1.0, max(eta, math.sqrt(2.0 * diff / twice)))


def setup(problem: TabularProblem, options: dict[str, Any],
          weights: list[float] | None = None) -> tuple[Follower, Direction]:
    """Algorithms 3-4's follower and momentum direction (``outer_loop`` runs them);
    ``weights`` receives ``eta_k`` at each iteration that replayed its sample."""
    env = Environment.of(problem, options)
    streams = Streams(problem.seed, problem.device)
    follower = Follower(problem, env, options, streams.rollouts)
    data = preference_data(problem, options)
    state: dict[str, Any] = {"d": None, "h": None, "x": None, "pi": None}
    # decayed sums of ||h(x_k; xi_k) - h(x_{k-1}; xi_k)||^2 and ||h(x_{k-1}; xi_{k-1}) -
    # h(x_{k-1}; xi_k)||^2 (two independent samples at one point: twice the variance)
    noise = {"diff": 0.0, "twice": 0.0}

    def direction(k: int, x: torch.Tensor, pi: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        eta = momentum_weight(k, options["momentum"])
        if state["d"] is None or eta >= 1.0:  # (eta = 1: the correction has weight 0)
            e = estimate(problem, env, x, pi, options, streams, data=data)
            d = e.grad
        else:  # xi_k, reweighted to the previous point
            e, replay = estimates(problem, env, [(x, pi), (state["x"], state["pi"])], options,
                                  streams, data=data)
            if options["adaptive"]:
                for key, other in (("diff", e.grad), ("twice", state["h"])):
                    change = float((other - replay.grad).square().sum())
                    noise[key] = NOISE_DECAY * noise[key] + change
                eta = adaptive_weight(eta, noise["diff"], noise["twice"])
            if weights is not None:
                weights.append(eta)
            d = e.grad + (1.0 - eta) * (state["d"] - replay.grad)
        state.update(d=d, h=e.grad, x=x.detach().clone(), pi=pi.detach().clone())
        return d, e.objective, float(torch.linalg.vector_norm(d))

    return follower, direction


def run(problem: TabularProblem, options: dict[str, Any], monitor: Monitor) -> SolveResult:
    """Algorithms 3 and 4 from ``x0`` and the uniform policy. ``extra["momentum"]`` says how
    much momentum the run had: where the adaptive weight stays at 1 it took ``sobirl``'s steps
    (its replays changing nothing), which the summary then says."""
    weights: list[float] = []
    result = outer_loop(problem, options, monitor, *setup(problem, options, weights))
    result.extra["momentum"] = {
        "replayed_iterations": len(weights),
        "mean_weight": sum(weights) / len(weights) if weights else 1.0,
        "iterations_at_weight_1": sum(1 for eta in weights if eta >= 1.0),
    }
    return result


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
        Option("adaptive", bool, True, "raise eta_k to sqrt(V_diff / V_h), estimated from the "
               "replays: momentum only where the replayed difference is less noisy than a fresh "
               "estimate (false: the paper's schedule alone)"),
        *LOOP_OPTIONS,
        *ESTIMATOR_OPTIONS,
    ),
    run=run,
)
