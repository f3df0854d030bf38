"""The adjoint hyper-gradient equals central finite differences of phi(x) = f(x, pi*_x)."""

from __future__ import annotations

import pytest
import torch

from bilevel_dsl.instance import TabularProblem
from bilevel_dsl.softmdp import (
    Transitions,
    occupancy,
    policy_evaluation,
    soft_policy,
    soft_q,
    soft_value_iteration,
)
from solvers.gradcheck import gradcheck
from solvers.hypergrad import hypergradient, phi

DT = torch.float64
S, A, D = 8, 3, 4


def make_problem(tau: float, gamma: float, kind: str, sparse: bool, seed: int = 0
                 ) -> TabularProblem:
    """A random problem with a nonlinear reward ``tau * (c tanh(F x) + (x^T M x) c2)``.

    Rewards scale with ``tau`` so that ``Q / tau`` stays of order one: the policy is neither
    uniform nor deterministic and finite differences stay well conditioned at every ``tau``.
    """
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(S, A, S, generator=g, dtype=DT)
    weights = weights * (torch.rand(S, A, S, generator=g, dtype=DT) < 0.4) + 1e-3
    P = weights / weights.sum(-1, keepdim=True)
    P[0] *= 0.8  # state 0 is partly terminal: sub-stochastic rows
    T = Transitions.from_dense(P)
    if sparse:
        T = Transitions.from_coo(*T.coo(), S, A)
    c = torch.rand(S, A, generator=g, dtype=DT) * 2
    F = torch.randn(S * A, D, generator=g, dtype=DT)
    M = torch.randn(D, D, generator=g, dtype=DT) / D
    c2 = torch.rand(S, A, generator=g, dtype=DT)
    R_upper = torch.randn(S, A, generator=g, dtype=DT)
    rho = torch.softmax(torch.randn(S, generator=g, dtype=DT), 0)

    def reward(x: torch.Tensor) -> torch.Tensor:
        return tau * (c * torch.tanh(F @ x).view(S, A) + (x @ M @ x) * c2)

    def objective(x: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
        terms = {
            # value of the follower's policy in an upper MDP whose reward also depends on x
            "value": lambda: -(rho * policy_evaluation(T, R_upper + reward(x), pi, gamma)).sum(),
            "occupancy": lambda: (occupancy(T, pi, rho, gamma) * R_upper).sum(),
            "policy": lambda: 0.5 * (pi**2).sum(),
            "entropy": lambda: (pi * torch.log(pi)).sum(),
        }
        chosen = terms if kind == "all" else {kind: terms[kind]}
        return sum(term() for term in chosen.values()) + 0.05 * (x**2).sum()

    x0 = torch.randn(D, generator=g, dtype=DT)
    return TabularProblem(name=f"random-{kind}", transitions=T, discount=gamma, initial=rho,
                          temperature=tau, reward=reward, objective=objective, x0=x0)


def worst(rows) -> float:
    return max(row.rel_error for row in rows)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("kind", ["value", "occupancy", "policy", "entropy"])
def test_each_objective_feature(kind, sparse):
    rows = gradcheck(make_problem(0.1, 0.9, kind, sparse), n_random=1)
    assert all(row.grad_norm > 1e-3 for row in rows)  # a real test, not 0 == 0
    assert worst(rows) <= 1e-6, rows


@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("tau", [1.0, 0.1, 1e-3])
def test_temperatures_and_discounts(tau, gamma):
    rows = gradcheck(make_problem(tau, gamma, "all", sparse=gamma == 0.9, seed=1), n_random=1)
    assert worst(rows) <= 1e-6, rows


def test_independent_directional_difference_and_outputs():
    problem = make_problem(0.5, 0.9, "all", sparse=False, seed=2)
    x = problem.x0
    result = hypergradient(problem, x, tol=1e-12)
    d = torch.randn(D, generator=torch.Generator().manual_seed(3), dtype=DT)
    h = 1e-5
    fd = (phi(problem, x + h * d) - phi(problem, x - h * d)) / (2 * h)
    assert abs(fd - float(result.grad @ d)) <= 1e-7 * max(1.0, abs(fd))
    # the returned pieces are the lower-level solution and the adjoint
    T, gamma, tau = problem.transitions, problem.discount, problem.temperature
    r = problem.reward(x)
    V, _ = soft_value_iteration(T, r, gamma, tau, tol=1e-12)
    torch.testing.assert_close(result.V, V, rtol=0, atol=1e-10)
    torch.testing.assert_close(result.pi, soft_policy(soft_q(T, r, V, gamma), tau))
    assert result.objective == pytest.approx(phi(problem, x), abs=1e-10)
    assert result.grad.shape == x.shape and result.w.shape == (S,)
    # warm start from V* costs next to nothing
    assert hypergradient(problem, x, V=result.V).lower_iterations <= 30


def test_random_directions_for_large_variables():
    problem = make_problem(0.5, 0.9, "policy", sparse=False, seed=4)
    big = problem.x0.repeat(13)[:52]  # 52 > 50 entries: directional derivatives
    inner = problem.reward

    def reward(x: torch.Tensor) -> torch.Tensor:
        return inner(x.view(13, D).sum(0) / 13)

    problem.reward, problem.x0 = reward, big
    rows = gradcheck(problem, points=[big], seed=5)
    assert rows[0].n_directions == 10 and rows[0].label == "point 1"
    assert rows[0].rel_error <= 1e-6
    # fewer directions for a quicker check of a big problem (`brl gradcheck --directions 3`)
    heard = []
    rows = gradcheck(problem, points=[big], seed=5, n_directions=3,
                     progress=lambda *args: heard.append(args))
    assert rows[0].n_directions == 3 and rows[0].rel_error <= 1e-6
    assert heard == [("point 1", done, 3) for done in range(4)]


def test_near_deterministic_follower_with_a_large_reward_keeps_every_digit():
    """At reward 1e3 and tau 1e-3 the follower is deterministic (action gaps of ~1e5 tau), so
    phi = norm2(x) - const near x0 and the hyper-gradient is 2 x. g and pi * w[s] are each
    about the objective's size; their plain difference, times |J_r| / tau = 1e6, was off by
    1.2e-4. The centred form must give 2 x to rounding."""
    import bilevel_dsl as brl

    source = """brl 1
seed 3
mdp M = random_mdp(states = 5, actions = 4, successors = 1, discount = 0.99)
param F[M.S, M.A, 3] ~ uniform(0, 1)
param Rt[M.S, M.A] ~ uniform(0, 1)
var x[3] = [0.1, -0.2, 0.3]
lower M { temperature = 0.001  reward[s, a] = 1000 * sum {k in 0..2} F[s, a, k] * x[k] }
upper minimize norm2(x) - value(M, policy, Rt)
"""
    problem = brl.lower(brl.compile_source(source, "deterministic.brl"), device="cpu")
    grad = hypergradient(problem, problem.x0).grad
    torch.testing.assert_close(grad, 2 * problem.x0, rtol=0, atol=1e-9)


def test_a_point_given_as_integers_numpy_or_a_list_is_read_as_numbers():
    """What a notebook passes: `torch.tensor([2, 3])` (integers), a numpy array, a list. They
    gave raw tracebacks (`only Tensors of floating point dtype can require gradients`)."""
    import numpy as np
    from conftest import ROOT

    from bilevel_dsl import compile_file, lower

    problem = lower(compile_file(ROOT / "problems" / "maze_nav.brl"))
    expected = hypergradient(problem, torch.tensor([2.0, 3.0], dtype=torch.float64))
    for x in (torch.tensor([2, 3]), np.array([2, 3]), [2.0, 3.0]):
        assert torch.equal(hypergradient(problem, x).grad, expected.grad)
        assert phi(problem, x) == phi(problem, torch.tensor([2.0, 3.0], dtype=torch.float64))
        assert torch.equal(problem.reward(x), problem.reward(torch.tensor([2.0, 3.0],
                                                                          dtype=torch.float64)))
