"""The model-based hyper-gradient of ``phi(x) = f(x, pi*_x)`` in adjoint form (MATH.md).

The adjoint form needs one linear solve in ``(I - gamma P_pi)^T`` and one vector-Jacobian
product through the reward, never an ``S x d`` Jacobian, so it scales to large state spaces and
to rewards with many parameters. It is the reference the solvers and ``gradcheck`` trust.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bilevel_dsl.instance import POLICY_FUNCTIONAL, TRAJECTORY, TabularProblem
from bilevel_dsl.softmdp import (
    Transitions,
    policy_evaluation,
    soft_policy,
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
    w: Tensor  # (S,) adjoint
    lower_iterations: int  # soft value iterations spent on the lower level


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
    (out,) = torch.autograd.grad(r, x, grad_outputs=v, allow_unused=True)
    return torch.zeros_like(x) if out is None else out


def adjoint_rhs(P: Transitions, g: Tensor, gamma: float) -> Tensor:
    """``b = U^T g``: ``b[t] = sum_a g[t,a] - gamma sum_{s,a} g[s,a] P[s,a,t]``."""
    return torch.add(sum_actions(g), P.pull(g), alpha=-gamma)


def solve_lower(problem: TabularProblem, r: Tensor, V: Tensor | None, tol: float,
                polish: bool = False) -> tuple[Tensor, Tensor, int]:
    """``V*``, ``pi*`` and the iterations used, for the reward table ``r``.

    ``polish`` adds two Newton steps (soft policy iteration: each evaluates the greedy soft
    policy exactly), which converge quadratically from the value-iteration answer and bring
    ``V*`` to rounding level: what finite differences of ``phi`` need to be smooth in ``x``.
    """
    P, gamma, tau = problem.transitions, problem.discount, problem.temperature
    r = r.detach()
    V, iterations = soft_value_iteration(P, r, gamma, tau, V0=V, tol=tol)
    with torch.no_grad():
        for _ in range(2 if polish else 0):
            V = policy_evaluation(P, r, soft_policy(soft_q(P, r, V, gamma), tau), gamma, tau)
        pi = soft_policy(soft_q(P, r, V, gamma), tau)
    return V, pi, iterations


def hypergradient(
    problem: TabularProblem,
    x: Tensor,
    V: Tensor | None = None,
    tol: float = 1e-10,
    adjoint_method: str = "auto",
    polish: bool = False,
) -> HyperGradient:
    """``grad phi(x)`` at ``pi*_x`` with the lower level solved to ``tol`` (warm start ``V``).

    ``g = pi * df/dpi``, ``b = U^T g``, ``(I - gamma P_pi)^T w = b``, and
    ``grad = grad_x f + (1/tau) J_r^T (g - pi * w[s])`` with one vector-Jacobian product.
    """
    P, gamma, tau = problem.transitions, problem.discount, problem.temperature
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        r = problem.reward(x)
    V, pi, iterations = solve_lower(problem, r, V, tol, polish)
    f, grad_x, grad_pi = upper_derivatives(problem, x, pi)
    with torch.no_grad():
        g = pi * grad_pi
        w = solve_policy_system(P, pi, adjoint_rhs(P, g, gamma), gamma, transpose=True,
                                method=adjoint_method)
        v = (g - pi * w.unsqueeze(-1)) / tau
    grad = grad_x + reward_vjp(x, r, v)
    return HyperGradient(grad.detach(), float(f), pi, V, w, iterations)


def phi(problem: TabularProblem, x: Tensor, tol: float = 1e-12, V: Tensor | None = None
        ) -> float:
    """``f(x, pi*_x)`` with the lower level solved to rounding level, for finite differences;
    ``V``: a warm start (the soft values at a nearby point), which at gamma near 1 saves
    thousands of value-iteration sweeps."""
    with torch.no_grad():
        _, pi, _ = solve_lower(problem, problem.reward(x.detach()), V, tol, polish=True)
        return float(problem.objective(x.detach(), pi))
