"""The exact reference: projected gradient descent on ``phi`` with exact hyper-gradients.

Each step solves the lower level to ``inner_tol`` (warm-started) and the adjoint exactly, so
its curve is what an amortised solver such as M-SoBiRL should approach, at a higher cost.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor

from bilevel_dsl.instance import TabularProblem

from .hypergrad import MODEL_BASED, HyperGradient, hypergradient
from .registry import Option, SolverSpec
from .result import NOT_FINITE, Monitor, SolveResult, stop_reason, unfinished

# Armijo's sufficient decrease: phi must fall by this share of ||step||^2 / step size.
_ARMIJO = 1e-4
_HALVINGS = 40  # at most this many per step: beta / 2^40 is below any useful step


def _armijo_step(problem: TabularProblem, x: Tensor, here: HyperGradient, beta: float,
                 evaluate: Callable[[Tensor, HyperGradient | None], HyperGradient]
                 ) -> tuple[Tensor, HyperGradient | None, float]:
    """The first of ``beta, beta/2, ...`` whose projected step decreases ``phi`` enough: the
    new point, its evaluation (reused as the next step's), and that step size; ``None`` when
    no step does (``x`` is stationary to rounding)."""
    t = beta
    for _ in range(_HALVINGS):
        x_try = problem.project(x - t * here.grad)
        moved = float(torch.linalg.vector_norm(x_try - x)) ** 2
        if moved == 0.0:
            break
        there = evaluate(x_try, here)
        if there.objective <= here.objective - _ARMIJO * moved / t:  # False for NaN
            return x_try, there, t
        t /= 2
    return x, None, t


def run(problem: TabularProblem, options: dict[str, Any], monitor: Monitor) -> SolveResult:
    """``x <- project(x - beta grad phi(x))`` until ``outer`` steps, ``tol``, or a limit; with
    ``line_search = armijo``, ``beta`` halves within a step until ``phi`` decreases enough."""
    x = problem.project(problem.x0.detach().clone())
    history: dict[str, list[float]] = {"objective": [], "hypergrad_norm": [], "time": [],
                                       "stationarity": [], "lower_iterations": []}
    beta, armijo = options["beta"], options["line_search"] == "armijo"
    if armijo:
        history["step_size"] = []

    def evaluate(at: Tensor, near: HyperGradient | None) -> HyperGradient:
        """At ``at``, its solves started from those at ``near``, a nearby point."""
        return hypergradient(problem, at, V=near.V if near else None,
                             z=near.z if near else None, tol=options["inner_tol"],
                             adjoint_method=options["adjoint_method"])

    start = time.perf_counter()
    stopped, k, k_done, result, x_done = "max_iterations", 0, 0, None, x
    evaluated, t = None, beta
    try:
        while True:
            if evaluated is None:
                evaluated = evaluate(x, result)
            finite = math.isfinite(evaluated.objective) and bool(
                torch.isfinite(evaluated.grad).all())
            full = problem.project(x - beta * evaluated.grad)
            x_next, accepted = full, None
            if armijo and finite and beta:  # from twice the last step: few halvings each
                x_next, accepted, t = _armijo_step(problem, x, evaluated, min(beta, 2 * t),
                                                   evaluate)
            # stationarity: the gradient mapping at the full step beta, ||grad|| itself when x
            # has no bounds (and, its limit without bounds, when beta = 0 holds x still)
            grad_norm, step = torch.stack([torch.linalg.vector_norm(evaluated.grad),
                                           torch.linalg.vector_norm(full - x)]).tolist()
            mapping = step / beta if beta else grad_norm
            if not (finite and math.isfinite(grad_norm)):
                stopped = NOT_FINITE  # keep the last point whose numbers were finite
                if result is None:  # x0 itself was not finite: report it as it is
                    result = evaluated
                break
            result, x_done, k_done, x = evaluated, x, k, x_next
            monitor.update(k, result.objective, grad_norm)
            history["objective"].append(result.objective)
            history["hypergrad_norm"].append(grad_norm)
            history["stationarity"].append(mapping)
            history["time"].append(time.perf_counter() - start)
            history["lower_iterations"].append(result.lower_iterations)
            if armijo:
                history["step_size"].append(t if accepted is not None else 0.0)
            monitor.keep(partial(unfinished, x_done, result.pi, result.objective, history, k))
            if mapping < options["tol"] or (mapping == 0.0 and (
                    grad_norm == 0.0 or problem.bounded)):  # a fixed point of the step
                stopped = "converged"
                break
            if armijo and accepted is None and beta:
                stopped = "no_descent"  # no step decreases phi: stationary to rounding
                break
            if k == options["outer"]:
                break
            reason = stop_reason(options, start, monitor)
            if reason is not None:
                stopped = reason
                break
            k, evaluated = k + 1, accepted
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
        Option("line_search", str, "off", "armijo: halve the step from beta until phi "
               "decreases by 1e-4 ||step||^2 / step (one lower-level solve per halving); "
               "off: the fixed step beta", choices=("off", "armijo")),
        Option("adjoint_method", str, "auto", "linear solver for the adjoint: direct (LU; "
               "SuperLU for sparse P) or krylov (GMRES); auto: direct for dense P up to 5,000 "
               "states and for sparse P with a narrow envelope (grid worlds)",
               choices=("auto", "direct", "krylov")),
    ),
    run=run,
)
