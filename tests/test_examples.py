"""Every example problem, solved with its file's own settings, gives a meaningful answer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import bilevel_dsl as brl
from bilevel_dsl.softmdp import policy_rmatvec
from solvers import solve
from solvers.hypergrad import phi, solve_lower

PROBLEMS = Path(__file__).resolve().parent.parent / "problems"


def _problem(name: str, **overrides: str):
    return brl.lower(brl.compile_file(PROBLEMS / f"{name}.brl", overrides=overrides), "cpu")


def _follower_policy(problem, x: torch.Tensor) -> torch.Tensor:
    """pi*_x with the lower level solved to 1e-12 (not the solver's running estimate)."""
    with torch.no_grad():
        _, pi, _ = solve_lower(problem, problem.reward(x), None, 1e-12)
    return pi


def _reach_probability(problem, pi: torch.Tensor, steps: int) -> float:
    """Probability that the episode has ended (the goal was entered) within `steps` steps."""
    d = problem.initial.clone()
    for _ in range(steps):
        d = policy_rmatvec(problem.transitions, pi, d)
    return 1.0 - float(d.sum())


def test_maze_policy_reaches_the_true_goal():
    """The goal starts at the robot's start cell; the file's solve relocates it to (near) the
    true goal, the best point found by any solver, and the robot then reaches G."""
    problem = _problem("maze_nav")
    G = torch.tensor([4.0, 7.0], dtype=torch.float64)
    assert problem.x0.tolist() == [0.0, 0.0]
    spec, result = solve(problem, None)
    assert spec.name == "m_sobirl"
    pi = _follower_policy(problem, result.x)
    assert _reach_probability(problem, pi, 60) > 0.9
    assert _reach_probability(problem, _follower_policy(problem, problem.x0), 60) < 0.5
    assert float(torch.linalg.vector_norm(result.x - G)) < 0.1
    assert phi(problem, result.x) <= phi(problem, G) + 1e-4
    assert result.history["hypergrad_norm"][-1] < 1e-2
    # G itself is a stationary point: solved there (the default start), m_sobirl stays
    problem.x0 = G
    _, stay = solve(problem, None, {"outer": 50})
    assert max(stay.history["hypergrad_norm"]) < 1e-6
    assert torch.allclose(stay.x, G)


def test_contract_pays_nonnegative_amounts_and_beats_paying_nothing():
    problem = _problem("contract_design")
    _, result = solve(problem, None)
    assert bool((result.x >= 0).all())
    paid = phi(problem, result.x)  # minimised: the negated principal's utility
    nothing = phi(problem, torch.zeros_like(result.x))
    assert -paid > -nothing + 1.0


def test_shaping_beats_the_unshaped_reward_on_the_original_task():
    problem = _problem("reward_shaping", price="0")  # judge by the original task alone
    _, result = solve(problem, None)
    shaped = -phi(problem, result.x)
    unshaped = -phi(problem, torch.zeros_like(result.x))
    assert shaped > unshaped + 0.02


def test_synthetic_behaves_as_in_the_paper():
    problem = _problem("synthetic")
    _, result = solve(problem, None)
    h = result.history["hypergrad_norm"]
    assert h[0] > 10  # starts large (about 60 in the paper)
    assert max(h[1500:]) < 1e-2
    assert abs(result.objective - 1.0) < 1e-3


def test_same_seed_same_numbers():
    first = solve(_problem("maze_nav"), None, {"outer": 50})[1]
    second = solve(_problem("maze_nav"), None, {"outer": 50})[1]
    assert torch.equal(first.x, second.x)
    assert first.history["objective"] == second.history["objective"]


@pytest.mark.parametrize("name", ["maze_nav", "reward_shaping", "contract_design", "synthetic"])
def test_gradcheck_passes_on_every_tabular_example(name):
    from solvers.gradcheck import gradcheck

    for row in gradcheck(_problem(name), n_random=1):
        assert row.rel_error <= 1e-5 or row.max_abs_error <= 1e-8, row
