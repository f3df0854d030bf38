"""The model-based hyper-gradient of ``phi(x) = f(x, pi*_x)`` in adjoint form (MATH.md).

The adjoint form needs one linear solve in ``(I - gamma P_pi)^T`` and one vector-Jacobian
product through the reward, never an ``S x d`` Jacobian, so it scales to large state spaces and
to rewards with many parameters. It is the reference the solvers and ``gradcheck`` trust.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bilevel_dsl.instance import TabularProblem
from bilevel_dsl.ir import POLICY_FUNCTIONAL, TRAJECTORY
from bilevel_dsl.softmdp import (
    WarmStart,
    newton_pays,
    soft_policy,
    soft_policy_iteration,
    soft_q,
    soft_value_iteration,
    solve_policy_system,
    sum_actions,
)

from .registry import Capabilities

# What a solver built on the exact model-based hyper-gradient can handle: every closed-form
# policy functional, on tabular problems, on any device.
MODEL_BASED = Capabilities(
    model_based=True,
    environments=frozenset({"tabular"}),
    forms=frozenset({POLICY_FUNCTIONAL, TRAJECTORY}),
    features=frozenset({"policy", "value", "occupancy", "entropy", "expected_return"}),
    devices=frozenset({"cpu", "cuda"}),
)


@dataclass
class HyperGradient:
    """``grad phi(x)`` and the quantities it was built from (all detached)."""

    grad: Tensor  # shape of x
    objective: float  # the minimised f(x, pi*_x)
    pi: Tensor  # (S, A) optimal soft policy
    V: Tensor  # (S,) optimal soft value, reusable as a warm start
    w: Tensor  # (S,) adjoint, (I - gamma P_pi)^T w = U^T g
    z: Tensor  # (S,) centred adjoint, (I - gamma P_pi)^T z = gamma P^T c; w = sum_a g - z
    lower_iterations: int  # value-iteration sweeps (Newton steps with polish) on the lower level


def as_point(problem: TabularProblem, x: Tensor) -> Tensor:
    """``x`` detached, in the problem's dtype and on its device: a point given as integers, a
    numpy array or a list is read as ``x0``'s numbers would be."""
    return torch.as_tensor(x, dtype=problem.x0.dtype, device=problem.x0.device).detach()


def upper_derivatives(problem: TabularProblem, x: Tensor, pi: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """``f(x, pi)``, ``grad_x f`` and ``grad_pi f`` (zeros where ``f`` does not depend on one)."""
    x = x.detach().requires_grad_(True)
    pi = pi.detach().requires_grad_(True)
    with torch.enable_grad():
        f = problem.objective(x, pi)
        if not f.requires_grad:
            return f.detach(), torch.zeros_like(x), torch.zeros_like(pi)
        grad_x, grad_pi = torch.autograd.grad(f, (x, pi), allow_unused=True)
    return (
        f.detach(),
        torch.zeros_like(x) if grad_x is None else grad_x,
        torch.zeros_like(pi) if grad_pi is None else grad_pi,
    )


def reward_vjp(x: Tensor, r: Tensor, v: Tensor) -> Tensor:
    """``J_r^T v`` for ``r = reward(x)`` built with ``x`` as a grad-requiring leaf."""
    if not r.requires_grad:
        return torch.zeros_like(x)
    if r.numel() <= _SMALL_REWARD:
        # the gradient of <r, v>, the same numbers (its backward multiplies v by 1): torch's
        # check of a given grad_outputs imports sympy on first use, 0.6 to 0.8 s of a small
        # problem's solve; on a large one the extra product would cost more than that
        (out,) = torch.autograd.grad(torch.sum(r * v.detach()), x, allow_unused=True)
    else:
        (out,) = torch.autograd.grad(r, x, grad_outputs=v, allow_unused=True)
    return torch.zeros_like(x) if out is None else out


_SMALL_REWARD = 1 << 16


def solve_lower(problem: TabularProblem, r: Tensor, V: Tensor | None, tol: float,
                polish: bool = False) -> tuple[Tensor, Tensor, int]:
    """``V*``, ``pi*`` and the iterations used, for the reward table ``r``.

    Where the linear solves in ``(I - gamma P_pi)`` are factorisations and cheaper than value
    iteration's sweeps (``newton_pays``: small problems, gamma near 1), by Newton's method (soft
    policy iteration) from the warm start: a few steps however close ``gamma`` is to 1, each to
    rounding level. Elsewhere by value iteration, which ``polish`` finishes with two Newton
    steps: finite differences of ``phi`` need ``V*`` at rounding level to be smooth in ``x``.
    """
    P, gamma, tau = problem.transitions, problem.discount, problem.temperature
    r = r.detach()
    if newton_pays(P, gamma):
        V, iterations = soft_policy_iteration(P, r, gamma, tau, V0=V, tol=min(tol, 1e-12))
    else:
        V, iterations = soft_value_iteration(P, r, gamma, tau, V0=V, tol=tol)
        if polish:
            V, _ = soft_policy_iteration(P, r, gamma, tau, V0=V, tol=0.0, max_iter=2)
    with torch.no_grad():
        pi = soft_policy(soft_q(P, r, V, gamma), tau)
    return V, pi, iterations


def hypergradient(
    problem: TabularProblem,
    x: Tensor,
    V: Tensor | None = None,
    tol: float = 1e-10,
    adjoint_method: str = "auto",
    polish: bool = False,
    z: Tensor | None = None,
) -> HyperGradient:
    """``grad phi(x)`` at ``pi*_x`` with the lower level solved to ``tol`` (warm starts: ``V``,
    and ``z`` for an iterative adjoint solve, both from a nearby point).

    ``g = pi * df/dpi``, ``b = U^T g``, ``(I - gamma P_pi)^T w = b``, and
    ``grad = grad_x f + (1/tau) J_r^T (g - pi * w[s])`` with one vector-Jacobian product.
    """
    P, gamma, tau = problem.transitions, problem.discount, problem.temperature
    x = as_point(problem, x).requires_grad_(True)
    with torch.enable_grad():
        r = problem.reward(x)
    V, pi, iterations = solve_lower(problem, r, V, tol, polish)
    f, grad_x, grad_pi = upper_derivatives(problem, x, pi)
    with torch.no_grad():
        # g - pi * w[s] in centred form: with w = sum_a g - z, it is c + pi * z[s], where c =
        # pi * (df/dpi - <pi, df/dpi>) and (I - gamma P_pi)^T z = gamma P^T c. Both terms
        # vanish as the follower turns deterministic, while g and pi * w[s] are each as large
        # as the objective: their difference lost every digit once multiplied by |J_r| / tau
        # (1e6 at reward 1e3 and tau 1e-3)
        c = pi * _centred(pi, grad_pi)
        z = solve_policy_system(P, pi, gamma * P.pull(c), gamma, transpose=True,
                                method=adjoint_method, warm=WarmStart(solution=z))
        v = torch.addcmul(c, pi, z.unsqueeze(-1)) / tau
        w = sum_actions(pi * grad_pi) - z
    grad = grad_x + reward_vjp(x, r, v)
    return HyperGradient(grad.detach(), float(f), pi, V, w, z, iterations)


def _centred(pi: Tensor, G: Tensor) -> Tensor:
    """``G - <pi, G>`` per state, taken relative to each state's most likely action: at that
    action it is ``-sum_b pi_b (G_b - G_m)``, small terms only, so a near-deterministic policy
    does not leave the rounding of ``G`` behind (``G_m - <pi, G>`` would)."""
    G_m = G.gather(-1, pi.argmax(-1, keepdim=True))
    D = G - G_m
    return D - sum_actions(pi * D).unsqueeze(-1)


def phi(problem: TabularProblem, x: Tensor, tol: float = 1e-12, V: Tensor | None = None
        ) -> float:
    """``f(x, pi*_x)`` with the lower level solved to rounding level, for finite differences;
    ``V``: a warm start (the soft values at a nearby point), which at gamma near 1 saves
    thousands of value-iteration sweeps. The objective's own solves start from zero: started
    from the last evaluation's answers, their errors (within the tolerance) would differ
    between ``x + h`` and ``x - h`` and no longer cancel in a difference."""
    with torch.no_grad():
        x = as_point(problem, x)
        _, pi, _ = solve_lower(problem, problem.reward(x), V, tol, polish=True)
        problem.cold_solves()
        return float(problem.objective(x, pi))


# how closely a check at the final x (verify = exact) solves V*, as exact's inner_tol
VERIFY_TOL = 1e-10


def stationarity(problem: TabularProblem, x: Tensor, x_next: Tensor, h: Tensor, beta: float
                 ) -> tuple[float, float]:
    """``||h||`` and the gradient mapping ``||x - x_next|| / beta`` (``x_next = project(x -
    beta h)``): ``||h||`` itself when x has no bounds (or when beta = 0, the mapping's limit
    without bounds), in one synchronisation."""
    if problem.bounded and beta > 0:
        norm, mapping = torch.stack([torch.linalg.vector_norm(h),
                                     torch.linalg.vector_norm(x - x_next) / beta]).tolist()
        return norm, mapping
    norm = float(torch.linalg.vector_norm(h))
    return norm, norm


def exact_record(problem: TabularProblem, x: Tensor, final: HyperGradient, beta: float
                 ) -> dict[str, float]:
    """``phi(x)`` (minimised), ``||grad phi(x)||`` and the gradient mapping at ``beta``: a
    check of a solver's answer at its final x."""
    norm, mapping = stationarity(problem, x, problem.project(x - beta * final.grad),
                                 final.grad, beta)
    return {"objective": final.objective, "hypergrad_norm": norm, "stationarity": mapping}
