"""M-SoBiRL (the paper's Algorithm 2): single-loop, model-based, amortised bilevel RL.

One outer iteration makes one adjoint step (``adjoint_steps`` of them if asked), one
hyper-gradient step on ``x`` and ``N`` warm-started soft Bellman steps: ``N + 1`` products with
``P`` (one more with the paper's least-squares adjoint step), element-wise work on ``S*A``
entries and one vector-Jacobian product through the reward, which is evaluated once per
iteration and reused. The first Bellman step needs ``P V_k``, which does not depend on the
reward: it was computed for ``pi_k`` and is kept, so ``N`` steps and ``pi_{k+1}`` take ``N``
products, not ``N + 1``.

By default ``pi_{k+1} = softmax(Q / tau)`` instead of the paper's ``exp((Q - V) / tau)``. The two
agree once ``V`` has converged, but while ``V`` lags at a low temperature the paper's rows are far
from summing to one, and objectives such as ``value(M, policy)`` are then evaluated at something
that is not a policy: on problems/maze_nav.brl (tau = 0.05, 1,000 iterations) the paper's form
ends in NaN at the file's step size and far from the optimum at smaller ones, while the softmax
form reaches it (docs/solvers.md). ``policy = paper`` keeps the literal form.
"""

from __future__ import annotations

import math
import time
from functools import partial
from typing import Any

import torch
from torch import Tensor

from bilevel_dsl.instance import TabularProblem
from bilevel_dsl.softmdp import (
    Transitions,
    policy_matvec,
    pull_steps,
    soft_bellman_update,
    soft_policy,
    soft_q,
    sum_actions,
)

from .hypergrad import (
    MODEL_BASED,
    VERIFY_TOL,
    exact_record,
    hypergradient,
    reward_vjp,
    stationarity,
    upper_derivatives,
)
from .registry import Option, SolverSpec
from .result import NOT_FINITE, Monitor, SolveResult, stop_reason, unfinished

START_TOL = 1e-8  # sup-norm error of V_0 with start = solved


def centred_adjoint_step(P: Transitions, pi: Tensor, g: Tensor, g_sum: Tensor, z: Tensor,
                         gamma: float, steps: int = 1) -> Tensor:
    """``z <- gamma P^T (c + pi * z[s])`` with ``c = g - pi * sum_a g`` (``g_sum``), ``steps``
    times: the fixed point step towards ``(I - gamma P_pi)^T z = gamma P^T c``, one product
    with ``P^T``. It is the ``fixed_point`` step on ``w = sum_a g - z``, but ``z`` leaves out
    ``sum_a g / (1 - gamma)``, the part of ``w`` that carries the value's whole scale and moves
    with ``x`` many times faster than the gradient. ``c + pi * z`` is formed as ``g + pi * (z -
    sum_a g)``: one pass over ``S*A``, as many as the plain step makes."""
    return pull_steps(P, g, pi, z, steps, sign=1.0, alpha=gamma, d=-g_sum)


def adjoint_step(P: Transitions, pi: Tensor, g: Tensor, w: Tensor, gamma: float, zeta: float,
                 kind: str, steps: int = 1) -> Tensor:
    """``steps`` steps towards ``w`` solving ``A w = b``, ``A = (I - gamma P_pi)^T``, ``b = U^T
    g``.

    Both use ``A w - b = w - sum_a g - gamma P^T (pi * w[s] - g)``, one product with ``P^T``.
    ``lsq`` (the paper): ``w - zeta A^T (A w - b)``, a gradient step on ``1/2 ||A w - b||^2``.
    ``fixed_point``: ``w <- b + gamma P_pi^T w``, a gamma-contraction at the same cost.
    """
    g_sum = sum_actions(g)
    if kind == "fixed_point":  # b + gamma P_pi^T w = sum_a g - gamma P^T (g - pi * w[s])
        return pull_steps(P, g, pi, w, steps, sign=-1.0, alpha=-gamma, c=g_sum)
    for _ in range(steps):
        residual = w - pull_steps(P, g, pi, w, 1, sign=-1.0, alpha=-gamma, c=g_sum)
        w = w - zeta * (residual - gamma * policy_matvec(P, pi, residual))
    return w


def run(problem: TabularProblem, options: dict[str, Any], monitor: Monitor) -> SolveResult:
    """Algorithm 2, steps 1-5 of MATH.md, from ``x0``, ``V_0 = 0``, uniform ``pi_0`` (``start =
    cold``), or from ``V_0``, ``pi_0`` and ``w_0`` solved at ``x0`` (``start = solved``)."""
    P, gamma, tau = problem.transitions, problem.discount, problem.temperature
    S, A = problem.n_states, problem.n_actions
    K, N, beta, zeta = options["outer"], options["inner"], options["beta"], options["zeta"]
    adjoint_steps = max(1, options["adjoint_steps"])
    log_every = max(1, options["log_every"])
    paper = options["policy"] == "paper"
    x0 = problem.x0.detach()
    dtype, device = x0.dtype, x0.device

    # state carried across outer iterations: x_k (a leaf for the reward's VJP), r_{x_k}, V_k,
    # P V_k (None until computed), pi_k, pihat_k = softmax((r_{x_k} + gamma P V_k) / tau) and
    # the adjoint w_k
    x = problem.project(x0.clone()).requires_grad_(True)
    with torch.enable_grad():
        r = problem.reward(x)
    V = torch.zeros(S, dtype=dtype, device=device)
    PV: torch.Tensor | None = None
    pihat = soft_policy(soft_q(P, r.detach(), V, gamma), tau)
    pi = torch.full((S, A), 1.0 / A, dtype=dtype, device=device)
    # the amortised adjoint: w, or with adjoint = centred z (w = sum_a g - z)
    centred = options["adjoint"] == "centred"
    if options["init_w"] == "normal":  # drawn on the CPU so every device starts alike
        generator = torch.Generator().manual_seed(problem.seed)
        w = torch.randn(S, generator=generator, dtype=dtype).to(device)
    else:
        w = torch.zeros(S, dtype=dtype, device=device)

    history: dict[str, list[float]] = {"objective": [], "hypergrad_norm": [], "time": [],
                                       "stationarity": [], "iteration": []}
    start = time.perf_counter()
    stopped, k, start_iterations = "max_iterations", 0, 0
    previous: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # x, pi, V, w of iteration k-1
    known: tuple[float, Tensor | None] = (math.nan, None)  # f and sum_a g at previous's x
    pending: tuple[int, float, float, float, float] | None = None  # the last, unrecorded

    def record(k: int, f: float, h_norm: float, mapping: float, seconds: float) -> None:
        for key, value in zip(("iteration", "objective", "hypergrad_norm", "stationarity",
                               "time"), (k, f, h_norm, mapping, seconds)):
            history[key].append(value)
    try:
        if options["start"] == "solved":
            # one exact solve: the follower's and the adjoint's fixed points at x0 (counted in
            # the run's time). From V = 0 and w = 0 the single adjoint step per iteration lags
            # by gamma^k, and while it lags h can be many times too large and send x far off
            monitor.note("m_sobirl: solving the follower and the adjoint at x0 (start = solved)")
            solved = hypergradient(problem, x.detach(), tol=START_TOL)
            V, pi, pihat = solved.V, solved.pi, solved.pi
            w = solved.z if centred else solved.w
            start_iterations = solved.lower_iterations
        while k < K:
            # 1. upper-level derivatives at (x_k, pi_k); b_k = U^T g_k enters step 2
            f, grad_x, grad_pi = upper_derivatives(problem, x, pi)
            g = pi * grad_pi
            with torch.no_grad():
                # 2. adjoint step(s): w_{k+1} (z_{k+1}), then 3. the hyper-gradient estimate,
                # pihat_k held constant (the 1 / tau is applied to the vector-Jacobian
                # product, which is linear): v = g - pihat * w[s], which is g + pihat *
                # (z - sum_a g)[s] for the centred adjoint
                if centred:
                    g_sum = sum_actions(g)
                    w = centred_adjoint_step(P, pi, g, g_sum, w, gamma, adjoint_steps)
                    v = torch.addcmul(g, pihat, (w - g_sum).unsqueeze(-1))
                else:
                    w = adjoint_step(P, pi, g, w, gamma, zeta, options["adjoint"],
                                     adjoint_steps)
                    v = torch.addcmul(g, pihat, w.unsqueeze(-1), value=-1.0)
            h = torch.add(grad_x, reward_vjp(x, r, v), alpha=1.0 / tau)
            with torch.no_grad():
                # 4. projected hyper-gradient step
                x_next = problem.project(torch.add(x, h, alpha=-beta))
                h_norm, mapping = stationarity(problem, x, x_next, h, beta)
            f = float(f)
            if not (math.isfinite(f) and math.isfinite(h_norm)):
                stopped = NOT_FINITE  # back to the last point whose numbers were finite
                if previous is not None:
                    x, pi, V, w, k = *previous, k - 1
                break
            previous = (x, pi, V, w)
            known = (f, g_sum if centred else None)
            monitor.update(k, f, h_norm)
            pending = (k, f, h_norm, mapping, time.perf_counter() - start)
            if k % log_every == 0:
                record(*pending)
                pending = None
            monitor.keep(partial(unfinished, x, pi, f, history, k))
            if mapping < options["tol"]:
                stopped = "converged"
                break

            x_next.requires_grad_(True)
            with torch.enable_grad():
                r_next = problem.reward(x_next)
            with torch.no_grad():
                # 5. N warm-started soft Bellman steps, then Q and pi_{k+1}
                V_next, pihat_next, PV = soft_bellman_update(P, r_next, V, gamma, tau, N, PV)
                pi_next = pihat_next
                if paper:
                    Q = torch.add(r_next.detach(), PV, alpha=gamma)
                    pi_next = torch.exp((Q - V_next.unsqueeze(-1)) / tau)
            x, r, V, pi, pihat = x_next, r_next, V_next, pi_next, pihat_next
            k += 1

            reason = stop_reason(options, start, monitor)
            if reason is not None:
                stopped = reason
                break
    except KeyboardInterrupt:
        stopped = "interrupted"
    if pending is not None:  # the last iteration, whatever log_every
        record(*pending)

    if stopped == "interrupted" and previous is not None:
        # back to the last iterate whose objective is known, rather than evaluate it again:
        # with value(...) on a large problem that is as long as an iteration, after Ctrl-C
        if previous[0] is not x:
            x, pi, V, w, k = *previous, k - 1
        f_end, g_sum_end = known
    else:
        f_end, _, grad_end = upper_derivatives(problem, x, pi)
        g_sum_end = sum_actions(pi * grad_end) if centred else None
    adjoint = {"w": w.detach()}
    if centred:  # w = sum_a g - z, with g at the final point
        adjoint = {"w": g_sum_end.detach() - w.detach(), "z": w.detach()}
    result = SolveResult(
        x=x.detach(),
        policy=pi.detach(),
        objective=float(f_end),
        history=history,
        iterations=k,
        stopped_because=stopped,
        extra={"V": V.detach(), **adjoint, "time": time.perf_counter() - start,
               "start_lower_iterations": start_iterations},
    )
    if options["verify"] == "exact" and stopped not in ("interrupted", "time_limit"):
        try:  # what the running estimates stand for: phi(x), pi*_x and grad phi(x), exactly
            monitor.note("m_sobirl: phi(x) and its gradient at the final x, exactly "
                         "(verify = exact)")
            final = hypergradient(problem, x.detach(), V=V, tol=VERIFY_TOL)
        except KeyboardInterrupt:
            result.stopped_because = "interrupted"
        else:
            result.extra["exact"] = exact_record(problem, x.detach(), final, beta)
            result.extra["running_objective"] = result.objective
            result.objective, result.policy = final.objective, final.pi.detach()
    return result


SPEC = SolverSpec(
    name="m_sobirl",
    aliases=("msobirl", "algorithm2"),
    summary="M-SoBiRL (Algorithm 2): single-loop model-based hyper-gradient descent",
    capabilities=MODEL_BASED,
    options=(
        Option("outer", int, 500, "outer iterations K", valid="[1, inf)"),
        Option("inner", int, 10, "soft Bellman steps N per outer iteration", valid="[1, inf)"),
        Option("beta", float, 0.05, "step size on x", valid="[0, inf)"),
        Option("zeta", float, 0.5, "step size of the least-squares adjoint update",
               valid="(0, inf)"),
        Option("adjoint", str, "centred",
               "adjoint update: centred (z <- gamma P^T (c + pi z), w = sum_a g - z), "
               "fixed_point (w <- b + gamma P_pi^T w) or lsq (the paper's least-squares "
               "gradient step on w)", choices=("centred", "fixed_point", "lsq")),
        Option("adjoint_steps", int, 1,
               "adjoint updates per outer iteration, at least 1 (Algorithm 2: 1), one product "
               "with P^T each; with gamma near 1 a single step lets the adjoint, and so h, lag "
               "(docs/benchmarks.md: 10 steps reach a 10^4-state maze's optimum 4x sooner)",
               valid="[1, inf)"),
        Option("tol", float, 0.0, "stop when ||x - project(x - beta h)|| / beta (||h|| without "
               "bounds or with beta = 0) is below this (0: off)", valid="[0, inf)"),
        Option("time_limit", float, 0.0, "stop after this many seconds (0: off)",
               valid="[0, inf)"),
        Option("start", str, "solved",
               "solved (V_0, pi_0 and w_0 solved exactly at x0, at the cost of one exact "
               "hyper-gradient) or cold (V_0 = 0, uniform pi_0, w_0 from init_w: Algorithm 2)",
               choices=("solved", "cold")),
        Option("init_w", str, "zeros", "initial adjoint (w, or z when centred) with start = "
               "cold: zeros, or normal (N(0, I) seeded from the problem's seed, as in the "
               "paper's synthetic run)",
               choices=("zeros", "normal")),
        Option("policy", str, "softmax",
               "pi_{k+1} after the inner loop: softmax (softmax(Q / tau), a distribution) or "
               "paper (exp((Q - V) / tau), unnormalised while V lags; equal at convergence)",
               choices=("softmax", "paper")),
        Option("verify", str, "exact",
               "exact: after the run, phi(x) and ||grad phi(x)|| with the follower and the "
               "adjoint solved exactly (the cost of one exact hyper-gradient, as start = "
               "solved), reported beside the running estimates; off: skip it",
               choices=("exact", "off")),
        Option("log_every", int, 1, "record the history every this many iterations",
               valid="[1, inf)"),
    ),
    run=run,
)
