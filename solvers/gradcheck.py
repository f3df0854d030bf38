"""Check the model-based hyper-gradient against central finite differences of ``phi``.

A user trusts a new problem (a new reward expression, a new objective) before a long run by
seeing these two agree; ``phi`` solves the lower level to rounding level so that its
differences are smooth in ``x``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from bilevel_dsl.instance import TabularProblem

from .hypergrad import hypergradient, phi

FULL_DIMENSION = 50  # every coordinate up to this many entries of x, random directions above
N_DIRECTIONS = 10
_ROUNDING = 1e-14  # relative error of phi solved to rounding level (a generous bound)


@dataclass(frozen=True)
class GradcheckRow:
    """The agreement at one point: ``rel_error = ||fd - grad.d|| / ||grad.d||`` over directions."""

    label: str
    rel_error: float
    max_abs_error: float
    grad_norm: float
    n_directions: int
    # error of the plain central differences at step h / 2 over that at h: about 1/4 when the
    # differences' own truncation error dominates, about 1/2 when a kink lies within the step,
    # about 2 when rounding in phi dominates, and about
    # 1 when neither (a wrong hyper-gradient, or phi not differentiable at the point)
    halving_ratio: float = math.nan
    # how far the plain central differences at step h were off, and how far rounding in phi
    # could put them (1e-14 of |phi| or of the follower's largest |V|, which phi is computed
    # from): an error far above that which grows when h is halved is no rounding, but phi
    # changing on a scale below the step
    step_error: float = math.nan
    rounding: float = math.nan


def default_points(problem: TabularProblem, n_random: int, seed: int) -> list[tuple[str, Tensor]]:
    """``x0``, then random points around it, ``x0 + 0.1 (1 + |x0|) N(0, 1)``, kept in bounds."""
    x0 = problem.x0.detach()
    generator = torch.Generator().manual_seed(seed)
    points = [("x0", x0)]
    for i in range(n_random):
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        points.append((f"random {i + 1}", problem.project(x0 + 0.1 * (1 + x0.abs()) * noise)))
    return points


def gradcheck(
    problem: TabularProblem,
    points: list[Tensor] | None = None,
    n_random: int = 2,
    eps: float = 1e-5,
    seed: int = 0,
    n_directions: int = N_DIRECTIONS,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[GradcheckRow]:
    """Compare ``hypergradient`` with central differences of ``phi`` at each point.

    Along every coordinate when ``x`` has at most 50 entries (step ``h = eps * max(1, |x_i|)``),
    else along ``n_directions`` random unit directions (step ``h = eps * max(1, ||x||_inf)``).
    The differences at ``h`` and ``h / 2`` are combined by Richardson extrapolation, which
    cancels the ``h^2`` term: at low temperatures ``phi`` curves on the scale of ``tau`` (with
    a near-deterministic follower at ``tau = 1e-3`` a plain central difference with ``h =
    1e-5`` was off by 2.6e-5 relative, the extrapolation by 7e-8). Whether the errors are
    small enough is the caller's decision. ``progress(label, done, total)`` hears of each
    direction finished (``done = 0`` once the point's exact hyper-gradient is known): on a big
    problem each takes seconds.
    """
    labelled = (
        default_points(problem, n_random, seed)
        if points is None
        else [(f"point {i + 1}", p.detach()) for i, p in enumerate(points)]
    )
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for label, x in labelled:
        problem.cold_solves()  # each point's check the same whatever was solved before
        exact = hypergradient(problem, x, tol=1e-12, polish=True)
        grad = exact.grad.reshape(-1)
        flat = x.reshape(-1)
        if flat.numel() <= FULL_DIMENSION:
            directions = torch.eye(flat.numel(), dtype=flat.dtype, device=flat.device)
            steps = eps * flat.abs().clamp_min(1.0)
        else:
            directions = torch.randn(n_directions, flat.numel(), generator=generator,
                                     dtype=flat.dtype).to(flat.device)
            directions /= torch.linalg.vector_norm(directions, dim=1, keepdim=True)
            steps = torch.full((n_directions,), eps * max(1.0, float(flat.abs().max())),
                               dtype=flat.dtype, device=flat.device)
        pairs = []
        for d, h in zip(directions, steps.tolist()):
            if progress is not None:
                progress(label, len(pairs), directions.shape[0])
            pairs.append((_central(problem, x, d, h, exact.V),
                          _central(problem, x, d, h / 2, exact.V)))
        if progress is not None:
            progress(label, len(pairs), directions.shape[0])
        central = torch.tensor(pairs, dtype=flat.dtype, device=flat.device)
        finite = (4 * central[:, 1] - central[:, 0]) / 3
        analytic = directions @ grad
        error = finite - analytic
        scale = float(torch.linalg.vector_norm(analytic))
        error_h, error_half = torch.linalg.vector_norm(central - analytic[:, None], dim=0).tolist()
        rows.append(GradcheckRow(
            label=label,
            rel_error=float(torch.linalg.vector_norm(error)) / scale if scale > 0
            else (0.0 if not error.any() else math.inf),
            max_abs_error=float(error.abs().max()),
            grad_norm=float(torch.linalg.vector_norm(grad)),
            n_directions=directions.shape[0],
            halving_ratio=error_half / error_h if error_h > 0 else math.nan,
            step_error=error_h,
            rounding=_ROUNDING * max(1.0, abs(exact.objective), float(exact.V.abs().max()))
            * float(torch.linalg.vector_norm(1.0 / steps)),
        ))
    return rows


def _central(problem: TabularProblem, x: Tensor, direction: Tensor, h: float, V: Tensor
             ) -> float:
    """``(phi(x + h d) - phi(x - h d)) / 2h``, each lower level warm-started from ``V``."""
    step = (h * direction).view_as(x)
    return (phi(problem, x + step, V=V) - phi(problem, x - step, V=V)) / (2 * h)
