"""The soft-MDP kernel: dense and sparse storage agree, and every solve matches numpy."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from bilevel_dsl.softmdp import (
    Transitions,
    _BellmanLoop,
    occupancy,
    policy_evaluation,
    policy_matvec,
    policy_rmatvec,
    soft_bellman,
    soft_bellman_steps,
    soft_bellman_update,
    soft_policy,
    soft_policy_iteration,
    soft_q,
    soft_value_iteration,
    solve_policy_system,
)

DT = torch.float64


def random_P(S: int, A: int, seed: int, density: float = 0.2, mass: float = 1.0) -> torch.Tensor:
    """Random (S, A, S) kernel; rows scaled to ``mass`` (below one: sub-stochastic)."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(S, A, S, generator=g, dtype=DT)
    weights = weights * (torch.rand(S, A, S, generator=g, dtype=DT) < density)
    weights[..., 0] += 1e-3  # no empty row
    return weights / weights.sum(-1, keepdim=True) * mass


def both(P: torch.Tensor) -> tuple[Transitions, Transitions]:
    dense = Transitions.from_dense(P)
    return dense, Transitions.from_coo(*dense.coo(), P.shape[0], P.shape[1])


def random_policy(S: int, A: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(S, A, generator=g, dtype=DT), -1)


def test_dense_and_sparse_agree():
    S, A = 30, 4
    dense, sparse = both(random_P(S, A, 0, mass=0.95))
    g = torch.Generator().manual_seed(1)
    v, y = torch.randn(S, 3, generator=g, dtype=DT), torch.randn(S, A, 2, generator=g, dtype=DT)
    r, rho = torch.randn(S, A, generator=g, dtype=DT), torch.rand(S, generator=g, dtype=DT)
    pi = random_policy(S, A, 2)
    assert sparse.is_sparse and not dense.is_sparse
    torch.testing.assert_close(dense.expect(v), sparse.expect(v), rtol=0, atol=1e-14)
    torch.testing.assert_close(dense.expect(v[:, 0]), sparse.expect(v[:, 0]), rtol=0, atol=1e-14)
    torch.testing.assert_close(dense.pull(y), sparse.pull(y), rtol=0, atol=1e-14)
    torch.testing.assert_close(dense.pull(r), sparse.pull(r), rtol=0, atol=1e-14)
    torch.testing.assert_close(dense.row_sums(), sparse.row_sums(), rtol=0, atol=1e-14)
    # a move to where it already is keeps the object and its caches (row sums, layouts)
    assert sparse.to("cpu") is sparse and sparse.to(dtype=DT).row_sums() is sparse.row_sums()
    assert sparse.to(dtype=torch.float32).dtype == torch.float32
    torch.testing.assert_close(dense.dense(), sparse.dense(), rtol=0, atol=0)
    torch.testing.assert_close(dense.policy_matrix(pi), sparse.policy_matrix(pi))
    assert dense.nnz == sparse.nnz
    for T in (dense, sparse):
        assert T.n_states == S and T.n_actions == A and T.dtype == DT
        assert T.device == torch.device("cpu") and T.nbytes() > 0
    V = v[:, 0]
    torch.testing.assert_close(soft_bellman(dense, r, V, 0.9, 0.3),
                               soft_bellman(sparse, r, V, 0.9, 0.3))
    Vd, nd = soft_value_iteration(dense, r, 0.9, 0.3)
    Vs, ns = soft_value_iteration(sparse, r, 0.9, 0.3)
    torch.testing.assert_close(Vd, Vs, rtol=0, atol=1e-12)
    torch.testing.assert_close(policy_evaluation(dense, r, pi, 0.9, 0.3),
                               policy_evaluation(sparse, r, pi, 0.9, 0.3), rtol=0, atol=1e-12)
    torch.testing.assert_close(occupancy(dense, pi, rho, 0.9), occupancy(sparse, pi, rho, 0.9),
                               rtol=0, atol=1e-12)
    for method in ("direct", "krylov", "fixed_point"):
        for transpose in (False, True):
            torch.testing.assert_close(
                solve_policy_system(dense, pi, V, 0.9, transpose, method),
                solve_policy_system(sparse, pi, V, 0.9, transpose, method), rtol=0, atol=1e-10)


def test_products_are_adjoint_and_differentiable():
    S, A = 12, 3
    for T in both(random_P(S, A, 3, density=0.4)):
        g = torch.Generator().manual_seed(4)
        v = torch.randn(S, generator=g, dtype=DT, requires_grad=True)
        y = torch.randn(S, A, generator=g, dtype=DT, requires_grad=True)
        torch.testing.assert_close((T.expect(v) * y).sum(), (v * T.pull(y)).sum())
        assert torch.autograd.gradcheck(T.expect, (v,))
        assert torch.autograd.gradcheck(T.pull, (y,))
        assert torch.autograd.gradgradcheck(T.expect, (v,))
        pi = random_policy(S, A, 5)
        w = torch.randn(S, generator=g, dtype=DT)
        torch.testing.assert_close(policy_matvec(T, pi, w), T.policy_matrix(pi) @ w)
        torch.testing.assert_close(policy_rmatvec(T, pi, w), T.policy_matrix(pi).T @ w)


def test_from_coo_sums_duplicates_and_checks_indices():
    rows = torch.tensor([0, 0, 0, 3, 5])
    cols = torch.tensor([1, 1, 2, 0, 2])
    vals = torch.tensor([0.25, 0.25, 0.5, 1.0, 0.0], dtype=DT)
    T = Transitions.from_coo(rows, cols, vals, n_states=3, n_actions=2)
    expected = torch.zeros(3, 2, 3, dtype=DT)
    expected[0, 0, 1], expected[0, 0, 2], expected[1, 1, 0] = 0.5, 0.5, 1.0
    torch.testing.assert_close(T.dense(), expected)
    assert T.nnz == 3  # duplicates merged, explicit zero dropped
    torch.testing.assert_close(T.row_sums(), expected.sum(-1))
    with pytest.raises(ValueError, match="out of range"):
        Transitions.from_coo(torch.tensor([6]), torch.tensor([0]), torch.ones(1), 3, 2)


def test_auto_picks_storage_by_size_and_density():
    small = random_P(10, 2, 0)
    assert not Transitions.auto(small).is_sparse
    S, A = 400, 8  # 1.28M entries, 1% dense
    rows = torch.arange(S * A).repeat_interleave(4)
    cols = torch.randint(0, S, (S * A * 4,), generator=torch.Generator().manual_seed(0))
    vals = torch.full((S * A * 4,), 0.25, dtype=DT)
    T = Transitions.auto((rows, cols, vals), S, A)
    assert T.is_sparse
    torch.testing.assert_close(T.row_sums(), torch.ones(S, A, dtype=DT))
    assert Transitions.auto(T.dense()).is_sparse


@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("tau", [1.0, 0.05])
def test_value_iteration_reaches_the_soft_bellman_fixed_point(gamma, tau):
    S, A = 25, 3
    g = torch.Generator().manual_seed(7)
    r = torch.randn(S, A, generator=g, dtype=DT)
    for T in both(random_P(S, A, 6)):
        V, iterations = soft_value_iteration(T, r, gamma, tau, tol=1e-11)
        Q = soft_q(T, r, V, gamma)
        torch.testing.assert_close(soft_bellman(T, r, V, gamma, tau), V, rtol=0, atol=1e-10)
        pi = soft_policy(Q, tau)
        # softmax temporal consistency and V* = V^{pi*} with the entropy bonus
        torch.testing.assert_close(pi, torch.exp((Q - V[:, None]) / tau), rtol=1e-8, atol=0)
        torch.testing.assert_close(policy_evaluation(T, r, pi, gamma, tau), V, rtol=0, atol=1e-9)
        # warm start from the answer stops within a few rounding-limited steps (how many
        # depends on rounding noise: 1 to 40 were seen at gamma = 0.99, against ~2,600 cold)
        _, warm = soft_value_iteration(T, r, gamma, tau, V0=V, tol=1e-10)
        assert warm <= min(60, iterations // 10)


@pytest.mark.parametrize("gamma", [0.9, 0.999, 1.0])
def test_policy_iteration_reaches_the_fixed_point_in_a_few_steps(gamma):
    """Newton's method needs a handful of steps where value iteration needs thousands of sweeps
    (gamma 0.999), and works on undiscounted episodes with sub-stochastic rows (gamma 1)."""
    S, A, tau = 25, 3, 0.1
    g = torch.Generator().manual_seed(8)
    r = torch.randn(S, A, generator=g, dtype=DT)
    for T in both(random_P(S, A, 9, mass=0.9 if gamma == 1.0 else 1.0)):
        V, steps = soft_policy_iteration(T, r, gamma, tau, tol=1e-12)
        # a Bellman residual at rounding level (value iteration's stops near 1024 ulps)
        scale = float(V.abs().max())
        torch.testing.assert_close(soft_bellman(T, r, V, gamma, tau), V, rtol=0,
                                   atol=1e-13 * scale)
        assert steps <= 12
        reference, sweeps = soft_value_iteration(T, r, gamma, tau, tol=1e-10)
        torch.testing.assert_close(V, reference, rtol=1e-9, atol=1e-9)
        if gamma == 0.999:
            assert sweeps > 1000 * steps
        # from a nearby warm start: quadratic convergence
        _, warm = soft_policy_iteration(T, r + 1e-4, gamma, tau, V0=V, tol=1e-12)
        assert warm <= 5


@pytest.mark.parametrize("A", [1, 3, 4])
@pytest.mark.parametrize("tau,shifted", [(0.3, True), (0.004, False)])
def test_bellman_loop_matches_the_operator(A, tau, shifted):
    """The inner loop (one constant shift where it is safe, else each state's maximum and,
    for sparse P, the action-major layout) must equal the plain operator applied n times, for
    dense and sparse storage and for a sparse matrix whose rows differ in length; so must a
    loop that starts from the product kept by the last one."""
    S, gamma = 17, 0.9
    g = torch.Generator().manual_seed(11)
    r = torch.randn(S, A, generator=g, dtype=DT)
    V0 = torch.randn(S, generator=g, dtype=DT)
    for T in both(random_P(S, A, 3, density=0.3)):
        loop = _BellmanLoop(T, r, V0 / tau, gamma, tau, 4)
        assert (loop.shift is not None) == shifted
        V = V0
        for _ in range(4):
            V = soft_bellman(T, r, V, gamma, tau)
        fast = soft_bellman_steps(T, r, V0, gamma, tau, 4)
        torch.testing.assert_close(fast, V, rtol=1e-13, atol=1e-13)
        V_update, pi, PV = soft_bellman_update(T, r, V0, gamma, tau, 4)
        torch.testing.assert_close(V_update, V, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(pi, soft_policy(soft_q(T, r, V, gamma), tau),
                                   rtol=1e-12, atol=1e-15)
        assert pi.is_contiguous() and pi.shape == (S, A)
        torch.testing.assert_close(PV, T.expect(V_update), rtol=1e-13, atol=1e-13)
        # the next call, with another reward, starts from the kept product: the same numbers,
        # also where that call's layout differs (the product does not depend on tau)
        r2 = r + torch.randn(S, A, generator=g, dtype=DT)
        for tau2 in (tau, 0.3, 0.004):
            kept = soft_bellman_update(T, r2, V_update, gamma, tau2, 3, PV)
            fresh = soft_bellman_update(T, r2, V_update, gamma, tau2, 3)
            for a, b in zip(kept, fresh):
                torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("steps", [None, 10])
def test_constant_shift_bounds_every_exponent_it_covers(dtype, steps):
    """_constant_shift's C must keep every q - C in [-window, 0] (no overflow, no subnormal
    exp: 700 in float64, 79 in float32) for all later steps (steps = None) or for the next
    10 and the Q after them, from a cold and a warm start, for stochastic and sub-stochastic
    rows, and with rewards far from 0; and the loop must then match the plain operator."""
    S, A = 30, 4
    g = torch.Generator().manual_seed(5)
    window = 700.0 if dtype == torch.float64 else 79.0
    cases = [(0.9, 1.0, 1.0, 0.0), (0.99, 0.5, 0.9, 0.0), (0.5, 0.02, 1.0, 0.0),
             (0.8, 2.0, 0.95, -3.0)]
    if steps is not None:  # a drift from V = 0 to V* far from 0 fits in a few steps only
        cases += [(0.9, 1.0, 1.0, 100.0), (0.9, 1.0, 0.9, -30.0)]
    if dtype == torch.float32:
        cases = [(0.9, 1.0, 1.0, 0.0), (0.5, 0.2, 0.9, 0.0)]
    for gamma, tau, mass, offset in cases:
        P = random_P(S, A, 6, mass=mass).to(dtype)
        r = (torch.rand(S, A, generator=g, dtype=DT) * 3 - 1 + offset).to(dtype)
        for T in both(P):
            for V0 in (torch.zeros(S, dtype=dtype),
                       (torch.randn(S, generator=g, dtype=DT) * 2).to(dtype)):
                u = V0 / tau
                loop = _BellmanLoop(T, r, u, gamma, tau, steps)
                assert loop.shift is not None, (gamma, tau, mass, offset)
                for _ in range(300 if steps is None else steps + 1):
                    q = r / tau + gamma * T.expect(u)
                    assert float((q - loop.shift).max()) <= 1e-5 * (1 + abs(loop.shift))
                    assert float((q - loop.shift).min()) >= -window
                    u = torch.logsumexp(q, -1)
                reference = V0
                for _ in range(5):
                    reference = soft_bellman(T, r, reference, gamma, tau)
                torch.testing.assert_close(soft_bellman_steps(T, r, V0, gamma, tau, 5),
                                           reference)


def test_constant_shift_is_refused_where_the_exponents_spread_too_far():
    S, A = 30, 4
    P = random_P(S, A, 6)
    r = torch.rand(S, A, generator=torch.Generator().manual_seed(6), dtype=DT)
    zero = torch.zeros(S, dtype=DT)
    dense = Transitions.from_dense(P)
    assert _BellmanLoop(dense, r, zero, 0.99, 0.01, None).shift is None  # low temperature
    assert _BellmanLoop(dense, r + 100, zero, 0.9, 1.0, None).shift is None  # a long drift
    assert _BellmanLoop(dense, r + 100, zero, 0.9, 1.0, 10).shift is not None
    assert _BellmanLoop(Transitions.from_dense(P * 0.9), r + 1000, zero, 0.9, 1.0,
                        None).shift is None  # episodes end: the range reaches to 0
    assert _BellmanLoop(dense, r, zero, 1.0, 1.0, None).shift is None  # no contraction
    # float32's narrower window (79) refuses what float64's (700) accepts
    assert _BellmanLoop(dense, r, zero, 0.5, 0.02, None).shift is not None
    assert _BellmanLoop(Transitions.from_dense(P.float()), r.float(), zero.float(), 0.5, 0.02,
                        None).shift is None


@pytest.mark.parametrize("tau", [0.0, 0.7])
def test_policy_evaluation_matches_numpy(tau):
    S, A, gamma = 20, 3, 0.95
    P = random_P(S, A, 8, mass=0.9)
    g = torch.Generator().manual_seed(9)
    r = torch.randn(S, A, generator=g, dtype=DT)
    pi = random_policy(S, A, 10)
    Pn, rn, pn = P.numpy(), r.numpy(), pi.numpy()
    P_pi = np.einsum("sa,sat->st", pn, Pn)
    b = (pn * (rn - tau * np.log(pn))).sum(-1)
    expected = np.linalg.solve(np.eye(S) - gamma * P_pi, b)
    rho = np.full(S, 1.0 / S)
    mu = np.linalg.solve((np.eye(S) - gamma * P_pi).T, rho)
    for T in both(P):
        for method in ("direct", "krylov", "fixed_point"):
            V = policy_evaluation(T, r, pi, gamma, tau, method=method)
            np.testing.assert_allclose(V.numpy(), expected, rtol=1e-10, atol=1e-10)
            d = occupancy(T, pi, torch.from_numpy(rho), gamma, method=method)
            np.testing.assert_allclose(d.numpy(), pn * mu[:, None], rtol=1e-10, atol=1e-12)
            if tau == 0.0:  # sum d r = rho . V^pi
                np.testing.assert_allclose((d * r).sum().item(), rho @ expected, rtol=1e-10)


@pytest.mark.parametrize("method", ["direct", "krylov"])
def test_policy_evaluation_and_occupancy_gradients(method):
    S, A, gamma = 7, 3, 0.9
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(S, A, generator=g, dtype=DT, requires_grad=True)
    r = torch.randn(S, A, generator=g, dtype=DT, requires_grad=True)
    rho = torch.rand(S, generator=g, dtype=DT, requires_grad=True)
    for T in both(random_P(S, A, 12, density=0.5, mass=0.97)):
        def value(r, logits, T=T):
            return policy_evaluation(T, r, torch.softmax(logits, -1), gamma, 0.3, method=method)

        def visits(logits, rho, T=T):
            return occupancy(T, torch.softmax(logits, -1), rho, gamma, method=method)

        def solve(pi, b, T=T):
            return solve_policy_system(T, pi, b, gamma, transpose=True, method=method)

        assert torch.autograd.gradcheck(value, (r, logits))
        assert torch.autograd.gradcheck(visits, (logits, rho))
        pi = random_policy(S, A, 13).requires_grad_(True)  # raw pi entries, not via softmax
        assert torch.autograd.gradcheck(solve, (pi, rho))


def test_extreme_temperature_and_rewards_stay_finite():
    S, A, gamma, tau = 40, 5, 0.9, 1e-4
    g = torch.Generator().manual_seed(14)
    r = (1e4 * torch.randn(S, A, generator=g, dtype=DT)).requires_grad_(True)
    for T in both(random_P(S, A, 15)):
        V, _ = soft_value_iteration(T, r, gamma, tau)
        Q = soft_q(T, r, V, gamma)
        pi = soft_policy(Q, tau)
        assert torch.isfinite(V).all() and torch.isfinite(pi).all()
        assert (pi < 1e-300).any()  # exp underflows here (softmdp floors it at exp(-700))
        torch.testing.assert_close(soft_bellman(T, r, V, gamma, tau), V, rtol=1e-12, atol=1e-9)
        value = policy_evaluation(T, r, pi, gamma, tau)
        (grad,) = torch.autograd.grad(value.sum(), r)
        assert torch.isfinite(value).all() and torch.isfinite(grad).all()
        torch.testing.assert_close(value, V, rtol=1e-10, atol=1e-6)


def test_substochastic_rows_and_undiscounted_episodes():
    # a chain 0 -> 1 -> 2 -> end (all mass leaves the MDP from state 2), one action
    S, A = 3, 1
    rows, cols = torch.tensor([0, 1]), torch.tensor([1, 2])
    T = Transitions.from_coo(rows, cols, torch.ones(2, dtype=DT), S, A)
    torch.testing.assert_close(T.row_sums(), torch.tensor([[1.0], [1.0], [0.0]], dtype=DT))
    r = torch.tensor([[1.0], [2.0], [4.0]], dtype=DT)
    V, _ = soft_value_iteration(T, r, 1.0, 0.5)
    torch.testing.assert_close(V, torch.tensor([7.0, 6.0, 4.0], dtype=DT))
    pi = torch.ones(S, A, dtype=DT)
    for method in ("direct", "krylov", "fixed_point"):
        torch.testing.assert_close(policy_evaluation(T, r, pi, 1.0, method=method), V)
    d = occupancy(T, pi, torch.tensor([1.0, 0.0, 0.0], dtype=DT), 1.0)
    torch.testing.assert_close(d, torch.ones(S, A, dtype=DT))


def test_gmres_on_the_complement_solves_the_same_system(monkeypatch):
    """GMRES run on B for (I - B) x = b (what the policy solves do) reaches the same solution,
    to its relative residual, as GMRES run on I - B and as a direct solve, across restarts."""
    from bilevel_dsl import softmdp

    monkeypatch.setattr(softmdp, "_GMRES_RESTART", 3)
    S = 120
    g = torch.Generator().manual_seed(3)
    B = torch.rand(S, S, generator=g, dtype=DT)
    B = 0.97 * B / B.sum(1, keepdim=True)  # spectral radius 0.97: a few restart cycles
    b = torch.randn(S, generator=g, dtype=DT)
    A = torch.eye(S, dtype=DT) - B
    exact = torch.linalg.solve(A, b)
    for complement in (False, True):
        x, converged = softmdp._gmres((lambda v: B @ v) if complement else (lambda v: A @ v), b,
                                      1e-12, 1000, complement=complement)
        assert converged
        assert float(torch.linalg.vector_norm(b - A @ x)) <= 1e-12 * float(
            torch.linalg.vector_norm(b)) * 1.01
        torch.testing.assert_close(x, exact, rtol=1e-9, atol=1e-10)


def test_stalled_gmres_is_finished_by_the_fixed_point(monkeypatch):
    # Restarted GMRES can stagnate on (I - gamma P_pi)^T of a slowly mixing chain (on a 10^4-state
    # maze at gamma = 0.99 it ran 10^5 iterations to a relative residual of 0.9). A restart cycle
    # that does worse than gamma^m hands over to the fixed point, started from GMRES's answer.
    # Here: a deterministic ring (it never mixes) and GMRES(2), which stalls on it.
    from bilevel_dsl import softmdp

    S, gamma = 40, 0.99
    states = torch.arange(S)
    T = Transitions.from_coo(states, (states + 1) % S, torch.ones(S, dtype=DT), S, 1)
    pi = torch.ones(S, 1, dtype=DT)
    b = torch.randn(S, generator=torch.Generator().manual_seed(7), dtype=DT)
    M = torch.eye(S, dtype=DT) - gamma * T.policy_matrix(pi)
    monkeypatch.setattr(softmdp, "_GMRES_RESTART", 2)
    _, converged = softmdp._gmres(lambda v: M @ v, b, 1e-12, 1000, stall=gamma**2)
    assert not converged
    handed_over = []
    original = softmdp._fixed_point
    monkeypatch.setattr(softmdp, "_fixed_point",
                        lambda *a, **k: handed_over.append(k.get("v0")) or original(*a, **k))
    for transpose in (False, True):
        v = softmdp._solve(T, pi, b, gamma, transpose, "krylov", 1e-12)
        torch.testing.assert_close((M.mT if transpose else M) @ v, b, rtol=0, atol=1e-9)
    assert len(handed_over) == 2 and all(v0 is not None for v0 in handed_over)


@pytest.mark.parametrize("method", ["krylov", "fixed_point"])
@pytest.mark.parametrize("transpose", [False, True])
def test_a_warm_started_solve_is_the_cold_one_in_fewer_products(monkeypatch, method, transpose):
    """`value(M, policy)` is solved again for each new policy: from the last answers (solution
    and adjoint), the same solution and gradient to the tolerance, in fewer products (with a
    policy 1e-3 away, 20 to 30% fewer for GMRES, which converges fast on this well mixing
    chain, and 30 to 65% for the fixed point)."""
    from bilevel_dsl import softmdp

    S, A, gamma = 60, 3, 0.95
    P = Transitions.from_coo(*Transitions.from_dense(random_P(S, A, 5)).coo(), S, A)
    b = torch.randn(S, generator=torch.Generator().manual_seed(1), dtype=DT)
    products = []
    for name in ("policy_matvec", "policy_rmatvec"):
        original = getattr(softmdp, name)
        monkeypatch.setattr(softmdp, name, lambda *a, f=original: products.append(1) or f(*a))
    warm = softmdp.WarmStart()
    for step, seed in enumerate((2, 2, 3)):  # the same policy, then a nearby one
        pi = random_policy(S, A, 2)
        if seed == 3:
            pi = torch.softmax(pi.log() + 1e-3 * random_policy(S, A, 3), -1)
        results = []
        for state in (None, warm):
            del products[:]
            leaf = pi.clone().requires_grad_(True)
            v = solve_policy_system(P, leaf, b, gamma, transpose, method, warm=state)
            (grad,) = torch.autograd.grad(v.square().sum(), leaf)
            results.append((v, grad, len(products)))
        (cold, cold_grad, cold_products), (hot, hot_grad, hot_products) = results
        torch.testing.assert_close(hot, cold, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(hot_grad, cold_grad, rtol=1e-8, atol=1e-8)
        if step:  # the first warm solve starts from nothing
            # the same policy: a step or two each way; a nearby one: a part of the way
            assert hot_products <= 10 if step == 1 else hot_products < 0.85 * cold_products, (
                hot_products, cold_products)
    assert warm.solution is not None and warm.adjoint is not None
    # a zero right-hand side is zero at once (from the guess, its residual would only shrink
    # to underflow), and an infinite one is not the guess that no residual can measure
    del products[:]
    zero = solve_policy_system(P, pi, torch.zeros_like(b), gamma, transpose, method, warm=warm)
    assert torch.equal(zero, torch.zeros_like(b)) and len(products) <= 2
    infinite = b.clone()
    infinite[3] = math.inf
    with pytest.warns(UserWarning, match="non-finite"):
        v = solve_policy_system(P, pi, infinite, gamma, transpose, method, warm=warm)
    assert not bool(torch.isfinite(v).all())


@pytest.mark.parametrize("method", ["krylov", "fixed_point", "direct"])
def test_a_diverged_policy_ends_the_solve_at_once(method):
    # A NaN in pi once kept GMRES (and the fixed point) iterating to their iteration limits;
    # SuperLU stopped with "exactly singular". The factorisation returns NaN without a warning
    # (as the dense LU always did: the solvers report non-finite runs in their own words).
    S = 600
    states = torch.arange(S)
    T = Transitions.from_coo(states, (states + 1) % S, torch.ones(S, dtype=DT), S, 1)
    pi = torch.ones(S, 1, dtype=DT)
    pi[3] = float("nan")
    b = torch.ones(S, dtype=DT)
    for transpose in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            v = solve_policy_system(T, pi, b, 0.99, transpose=transpose, method=method)
        assert not torch.isfinite(v).all()
        assert [str(w.message) for w in caught] == ([] if method == "direct" else [
            "a linear system in (I - gamma P_pi) has non-finite entries: its solution is not "
            "finite"])


def test_newton_is_chosen_where_it_pays():
    """Few factorised solves beat thousands of sweeps on a small problem near gamma 1; a few
    dozen sweeps beat 2,000-state factorisations at gamma 0.5; GMRES-sized problems keep value
    iteration."""
    from types import SimpleNamespace

    from bilevel_dsl.softmdp import newton_pays

    def P(S: int, A: int, sparse: bool = False, nnz: int = 0) -> SimpleNamespace:
        # envelope: a dense matrix's, or a random sparse one's (bandwidth 0.9 S, as measured)
        # a random sparse P's factors fill in (lu_work is inf), a dense one's cost S^3 / 3
        work = math.inf if sparse else S**3 / 3
        return SimpleNamespace(n_states=S, n_actions=A, is_sparse=sparse, nnz=nnz,
                               lu_work=lambda: work)

    assert newton_pays(P(35, 4), 0.999) and newton_pays(P(35, 4), 0.9)
    assert not newton_pays(P(2000, 4), 0.5) and newton_pays(P(2000, 4), 0.999)
    assert not newton_pays(P(10_000, 4, sparse=True, nnz=160_000), 0.999)
    # dense P factorises up to 5,000 states (an LU is about S / (50 A) products with P)
    assert newton_pays(P(5000, 4), 0.999) and not newton_pays(P(5001, 4), 0.999)


def _grid_walk(n: int, stay: float = 0.1) -> Transitions:
    """An n x n grid, four actions that move (or stay at a wall), slip ``stay`` in place."""
    S = n * n
    rows, cols, values = [], [], []
    for s in range(S):
        r, c = divmod(s, n)
        for a, (dr, dc) in enumerate(((-1, 0), (1, 0), (0, -1), (0, 1))):
            t = min(max(r + dr, 0), n - 1) * n + min(max(c + dc, 0), n - 1)
            rows += [s * 4 + a, s * 4 + a]
            cols += [t, s]
            values += [1.0 - stay, stay]
    return Transitions.from_coo(torch.tensor(rows), torch.tensor(cols),
                                torch.tensor(values, dtype=DT), S, 4)


def test_the_envelope_tells_grids_from_expanders():
    from bilevel_dsl.softmdp import direct_solves

    S = 1000
    states = torch.arange(S)
    path = Transitions.from_coo(states[:-1], states[1:], torch.ones(S - 1, dtype=DT), S, 1)
    assert path.envelope() == (1, S - 1.0)  # a path is already banded: one entry per row
    grid = _grid_walk(30)
    band, work = grid.envelope()
    assert 30 <= band <= 60 and work < 900 * 60**2
    g = torch.Generator().manual_seed(0)
    successors = torch.randint(0, S, (S * 4, 5), generator=g)
    expander = Transitions.from_coo(torch.arange(S * 4).repeat_interleave(5),
                                     successors.reshape(-1), torch.full((S * 20,), 0.2,
                                                                        dtype=DT), S, 4)
    assert expander.envelope()[0] > 0.5 * S
    assert direct_solves(path) and direct_solves(grid) and not direct_solves(expander)
    # SuperLU's ordering beats the envelope on the grid; the expander is never factorised
    assert path.lu_work() <= 3 * S and 0 < grid.lu_work() < work
    assert expander.lu_work() == math.inf


def test_a_hub_state_does_not_hide_a_grid():
    """Every state of a 40 x 40 grid resets to the start with probability 0.01: the start is
    linked to all 1,600 states, which made the bandwidth S and sent the grid to GMRES (150 x
    150 at gamma 0.999: 20.9 s a solve against 0.10 s for SuperLU, an adversarial review). It is
    ordered last and counted as a dense row and column."""
    from bilevel_dsl.softmdp import direct_solves

    n, reset = 40, 0.01
    grid = _grid_walk(n)
    rows, cols, values = grid.coo()
    S = grid.n_states
    T = Transitions.from_coo(torch.cat([rows, torch.arange(S * 4)]),
                             torch.cat([cols, torch.zeros(S * 4, dtype=torch.long)]),
                             torch.cat([values * (1 - reset), torch.full((S * 4,), reset,
                                                                         dtype=DT)]), S, 4)
    band, work = T.envelope()
    assert band <= 2 * n and work < 2 * grid.envelope()[1]  # the grid's, give or take
    assert direct_solves(T)
    g = torch.Generator().manual_seed(2)
    pi = torch.softmax(20 * torch.randn(S, 4, generator=g, dtype=DT), -1)
    b = torch.randn(S, generator=g, dtype=DT)
    M = torch.eye(S, dtype=DT) - 0.999 * T.policy_matrix(pi)
    torch.testing.assert_close(M @ solve_policy_system(T, pi, b, 0.999), b, rtol=0, atol=1e-11)


def test_more_hubs_than_sqrt_states_still_factorise_and_a_dense_graph_does_not():
    """40 hubs on a 30 x 30 grid (more than sqrt(S) = 30, each linked to about 170 states):
    they were all counted in the bandwidth, which sent the grid to GMRES; now each costs its
    dense row and column. A graph of hubs only is still left to GMRES."""
    from bilevel_dsl.softmdp import direct_solves

    n, hubs, reset = 30, 40, 0.005
    grid = _grid_walk(n)
    rows, cols, values = grid.coo()
    S = grid.n_states
    pairs = torch.arange(S * 4).repeat(2)
    targets = torch.randint(0, hubs, (S * 8,), generator=torch.Generator().manual_seed(3))
    T = Transitions.from_coo(torch.cat([rows, pairs]), torch.cat([cols, targets]),
                             torch.cat([values * (1 - 2 * reset),
                                        torch.full((S * 8,), reset, dtype=DT)]), S, 4)
    band, work = T.envelope()
    assert band <= 2 * n + hubs and work < 20 * grid.envelope()[1]
    assert direct_solves(T)
    everywhere = torch.randint(0, S, (S * 4, 200), generator=torch.Generator().manual_seed(0))
    expander = Transitions.from_coo(torch.arange(S * 4).repeat_interleave(200),
                                    everywhere.reshape(-1),
                                    torch.full((S * 800,), 1 / 200, dtype=DT), S, 4)
    assert expander.envelope()[0] > 0.25 * S and not direct_solves(expander)


def test_sparse_factorisation_matches_gmres_and_serves_the_backward_pass(monkeypatch):
    """On a 1,600-state grid at gamma 0.99 with a nearly deterministic policy (where GMRES is
    slow) the SuperLU solve agrees with GMRES, in both orientations, and a forward and backward
    pass factorise once."""
    import scipy.sparse.linalg

    T = _grid_walk(40)
    S, gamma = T.n_states, 0.99
    g = torch.Generator().manual_seed(1)
    pi = torch.softmax(20 * torch.randn(S, 4, generator=g, dtype=DT), -1)
    b = torch.randn(S, generator=g, dtype=DT)
    M = torch.eye(S, dtype=DT) - gamma * T.policy_matrix(pi)
    for transpose in (False, True):
        direct = solve_policy_system(T, pi, b, gamma, transpose, "direct")
        krylov = solve_policy_system(T, pi, b, gamma, transpose, "krylov")
        torch.testing.assert_close((M.mT if transpose else M) @ direct, b, rtol=0, atol=1e-12)
        torch.testing.assert_close(direct, krylov, rtol=1e-8, atol=1e-8)
    assert T.lu_work() < math.inf  # its trial factorisation happens once, here
    factorisations = []
    original = scipy.sparse.linalg.splu
    monkeypatch.setattr(scipy.sparse.linalg, "splu",
                        lambda A: factorisations.append(A) or original(A))
    pi.requires_grad_(True)
    b.requires_grad_(True)
    v = solve_policy_system(T, pi, b, gamma)  # auto: the grid's envelope is narrow
    grad_pi, grad_b = torch.autograd.grad(v.square().sum(), (pi, b))
    assert len(factorisations) == 1
    z = torch.linalg.solve(M.mT, 2 * v.detach())
    torch.testing.assert_close(grad_b, z, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grad_pi, gamma * z.unsqueeze(-1) * T.expect(v.detach()),
                               rtol=1e-9, atol=1e-9)


def test_the_trial_factorisation_counts_its_work_without_overflow():
    """scipy's int32 counts multiplied in int32 wrapped around above 2^31: a band of random
    links 800 wide on 10^4 states (5.2e9 multiply-adds) counted 8.6e8, under the 5e9 limit,
    and got factorised at 2-3 s a solve where GMRES takes 0.02 s (an adversarial review)."""
    S, width, k = 10_000, 800, 4
    g = torch.Generator().manual_seed(0)
    rows = torch.arange(S).repeat_interleave(k)
    cols = (rows + torch.randint(-width, width + 1, (S * k,), generator=g)).clamp(0, S - 1)
    P = Transitions.from_coo(rows, cols, torch.full((S * k,), 1.0 / k, dtype=DT), S, 1)
    assert P.envelope()[1] <= 1e10  # within reach of the trial
    assert P.lu_work() >= 2**31  # counted whole (inf: above the limit)
