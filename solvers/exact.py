"""The exact reference: projected gradient descent on ``phi`` with exact hyper-gradients.

Each step solves the lower level to ``inner_tol`` (warm-started) and the adjoint exactly, so
its curve is what an amortised solver such as M-SoBiRL should approach, at a higher cost.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from bilevel_dsl.instance import TabularProblem

from .hypergrad import MODEL_BASED, hypergradient
from .registry import Option, SolverSpec
from .result import NOT_FINITE, Monitor, SolveResult, stop_reason


def run(problem: TabularProblem, options: dict[str, Any], monitor: Monitor) -> SolveResult:
    """``x <- project(x - beta grad phi(x))`` until ``outer`` steps, ``tol``, or a limit."""
    x = problem.project(problem.x0.detach().clone())
    history: dict[str, list[float]] = {"objective": [], "hypergrad_norm": [], "time": [],
                                       "stationarity": [], "lower_iterations": []}
    start = time.perf_counter()
    stopped, k, k_done, V, result, x_done = "max_iterations", 0, 0, None, None, x
    try:
        while True:
            evaluated = hypergradient(problem, x, V=V, tol=options["inner_tol"],
                                      adjoint_method=options["adjoint_method"])
            x_next = problem.project(x - options["beta"] * evaluated.grad)
            # stationarity: the gradient mapping, ||grad|| itself when x has no bounds (and,
            # its limit without bounds, when beta = 0 holds x still)
            grad_norm, step = torch.stack([torch.linalg.vector_norm(evaluated.grad),
                                           torch.linalg.vector_norm(x_next - x)]).tolist()
            mapping = step / options["beta"] if options["beta"] else grad_norm
            if not (math.isfinite(evaluated.objective) and math.isfinite(grad_norm)):
                stopped = NOT_FINITE  # keep the last point whose numbers were finite
                if result is None:  # x0 itself was not finite: report it as it is
                    result = evaluated
                break
            result, V, x_done, k_done, x = evaluated, evaluated.V, x, k, x_next
            monitor.update(k, result.objective, grad_norm)
            history["objective"].append(result.objective)
            history["hypergrad_norm"].append(grad_norm)
            history["stationarity"].append(mapping)
            history["time"].append(time.perf_counter() - start)
            history["lower_iterations"].append(result.lower_iterations)
            if mapping < options["tol"]:
                stopped = "converged"
                break
            if k == options["outer"]:
                break
            reason = stop_reason(options, start, monitor)
            if reason is not None:
                stopped = reason
                break
            k += 1
    except KeyboardInterrupt:
        stopped = "interrupted"
    if result is None:  # interrupted before the first evaluation finished
        result = hypergradient(problem, x_done, tol=options["inner_tol"])
    # the last point evaluated, so that x, policy and objective belong together
    return SolveResult(
        x=x_done.detach(),
        policy=result.pi,
        objective=result.objective,
        history=history,
        iterations=k_done,
        stopped_because=stopped,
        extra={"V": result.V, "w": result.w, "grad": result.grad,
               "time": time.perf_counter() - start},
    )


SPEC = SolverSpec(
    name="exact",
    aliases=("reference", "exact_hypergradient"),
    summary="projected gradient descent with exact hyper-gradients (lower level and adjoint "
            "solved to tolerance): the reference for other solvers",
    capabilities=MODEL_BASED,
    options=(
        Option("outer", int, 500, "gradient steps", valid="[1, inf)"),
        Option("beta", float, 0.05, "step size on x", valid="[0, inf)"),
        Option("tol", float, 0.0, "stop when ||x - project(x - beta grad)|| / beta (||grad|| "
               "without bounds) is below this (0: off)", valid="[0, inf)"),
        Option("time_limit", float, 0.0, "stop after this many seconds (0: off)",
               valid="[0, inf)"),
        Option("inner_tol", float, 1e-10, "sup-norm accuracy of the lower-level soft values",
               valid="(0, inf)"),
        Option("adjoint_method", str, "auto", "linear solver for the adjoint: direct (dense LU) "
               "or krylov (GMRES); auto picks direct for small state spaces",
               choices=("auto", "direct", "krylov")),
    ),
    run=run,
)
