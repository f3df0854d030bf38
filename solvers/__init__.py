"""Solvers for lowered bilevel problems, found through a registry of their capabilities.

``solve`` is the one-call entry point for tools that embed the compiler. Output files and the
progress bar live in ``solvers.output`` and ``solvers.progress`` (imported on demand, so
importing this package does not load matplotlib).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .registry import (
    AUTO_ORDER,
    REGISTRY,
    Capabilities,
    IncapableSolverError,
    NoCapableSolverError,
    Option,
    OptionError,
    ProblemFeatures,
    Registry,
    SolverError,
    SolverSpec,
    UnknownSolverError,
    describe,
    parse_option_value,
)
from .result import NOT_FINITE, Monitor, SolveResult, interrupts_deferred

if TYPE_CHECKING:
    from bilevel_dsl.instance import TabularProblem

__all__ = [
    "AUTO_ORDER",
    "REGISTRY",
    "Capabilities",
    "IncapableSolverError",
    "Monitor",
    "NOT_FINITE",
    "NoCapableSolverError",
    "Option",
    "OptionError",
    "ProblemFeatures",
    "Registry",
    "SolveResult",
    "SolverError",
    "SolverSpec",
    "UnknownSolverError",
    "describe",
    "interrupts_deferred",
    "parse_option_value",
    "resolve",
    "solve",
]


def resolve(
    problem: TabularProblem,
    solver: str | None = None,
    options: dict[str, Any] | None = None,
    registry: Registry = REGISTRY,
) -> tuple[SolverSpec, dict[str, Any]]:
    """The solver for ``problem`` and its typed options, or a ``SolverError`` saying why not.

    ``solver`` is a name, ``"auto"``, or ``None`` (the default) for the file's ``solve``
    statement, as ``brl solve`` without ``--solver`` (``auto`` without one). The file's
    solver options are options of the file's solver, so they apply only when that solver (or
    the file's ``auto``) is the one chosen; ``options`` override them.
    """
    features = ProblemFeatures.of(problem)
    if solver is None:
        solver = problem.solver or "auto"
    spec = registry.auto(features) if solver == "auto" else registry.get(solver)
    registry.check_capable(spec, features)
    file_solver = problem.solver or "auto"
    file_options = (
        problem.solver_options
        if file_solver == "auto" or registry.get(file_solver) is spec
        else {}
    )
    return spec, registry.validate_options(spec, {**file_options, **(options or {})})


def solve(
    problem: TabularProblem,
    solver: str | None = None,
    options: dict[str, Any] | None = None,
    monitor: Monitor | None = None,
    registry: Registry = REGISTRY,
) -> tuple[SolverSpec, SolveResult]:
    """Resolve the solver and options (see ``resolve``), check capability, and run it.

    By default the file's ``solve`` statement picks the solver, as on the command line."""
    spec, typed = resolve(problem, solver, options, registry)
    monitor = monitor if monitor is not None else Monitor()
    forget = getattr(problem, "cold_solves", None)  # a tabular problem's
    if forget is not None:  # a second run of one problem gives the first one's numbers
        forget()
    try:
        result = spec.run(problem, typed, monitor)
    finally:
        monitor.close()
    return spec, result
