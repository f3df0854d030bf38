"""M-SoBiRL reproduces the paper's synthetic run; the exact solver agrees with it."""

from __future__ import annotations

import pytest
import torch

from bilevel_dsl.instance import TabularProblem
from bilevel_dsl.softmdp import Transitions
from solvers import REGISTRY, Monitor, exact, m_sobirl
from solvers.m_sobirl import adjoint_step, centred_adjoint_step

DT = torch.float64


def synthetic(seed: int = 0, lower: float | None = None, sparse: bool = False) -> TabularProblem:
    """MATH.md's synthetic setting: S=10, A=5, gamma=0.5, tau=1, r = c[s,a] x^T M x, x in R^100."""
    S, A, d = 10, 5, 100
    g = torch.Generator().manual_seed(seed)
    n_next = torch.randint(1, S, (S * A, 1), generator=g)
    rank = torch.rand(S * A, S, generator=g).argsort(-1).argsort(-1)  # random order per row
    weights = torch.rand(S * A, S, generator=g, dtype=DT) * (rank < n_next)
    P = (weights / weights.sum(-1, keepdim=True)).view(S, A, S)
    T = Transitions.from_dense(P)
    if sparse:
        T = Transitions.from_coo(*T.coo(), S, A)
    c = torch.rand(S, A, generator=g, dtype=DT) * torch.rand(S, A, generator=g, dtype=DT)
    M = torch.randn(d, d, generator=g, dtype=DT)
    x0 = torch.randn(d, generator=g, dtype=DT)
    return TabularProblem(
        name="synthetic", transitions=T, discount=0.5, initial=torch.full((S,), 1.0 / S, dtype=DT),
        temperature=1.0, reward=lambda x: c * (x @ M @ x),
        objective=lambda x, pi: 0.5 * (x**2).sum() + 0.5 * (pi**2).sum(),
        x0=x0 if lower is None else x0.abs() + lower, seed=seed,
        lower_bound=None if lower is None else torch.tensor(lower, dtype=DT),
        upper_bound=None if lower is None else torch.tensor(1.0, dtype=DT),
    )


def options(solver, **given) -> dict:
    return REGISTRY.validate_options(solver.SPEC, given)


PAPER = {"outer": 1500, "beta": 8e-3, "zeta": 0.5, "inner": 10, "start": "cold",
         "init_w": "normal"}


@pytest.mark.parametrize("policy", ["softmax", "paper"])
@pytest.mark.parametrize("adjoint", ["centred", "fixed_point", "lsq"])
def test_synthetic_run_converges_to_the_known_answer(adjoint, policy):
    result = m_sobirl.run(synthetic(), options(m_sobirl, adjoint=adjoint, policy=policy, **PAPER),
                          Monitor())
    norms = result.history["hypergrad_norm"]
    assert len(norms) == len(result.history["objective"]) == len(result.history["time"]) == 1500
    assert norms[0] > 10 and norms[-1] < 1e-2
    assert result.stopped_because == "max_iterations" and result.iterations == 1500
    assert abs(result.objective - 1.0) < 1e-3  # x -> 0, pi -> uniform: f -> 1
    assert float(result.x.abs().max()) < 1e-2
    torch.testing.assert_close(result.policy, torch.full((10, 5), 0.2, dtype=DT), atol=1e-3,
                               rtol=0)


def test_bounds_are_respected_and_exact_agrees():
    problem = synthetic(seed=1, lower=0.02, sparse=True)
    seen = []

    class Watch(Monitor):
        def update(self, iteration, objective, hypergrad_norm):
            seen.append(iteration)

    result = m_sobirl.run(problem, options(m_sobirl, outer=800, beta=8e-3), Watch())
    assert seen == list(range(800))
    assert float(result.x.min()) >= 0.02 and float(result.x.max()) <= 1.0
    torch.testing.assert_close(result.policy.sum(-1), torch.ones(10, dtype=DT))
    reference = exact.run(problem, options(exact, outer=800, beta=8e-3, tol=1e-9), Monitor())
    assert reference.stopped_because == "converged"
    assert float(reference.x.min()) >= 0.02 and float(reference.x.max()) <= 1.0
    assert (reference.x == 0.02).sum() > 10  # a non-trivial constrained optimum
    torch.testing.assert_close(result.x, reference.x, rtol=0, atol=1e-6)
    torch.testing.assert_close(result.policy, reference.policy, rtol=0, atol=1e-6)
    assert result.objective == pytest.approx(reference.objective, abs=1e-8)


def test_adjoint_updates_reach_the_adjoint_solution():
    problem = synthetic(seed=2)
    T, gamma = problem.transitions, problem.discount
    g = torch.Generator().manual_seed(3)
    pi = torch.softmax(torch.randn(10, 5, generator=g, dtype=DT), -1)
    grad_pi = torch.randn(10, 5, generator=g, dtype=DT)
    gg = pi * grad_pi
    A = torch.eye(10, dtype=DT) - gamma * T.policy_matrix(pi)
    b = gg.sum(-1) - gamma * T.pull(gg)
    w_star = torch.linalg.solve(A.T, b)
    for kind, steps in (("fixed_point", 60), ("lsq", 400)):
        w = torch.zeros(10, dtype=DT)
        for _ in range(steps):
            w = adjoint_step(T, pi, gg, w, gamma, 0.5, kind)
        torch.testing.assert_close(w, w_star, rtol=0, atol=1e-10)
    # the centred adjoint converges to z with w = sum_a g - z
    z = torch.zeros(10, dtype=DT)
    for _ in range(60):
        z = centred_adjoint_step(T, pi, gg, gg.sum(-1), z, gamma)
    torch.testing.assert_close(gg.sum(-1) - z, w_star, rtol=0, atol=1e-10)


# A user's contract problem (3 states, gamma 0.9): a scalar bonus b for working, paid from
# the outcome. exact reaches phi = 17.8821 at b = 0.771 with beta = 0.02.
CONTRACT = """brl 1
set Q = {bad, ok, great}
param value_of[Q] = [0, 1, 3]
mdp firm = table {
    states = Q
    actions = {shirk, work}
    discount = 0.9
    transition[s, a, t] = if a == work then 0.8 * (t == min(s + 1, great)) + 0.2 * (t == s)
                          else 0.7 * (t == max(s - 1, bad)) + 0.3 * (t == s)
}
var b = 0.1 in [0, 5]
lower firm { temperature = 0.2  reward[s, a] = (b - 0.4) * (a == work) }
let d = occupancy(firm, policy)
upper maximize sum {s in firm.S, a in firm.A} d[s, a] * value_of[s]
               - sum {s in firm.S} d[s, work] * b
"""


def test_centred_adjoint_follows_x_where_the_plain_one_lags():
    """One plain fixed-point step per iteration lets w, which carries sum_a g / (1 - gamma),
    lag so far that h points the wrong way (||h|| 650 against a true 1.9 after one step); the
    centred z does not, and m_sobirl reaches exact's answer."""
    from bilevel_dsl import compile_source, lower

    problem = lower(compile_source(CONTRACT))
    runs = {adjoint: m_sobirl.run(problem, options(m_sobirl, beta=0.02, outer=500,
                                                   adjoint=adjoint), Monitor())
            for adjoint in ("centred", "fixed_point")}
    centred, plain = runs["centred"], runs["fixed_point"]
    assert float(centred.x) == pytest.approx(0.7710, abs=1e-3)
    assert centred.history["hypergrad_norm"][-1] < 1e-6
    assert max(centred.history["hypergrad_norm"][1:]) < 3 * centred.history["hypergrad_norm"][0]
    assert max(plain.history["hypergrad_norm"][1:]) > 30 * plain.history["hypergrad_norm"][0]
    assert abs(float(plain.x) - 0.771) > 0.1


def test_solved_start_begins_with_the_exact_hypergradient():
    from solvers.hypergrad import hypergradient

    problem = synthetic(seed=4)
    exact_norm = float(torch.linalg.vector_norm(hypergradient(problem, problem.x0).grad))
    solved = m_sobirl.run(problem, options(m_sobirl, outer=1), Monitor())
    assert solved.history["hypergrad_norm"][0] == pytest.approx(exact_norm, rel=1e-6)
    cold = m_sobirl.run(problem, options(m_sobirl, outer=1, start="cold"), Monitor())
    assert abs(cold.history["hypergrad_norm"][0] - exact_norm) > 0.1 * exact_norm


def test_interrupt_during_the_solved_start_returns_x0(monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(m_sobirl, "hypergradient", interrupted)
    problem = synthetic(seed=4)
    result = m_sobirl.run(problem, options(m_sobirl, outer=10), Monitor())
    assert result.stopped_because == "interrupted" and result.iterations == 0
    assert torch.equal(result.x, problem.x0)


@pytest.mark.parametrize("adjoint", ["centred", "fixed_point"])
def test_an_interrupt_returns_the_last_iterate_whose_objective_is_known(monkeypatch, adjoint):
    """Ctrl-C while the objective of x_5 is being evaluated: the run returns x_4 with the
    objective it recorded, without evaluating it again (as long as an iteration with a value
    objective on a large problem)."""
    calls = []
    derivatives = m_sobirl.upper_derivatives

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return derivatives(*args, **kwargs)

    monkeypatch.setattr(m_sobirl, "upper_derivatives", counted)
    problem = synthetic(seed=4)
    result = m_sobirl.run(problem, options(m_sobirl, outer=10, adjoint=adjoint), Monitor())
    assert result.stopped_because == "interrupted" and result.iterations == 4
    assert len(calls) == 6 and result.objective == result.history["objective"][-1]
    monkeypatch.setattr(m_sobirl, "upper_derivatives", derivatives)
    whole = m_sobirl.run(problem, options(m_sobirl, outer=4, adjoint=adjoint, verify="off"),
                         Monitor())  # four steps: x_4, and f(x_4, pi_4) evaluated at the end
    assert torch.equal(result.x, whole.x) and result.objective == whole.objective
    assert torch.isfinite(result.extra["w"]).all()


def test_caches_filled_in_inference_mode_still_serve_autograd():
    # the interpreter's and the kernel's shared tensors (index positions, literals, ones) are
    # made outside inference mode, whichever mode first asks for them
    from bilevel_dsl import compile_source, evaluate, lower, softmdp

    evaluate._ARANGE_CACHE.clear()
    evaluate._CONSTANTS_CACHE.clear()
    softmdp._ONES.clear()
    text = ("brl 1\nmdp M = random_mdp(states = 7, actions = 3)\nvar x[M.S] = 0.5\n"
            "lower M { temperature = 0.3  reward[s, a] = 1.25 * x[s] * a }\n"
            "upper minimize sum {s in M.S, a in M.A} policy[s, a]^2 + norm2(x)\n")
    with torch.inference_mode():
        problem = lower(compile_source(text))
        problem.reward(problem.x0)
        softmdp.sum_actions(torch.ones(7, 3, dtype=torch.float64))
    result = m_sobirl.run(problem, options(m_sobirl, outer=3), Monitor())
    assert result.iterations == 3 and torch.isfinite(result.x).all()


def test_more_adjoint_steps_per_iteration_track_the_adjoint_closer():
    # x held still (beta = 0) at gamma = 0.9: V and pi settle within a few outer iterations,
    # after which the adjoint's error shrinks by gamma per adjoint step.
    import dataclasses

    from solvers.hypergrad import hypergradient

    problem = dataclasses.replace(synthetic(seed=4), discount=0.9)
    w_star = hypergradient(problem, problem.x0).w
    errors = {}
    for steps in (1, 3):
        result = m_sobirl.run(problem, options(m_sobirl, outer=40, beta=0.0, inner=20,
                                               adjoint_steps=steps, start="cold",
                                               adjoint="fixed_point"), Monitor())
        errors[steps] = float((result.extra["w"] - w_star).abs().max())
    assert errors[3] < 1e-3 * errors[1]
    default = m_sobirl.run(problem, options(m_sobirl, outer=5, beta=0.0), Monitor())
    one = m_sobirl.run(problem, options(m_sobirl, outer=5, beta=0.0, adjoint_steps=1), Monitor())
    assert torch.equal(default.extra["w"], one.extra["w"])  # 1 is Algorithm 2 as written


def test_stopping_rules_and_interruption():
    problem = synthetic(seed=3)
    tol = m_sobirl.run(problem, options(m_sobirl, outer=5000, beta=8e-3, tol=1e-3), Monitor())
    assert tol.stopped_because == "converged" and tol.iterations < 5000
    assert tol.history["hypergrad_norm"][-1] < 1e-3

    class Interrupt(Monitor):
        def update(self, iteration, objective, hypergrad_norm):
            if iteration == 7:
                raise KeyboardInterrupt

    cut = m_sobirl.run(problem, options(m_sobirl, outer=100), Interrupt())
    assert cut.stopped_because == "interrupted" and cut.iterations == 7
    assert torch.isfinite(cut.x).all() and len(cut.history["objective"]) == 7
    cut = exact.run(problem, options(exact, outer=100), Interrupt())
    assert cut.stopped_because == "interrupted" and cut.iterations == 7

    class Stop(Monitor):
        def should_stop(self):
            return True

    assert m_sobirl.run(problem, options(m_sobirl), Stop()).iterations == 1
    assert exact.run(problem, options(exact), Stop()).stopped_because == "stopped"
    timed = m_sobirl.run(problem, options(m_sobirl, outer=10**6, time_limit=0.2), Monitor())
    assert timed.stopped_because == "time_limit" and timed.extra["time"] < 2
    assert "exact" not in timed.extra  # the final check, as long as the start, is skipped


def test_exact_line_search_descends_where_the_fixed_step_is_too_long():
    """At beta = 1 the fixed step overshoots the contract's optimum b = 0.771 and wanders;
    Armijo's halving makes every accepted step decrease phi and stops at the optimum."""
    from bilevel_dsl import compile_source, lower

    problem = lower(compile_source(CONTRACT))
    fixed = exact.run(problem, options(exact, beta=1.0, outer=60), Monitor())
    searched = exact.run(problem, options(exact, beta=1.0, outer=60, line_search="armijo"),
                         Monitor())
    objective = searched.history["objective"]
    assert all(b <= a for a, b in zip(objective, objective[1:]))
    assert float(searched.x) == pytest.approx(0.7710, abs=1e-3)
    assert searched.stopped_because in ("no_descent", "max_iterations")
    assert min(searched.history["step_size"]) < 1.0  # it did halve
    assert abs(float(fixed.x) - 0.771) > 1e-2


def test_verify_reports_the_exact_hypergradient_at_the_final_x():
    from solvers.hypergrad import hypergradient

    problem = synthetic()
    result = m_sobirl.run(problem, options(m_sobirl, outer=20, beta=8e-3), Monitor())
    truth = hypergradient(problem, result.x)
    assert result.extra["exact"]["hypergrad_norm"] == pytest.approx(
        float(truth.grad.norm()), rel=1e-8)
    assert result.extra["exact"]["objective"] == pytest.approx(truth.objective, rel=1e-10)


def test_the_last_iteration_is_recorded_whatever_log_every():
    """The history (and the end-of-run diagnosis read from it) ends at the final iterate, as
    the model-free solvers' does: 25 iterations every 7 record 0, 7, 14, 21 and 24."""
    problem = synthetic(seed=2)
    result = m_sobirl.run(problem, options(m_sobirl, outer=25, log_every=7, verify="off"),
                          Monitor())
    assert result.history["iteration"] == [0, 7, 14, 21, 24]
    every = m_sobirl.run(problem, options(m_sobirl, outer=25, verify="off"), Monitor())
    for key in ("objective", "hypergrad_norm", "stationarity"):
        assert result.history[key] == [every.history[key][k] for k in (0, 7, 14, 21, 24)]
