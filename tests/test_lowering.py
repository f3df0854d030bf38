"""Lowering: MDP generators, data files, the reward and objective closures, overrides, devices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import PROBLEMS, codes, compile_ok, diagnostics

from bilevel_dsl import BrlError, compile_file, lower

DT = torch.float64
UP, DOWN, LEFT, RIGHT = range(4)

# S . #        states in reading order: 0 1 (wall)
# . . G                                 2 3 4 (goal)
GRID = '''brl 1
mdp maze = gridworld(map = """
    S.#
    ..G
""", slip = {slip}, discount = 0.9, goal_reward = 2, step_reward = -0.1{extra})
var x[maze.S, maze.A] = 0 in [-1, 1]
lower maze {{ temperature = 0.5  reward[s, a] = maze.R[s, a] + x[s, a] }}
upper maximize value(maze, policy) - norm2(x)
solve m_sobirl(outer = 3) on cpu
'''
# Where each move lands with no slip (blocked moves stay put).
NEXT = {
    0: {UP: 0, DOWN: 2, LEFT: 0, RIGHT: 1},
    1: {UP: 1, DOWN: 3, LEFT: 0, RIGHT: 1},  # right is the wall
    2: {UP: 0, DOWN: 2, LEFT: 2, RIGHT: 3},
    3: {UP: 1, DOWN: 3, LEFT: 2, RIGHT: 4},
    4: {UP: 4, DOWN: 4, LEFT: 3, RIGHT: 4},  # up is the wall
}


def grid(slip: float = 0.3, extra: str = ""):
    return compile_ok(GRID.format(slip=slip, extra=extra))


def expected_grid_P(slip: float) -> torch.Tensor:
    P = torch.zeros(5, 4, 5, dtype=DT)
    for s, moves in NEXT.items():
        for a in range(4):
            for b, t in moves.items():
                P[s, a, t] += 1 - slip if b == a else slip / 3
    return P


# ------------------------------------------------------------------ grid worlds


def test_gridworld_states_actions_and_parts():
    checked = grid()
    maze = checked.names["maze"]
    assert maze.states.size == 5 and maze.actions.members == ("up", "down", "left", "right")
    assert maze.extras["pos"].t.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [1, 2]]
    assert float(maze.extras["goal"].t) == 4 and float(maze.extras["start"].t) == 0
    assert maze.extras["goal_pos"].t.tolist() == [1, 2]
    assert maze.extras["start_pos"].t.tolist() == [0, 0]
    assert maze.initial.tolist() == [1, 0, 0, 0, 0]
    assert maze.discount == 0.9
    assert maze.terminal.tolist() == [False, False, False, False, True]


def test_gridworld_no_slip_moves_walls_and_edges():
    P = grid(slip=0).names["maze"].transitions.dense()
    for s, moves in NEXT.items():
        for a, t in moves.items():
            assert P[s, a, t] == 1, (s, a, t)


def test_gridworld_slip_semantics():
    for slip in (0.0, 0.1, 0.3, 1.0):
        P = grid(slip=slip).names["maze"].transitions.dense()
        assert torch.allclose(P, expected_grid_P(slip)), slip


def test_gridworld_rows_sum_to_one_before_terminal_masking():
    maze = grid().names["maze"]
    assert torch.allclose(maze.transitions.row_sums(), torch.ones(5, 4, dtype=DT))


def test_goal_is_terminal_in_the_lowered_problem():
    problem = lower(grid(), device="cpu")
    sums = problem.transitions.row_sums()
    P = problem.transitions.dense()
    assert torch.all(P[:, :, 4] == 0)  # no mass enters the goal
    assert torch.all(sums[4] == 0)  # and the goal has no successors
    # rows that could reach the goal lose that mass: s3 right reaches it w.p. 0.7
    assert sums[3, RIGHT] == pytest.approx(0.3)
    assert sums[3, UP] == pytest.approx(0.9)
    for s in (0, 1, 2):
        assert torch.allclose(sums[s], torch.ones(4, dtype=DT))


def test_goal_reward_is_the_probability_of_entering_the_goal():
    maze = grid().names["maze"]
    P = expected_grid_P(0.3)
    expected = 2 * P[:, :, 4] - 0.1
    expected[4] = 0  # the terminal goal is worth nothing
    assert torch.allclose(maze.reward, expected)


def test_non_terminal_goal_keeps_its_rows():
    checked = grid(extra=", terminal_goal = false")
    problem = lower(checked, device="cpu")
    assert not checked.names["maze"].terminal.any()
    assert torch.allclose(problem.transitions.row_sums(), torch.ones(5, 4, dtype=DT))


def test_gridworld_layout_is_passed_to_solvers():
    problem = lower(grid(), device="cpu")
    assert problem.grid is not None
    assert (problem.grid.rows, problem.grid.cols) == (2, 3)
    assert problem.grid.walls == ((0, 2),)
    assert (problem.grid.start, problem.grid.goal) == (0, 4)


# ------------------------------------------------------------------ random MDPs


def random_P(text: str, name: str = "M", **kwargs) -> torch.Tensor:
    return compile_ok("brl 1\n" + text, **kwargs).names[name].transitions.dense()


def test_random_mdp_support_sizes():
    P = random_P("seed 4\nmdp M = random_mdp(states = 12, actions = 3)")
    support = (P > 0).sum(-1)
    assert support.min() >= 1 and support.max() <= 11
    assert len(torch.unique(support)) >= 4  # n ~ Uniform{1, ..., S-1}: sizes vary
    assert torch.allclose(P.sum(-1), torch.ones(12, 3, dtype=DT))
    assert P.min() >= 0


def test_random_mdp_fixed_successors():
    P = random_P("mdp M = random_mdp(states = 7, actions = 2, successors = 3)")
    assert torch.all((P > 0).sum(-1) == 3)
    P = random_P("mdp M = random_mdp(states = 600, actions = 2, successors = 5)")
    assert torch.all((P > 0).sum(-1) == 5)  # distinct successors on the large-S path too
    assert torch.allclose(P.sum(-1), torch.ones(600, 2, dtype=DT))


def test_random_mdp_single_state():
    assert random_P("mdp M = random_mdp(states = 1, actions = 2)").tolist() == [[[1.0], [1.0]]]


def test_random_mdp_reproducible_and_seeded():
    text = "seed 4\nmdp M = random_mdp(states = 8, actions = 2)"
    same = random_P(text)
    assert torch.equal(same, random_P(text))
    assert not torch.equal(same, random_P(text.replace("seed 4", "seed 5")))
    assert torch.equal(same, random_P(text.replace("seed 4", "seed 9"), seed=4))
    # another declaration before it does not change it
    assert torch.equal(same, random_P("seed 4\nmdp K = random_mdp(states = 3, actions = 2)\n"
                                      "mdp M = random_mdp(states = 8, actions = 2)"))


def test_random_mdp_defaults():
    mdp = compile_ok("brl 1\nmdp M = random_mdp(states = 4, actions = 2)").names["M"]
    assert mdp.discount == 0.9
    assert mdp.initial.tolist() == [0.25] * 4
    assert mdp.reward.abs().sum() == 0 and not mdp.terminal.any()


def test_large_random_mdp_is_sparse():
    mdp = compile_ok("brl 1\nmdp big = random_mdp(states = 10000, actions = 4, "
                     "successors = 5, discount = 0.9)").names["big"]
    assert mdp.transitions.is_sparse
    assert torch.allclose(mdp.transitions.row_sums(), torch.ones(10000, 4, dtype=DT))


# ------------------------------------------------------------------ data files


def test_loaded_npy_and_csv(tmp_path):
    costs = np.arange(6, dtype=np.float64).reshape(3, 2) / 10
    np.save(tmp_path / "costs.npy", costs)
    (tmp_path / "data").mkdir()
    np.savetxt(tmp_path / "data" / "bonus.csv", costs.T * 2, delimiter=",")
    (tmp_path / "p.brl").write_text(
        "brl 1\nmdp M = random_mdp(states = 3, actions = 2)\n"
        'param costs[M.S, M.A] = load("costs.npy")\nparam bonus = load("data/bonus.csv")\n'
        "var x[M.S, M.A] = 0\nlower M { temperature = 1  reward[s, a] = x[s, a] - costs[s, a] "
        "+ bonus[a, s] }\nupper minimize norm2(x)\ncheck bonus[1, 2] == 2 * costs[2, 1]\n",
        encoding="utf-8")
    checked = compile_file(tmp_path / "p.brl")
    assert checked.checks == 1
    assert np.allclose(checked.names["costs"].t.numpy(), costs)
    assert checked.names["bonus"].t.shape == (2, 3)
    problem = lower(checked, device="cpu")
    assert torch.allclose(problem.reward(problem.x0), torch.from_numpy(costs))


def test_a_csv_of_one_line_or_column_fills_a_matrix_of_one_row_or_column(tmp_path):
    (tmp_path / "col.csv").write_text("1\n2\n3\n")
    (tmp_path / "row.csv").write_text("1,2,3\n")
    (tmp_path / "p.brl").write_text(
        'brl 1\nparam a[3, 1] = load("col.csv")\nparam b[1, 3] = load("row.csv")\n'
        'param c[3] = load("col.csv")\nparam d[3] = load("row.csv")\n')
    names = compile_file(tmp_path / "p.brl").names
    assert names["a"].t.tolist() == [[1.0], [2.0], [3.0]] and names["b"].t.tolist() == [
        [1.0, 2.0, 3.0]]
    assert names["c"].t.tolist() == names["d"].t.tolist() == [1.0, 2.0, 3.0]
    (tmp_path / "p.brl").write_text('brl 1\nparam a[1, 2] = load("col.csv")\n')
    with pytest.raises(BrlError) as info:
        compile_file(tmp_path / "p.brl")
    assert [d.code for d in info.value.diagnostics] == ["E602"]


def test_loaded_data_shape_is_checked(tmp_path):
    np.save(tmp_path / "costs.npy", np.zeros((2, 3)))
    (tmp_path / "p.brl").write_text('brl 1\nparam c[3, 2] = load("costs.npy")\n')
    with pytest.raises(BrlError) as info:
        compile_file(tmp_path / "p.brl")
    assert [d.code for d in info.value.diagnostics] == ["E602"]


def test_table_part_given_whole_from_a_file(tmp_path):
    P = np.zeros((2, 1, 2))
    P[0, 0, 1] = P[1, 0, 0] = 1
    np.save(tmp_path / "P.npy", P)
    (tmp_path / "t.brl").write_text(
        'brl 1\nmdp T = table { states = 2  actions = 1  transition = load("P.npy") }\n'
        "check T.P[0, 0, 1] == 1\n")
    assert compile_file(tmp_path / "t.brl").checks == 1


# ------------------------------------------------------------------ the closures

SMALL = '''brl 1
seed 1
mdp M = random_mdp(states = 4, actions = 3, discount = 0.8)
param c[M.S, M.A] ~ uniform(0, 1)
var x[M.S, M.A] ~ normal(0, 1)
lower M {{ temperature = 0.5  reward[s, a] = c[s, a] * x[s, a]^2 }}
upper {sense} 0.5 * norm2(x) - value(M, policy, M.R + 1)
'''


def uniform_policy(problem) -> torch.Tensor:
    return torch.full((problem.n_states, problem.n_actions), 1 / problem.n_actions, dtype=DT)


def test_reward_closure_is_differentiable():
    checked = compile_ok(SMALL.format(sense="minimize"))
    problem = lower(checked, device="cpu")
    x = problem.x0.clone().requires_grad_(True)
    reward = problem.reward(x)
    assert reward.shape == (4, 3)
    (grad,) = torch.autograd.grad(reward.sum(), x)
    c = checked.names["c"].t
    assert torch.allclose(grad, 2 * c * x.detach())


def test_objective_closure_is_differentiable_in_x_and_policy():
    problem = lower(compile_ok(SMALL.format(sense="minimize")), device="cpu")
    x = problem.x0.clone().requires_grad_(True)
    pi = uniform_policy(problem).requires_grad_(True)
    f = problem.objective(x, pi)
    assert f.shape == ()
    gx, gpi = torch.autograd.grad(f, (x, pi))
    assert torch.allclose(gx, x.detach())  # d/dx 0.5 ||x||^2
    assert gpi.abs().sum() > 0  # the value depends on the policy


def test_next_state_reward_is_averaged_over_transitions():
    text = ("brl 1\nseed 2\nmdp M = random_mdp(states = 4, actions = 3)\n"
            "param h[M.S] ~ normal(0, 1)\nparam k[M.S, M.A, M.S] ~ normal(0, 1)\n"
            "var x[M.S, M.A] ~ normal(0, 1)\n"
            "lower M { temperature = 1  reward[s, a, t] = x[s, a] * h[t] + k[s, a, t] }\n"
            "upper minimize norm2(x)\n")
    checked = compile_ok(text)
    problem = lower(checked, device="cpu")
    P = checked.names["M"].transitions.dense()
    h, k, x = checked.names["h"].t, checked.names["k"].t, problem.x0
    expected = (P * (x[:, :, None] * h[None, None, :] + k)).sum(-1)
    assert torch.allclose(problem.reward(x), expected)
    only_t = lower(compile_ok(text.replace("x[s, a] * h[t] + k[s, a, t]", "3 * h[t]")))
    assert torch.allclose(only_t.reward(x), 3 * (P * h).sum(-1))


def _same_values_and_gradients(got: torch.Tensor, expected: torch.Tensor, x: torch.Tensor,
                               tol: float, seed: int = 0) -> None:
    """Two rewards computed from ``x`` agree to ``tol``, and so do their vector-Jacobian
    products with one random weighting."""
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(seed),
                          dtype=got.dtype)
    (g_got,) = torch.autograd.grad((got * weights).sum(), x)
    (g_expected,) = torch.autograd.grad((expected * weights).sum(), x)
    torch.testing.assert_close(g_got, g_expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("mdp", [
    "random_mdp(states = 6, actions = 3, discount = 0.9)",  # dense P
    "random_mdp(states = 1500, actions = 2, successors = 3, discount = 0.9)",  # sparse P
    'gridworld(map = """\nS..#\n...G\n""", slip = 0.2)',  # a terminal goal: rows below one
])
def test_a_next_state_reward_is_averaged_term_by_term(mdp):
    """`x[t] + R[s, a] - 2 h[s] x[t]` averages each term on its own (a product with P, the row
    sums, the S x A x S table) and gives what the whole table gives: the same sum times 1 (a
    product, not split), values and gradients."""
    text = ("brl 1\nseed 4\nmdp M = " + mdp + "\nparam h[M.S] ~ normal(0, 1)\n"
            "param R[M.S, M.A] ~ normal(0, 1)\nvar x[M.S] ~ normal(0, 1)\n"
            "lower M { temperature = 1  reward[s, a, t] = REWARD }\nupper minimize norm2(x)\n")
    terms = "x[t] + R[s, a] - 2 * h[s] * x[t] - (-h[t] + 1)"
    split = lower(compile_ok(text.replace("REWARD", terms)))
    whole = lower(compile_ok(text.replace("REWARD", f"({terms}) * 1")))
    assert split.transitions.is_sparse == ("1500" in mdp)
    x = split.x0.clone().requires_grad_(True)
    r_split, r_whole = split.reward(x), whole.reward(x)
    _same_values_and_gradients(r_split, r_whole, x, 1e-12)


@pytest.mark.parametrize("mdp", [
    "random_mdp(states = 1200, actions = 3, successors = 5, discount = 0.9)",
    # states numbered from 1: `s` and `t` are values 1..1200, positions 0..1199
    "table { states = Cell  actions = 3  transition[s, a, t] = (if t == s then 0.5 else 0)"
    " + (if t == 1 then 0.5 else 0) }",
])
def test_a_reward_in_s_a_and_t_together_is_evaluated_on_sparse_P_s_nonzeros(mdp):
    """Terms in `t` and `s` or `a` together, on a sparse P, are evaluated at P's stored
    triples only (the three indices walking them along one axis); values and gradients equal
    an independent sum over the dense table, index values (`0.001 * s`), comparisons of
    indices (`t == s`), indexing by each (`w[a]`, `x[s]`) and a reduction inside included."""
    text = ("brl 1\nseed 5\nset Cell = 1..1200\nmdp M = " + mdp + "\n"
            "param w[M.A] ~ normal(0, 1)\nvar x[M.S] ~ normal(0, 1)\n"
            "lower M { temperature = 1\n  reward[s, a, t] = 0.001 * s * x[t] "
            "+ w[a] * (x[t] - x[s])^2 - (if t == s then 1 else 0)"
            " + sum {u in 0..2} u * w[a] * x[t] }\nupper minimize norm2(x)\n")
    checked = compile_ok(text)
    problem = lower(checked, device="cpu")
    assert problem.transitions.is_sparse
    P = problem.transitions.dense()
    S = problem.n_states
    first = 1.0 if "Cell" in mdp else 0.0
    w = checked.names["w"].t
    x = problem.x0.clone().requires_grad_(True)
    value = (first + torch.arange(S, dtype=DT))[:, None, None]
    table = (0.001 * value * x[None, None, :]
             + w[None, :, None] * (x[None, None, :] - x[:, None, None]) ** 2
             - torch.eye(S, dtype=DT)[:, None, :] + 3 * w[None, :, None] * x[None, None, :])
    expected = (P * table).sum(-1)
    got = problem.reward(x)
    _same_values_and_gradients(got, expected, x, 1e-12)


def test_a_let_over_s_a_and_t_in_a_reward_is_evaluated_on_sparse_P_s_nonzeros(monkeypatch):
    """`let w[s in M.S, a in M.A, t in M.S] = ...` read as `w[s, a, t]` in the reward (the
    contract-design idiom): its body with the indices on P's stored triples, never the S x A x S
    table (at 4,000 states 12 s and 1.7 GiB, against 0.4 s inline); the same values and
    gradients as the term written inline, and the let still whole where it is used whole."""
    import sys

    from bilevel_dsl import evaluate

    text = ("brl 1\nseed 2\nmdp M = random_mdp(states = 1500, actions = 2, successors = 3, "
            "discount = 0.9)\nparam h[M.S] ~ uniform(0, 1)\nvar x[M.S, M.A] ~ normal(0, 1)\n"
            "let w[s in M.S, a in M.A, t in M.S] = h[t] * x[s, a] - 0.5 * h[s] * h[t]\n"
            "lower M { temperature = 1  reward[s, a, t] = REWARD }\nupper minimize norm2(x)\n")
    inline = lower(compile_ok(text.replace("REWARD", "h[t] * x[s, a] - 0.5 * h[s] * h[t]")))
    fitted = []
    fit = evaluate.fit_declared

    def spy(*args):
        fitted.append((args[3], tuple(size for _, _, size in args[2])))
        return fit(*args)

    monkeypatch.setattr(evaluate, "fit_declared", spy)
    monkeypatch.setattr(sys.modules["bilevel_dsl.elaborate"], "fit_declared", spy)
    via_let = lower(compile_ok(text.replace("REWARD", "w[s, a, t]")))
    assert via_let.transitions.is_sparse
    x = inline.x0.clone().requires_grad_(True)
    r_let, r_inline = via_let.reward(x), inline.reward(x)
    # the table of w was never built: checked at its first element when declared, then read
    # at P's triples
    assert [sizes for name, sizes in fitted if name == "w"] == [(1, 1, 1)]
    _same_values_and_gradients(r_let, r_inline, x, 1e-13)
    # a body of the wrong shape is still the let's own error, found where it is declared
    bad = text.replace("h[t] * x[s, a] - 0.5 * h[s] * h[t]\n", "h\n", 1)
    assert codes(bad.replace("REWARD", "w[s, a, t]")) == ["E301"]


def test_a_table_over_states_pairs_indexed_by_s_and_t_costs_P_s_nonzeros():
    """`X[s, t]` for a variable over S x S, on P's stored triples: one selection of flat
    positions. Going through a row of X per triple asked for 85 GB in the gradient (a review);
    now value and gradient equal the dense table's."""
    text = ("brl 1\nseed 1\nmdp M = random_mdp(states = 1200, actions = 3, successors = 2)\n"
            "var X[M.S, M.S] ~ normal(0, 1)\n"
            "lower M { temperature = 1  reward[s, a, t] = X[s, t] * X[t, s] }\n"
            "upper minimize norm2(X)\n")
    problem = lower(compile_ok(text), device="cpu")
    assert problem.transitions.is_sparse
    X = problem.x0.clone().requires_grad_(True)
    got = problem.reward(X)
    expected = (problem.transitions.dense() * (X * X.T)[:, None, :]).sum(-1)
    _same_values_and_gradients(got, expected, X, 1e-12)


def test_maximize_negates_the_objective():
    low = lower(compile_ok(SMALL.format(sense="minimize")), device="cpu")
    high = lower(compile_ok(SMALL.format(sense="maximize")), device="cpu")
    pi = uniform_policy(low)
    f_min, f_max = low.objective(low.x0, pi), high.objective(high.x0, pi)
    assert float(f_min) != 0 and torch.allclose(f_max, -f_min)
    assert (low.sense, low.sign, high.sense, high.sign) == ("minimize", 1.0, "maximize", -1.0)


def test_objective_value_matches_a_direct_computation():
    checked = compile_ok(SMALL.format(sense="minimize"))
    problem = lower(checked, device="cpu")
    mdp = checked.names["M"]
    pi = uniform_policy(problem)
    P = mdp.transitions.dense()
    r = ((mdp.reward + 1) * pi).sum(-1)
    P_pi = torch.einsum("sat,sa->st", P, pi)
    v = torch.linalg.solve(torch.eye(4, dtype=DT) - mdp.discount * P_pi, r)
    expected = 0.5 * (problem.x0**2).sum() - (mdp.initial * v).sum()
    assert torch.allclose(problem.objective(problem.x0, pi), expected)


def test_problem_fields():
    problem = lower(grid(), device="cpu")
    assert problem.name == "test"  # named after the file (it has no `problem` statement)
    assert (problem.n_states, problem.n_actions) == (5, 4)
    assert problem.temperature == 0.5 and problem.discount == 0.9
    assert problem.initial.tolist() == [1, 0, 0, 0, 0]
    assert problem.x0.shape == (5, 4) and problem.var_name == "x"
    assert problem.solver == "m_sobirl" and problem.solver_options == {"outer": 3}
    assert problem.features == frozenset({"policy", "value"})
    assert problem.form == "policy_functional"
    assert problem.device == torch.device("cpu")
    clamped = problem.project(torch.full((5, 4), 3.0, dtype=DT))
    assert torch.all(clamped == 1)


def test_incomplete_problem_cannot_be_lowered():
    checked = compile_ok("brl 1\nmdp M = random_mdp(states = 3, actions = 2)\nvar x[M.S, M.A]")
    with pytest.raises(BrlError) as info:
        lower(checked, device="cpu")
    diag = info.value.diagnostics[0]
    assert diag.code == "E503"
    assert "no `lower` block and no `upper` objective" in diag.message


def test_cuda_without_a_gpu_is_e804(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    checked = compile_ok(GRID.format(slip=0, extra="").replace("on cpu", "on cuda"))
    with pytest.raises(BrlError) as info:
        lower(checked)
    assert info.value.diagnostics[0].code == "E804"
    # located at the file's `on cuda`, in the file's name (not `<input>`)
    assert info.value.render().startswith("test.brl:9:")
    assert info.value.render().splitlines()[2].strip().endswith("^^^^")
    with pytest.raises(BrlError) as info:
        lower(compile_ok(GRID.format(slip=0, extra="")), device="cuda")
    assert info.value.render().startswith("test.brl: error[E804]")
    assert lower(checked, device="cpu").device == torch.device("cpu")
    assert lower(compile_ok(GRID.format(slip=0, extra=""))).device == torch.device("cpu")


# ------------------------------------------------------------------ -D overrides


def test_overrides_reach_the_lowered_problem():
    maze = next(p for p in PROBLEMS if p.name == "maze_nav.brl")
    low = lower(compile_file(maze, overrides={"lam": "0.1"}), device="cpu")
    high = lower(compile_file(maze, overrides={"lam": "0.6"}), device="cpu")
    x = torch.tensor([5.0, 7.0], dtype=DT)  # ||g - G||^2 = 1 for G = (4, 7)
    pi = uniform_policy(low)
    assert float(high.objective(x, pi) - low.objective(x, pi)) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("overrides", "code", "needle"),
    [
        ({"lam": "0.5.1"}, "E100", ""),
        ({"lamb": "0.1"}, "E201", "did you mean `lam`?"),
        ({"maze": "1"}, "E201", ""),
        ({"lam": "[0.1, 0.2]"}, "E305", "expected a number"),
    ],
)
def test_override_errors_on_a_problem(overrides, code, needle):
    maze = next(p for p in PROBLEMS if p.name == "maze_nav.brl")
    with pytest.raises(BrlError) as info:
        compile_file(maze, overrides=overrides)
    diag = info.value.diagnostics[0]
    assert diag.code == code
    assert needle in (diag.message + " " + (diag.hint or ""))


def test_integer_param_override_types():
    text = "brl 1\nparam n = 3\nparam w[n] = 1\n"
    assert compile_ok(text, overrides={"n": "5"}).names["w"].t.shape == (5,)
    assert codes(text, overrides={"n": "5.0"}) == ["E305"]  # an int param given a real
    assert codes(text, overrides={"n": "[5]"}) == ["E305"]


def test_closures_recompute_what_depends_on_x_and_the_policy():
    text = ("brl 1\nseed 3\nmdp M = random_mdp(states = 4, actions = 2)\n"
            "param c[M.S, M.A] ~ normal(0, 1)\nvar x[M.S, M.A] = 0\n"
            "let bonus[s in M.S, a in M.A] = c[s, a] * x[s, a]\n"
            "let pol = sum {s in M.S, a in M.A} policy[s, a] * c[s, a]\n"
            "lower M { temperature = 1  reward[s, a] = bonus[s, a] + sum {t in M.S} "
            "M.P[s, a, t] * c[t, 0] }\n"
            "upper minimize pol + norm2(x)\n")
    checked = compile_ok(text)
    problem = lower(checked, device="cpu")
    c, P = checked.names["c"].t, checked.names["M"].transitions.dense()
    base = (P * c[:, 0]).sum(-1)
    for scale in (0.0, 1.0, -2.0, 1.0):
        x = torch.full((4, 2), scale, dtype=DT)
        assert torch.allclose(problem.reward(x), c * x + base)
    pi = uniform_policy(problem)
    greedy = torch.zeros(4, 2, dtype=DT)
    greedy[:, 0] = 1
    x0 = problem.x0
    assert torch.allclose(problem.objective(x0, pi), (pi * c).sum())
    assert torch.allclose(problem.objective(x0, greedy), c[:, 0].sum())
    assert torch.allclose(problem.objective(x0, pi), (pi * c).sum())


def test_a_sum_of_a_product_that_follows_x_and_pi_has_the_gradient_of_its_terms():
    """Sums of products are contracted without building the product (`_contract`); a
    constant sub-product stays one cached factor. Reward, objective and their gradients must
    equal those of the same terms summed one by one (`(0 + ...)` is not a product)."""
    text = ("brl 1\nseed 5\nmdp M = random_mdp(states = 6, actions = 3)\n"
            "param c[M.S] ~ normal(0, 1)\nvar x[M.S] ~ normal(0, 1)\n"
            "lower M {{ temperature = 1  reward[s, a] = sum {{t in M.S}} {r} }}\n"
            "upper minimize sum {{s in M.S, a in M.A}} {f}\n")
    r = "(c[t] * M.P[s, a, t]) * x[t] * x[s]"
    f = "policy[s, a] * x[s] * (c[s] * a)"
    fast = lower(compile_ok(text.format(r=r, f=f)), device="cpu")
    slow = lower(compile_ok(text.format(r=f"(0 + {r})", f=f"(0 + {f})")), device="cpu")
    pi = torch.softmax(torch.randn(6, 3, dtype=DT), -1)
    for x in (fast.x0, fast.x0 * -2.0):
        grads = []
        for problem in (fast, slow):
            xg, pg = x.clone().requires_grad_(True), pi.clone().requires_grad_(True)
            out = problem.reward(xg).square().sum() + problem.objective(xg, pg)
            grads.append((out, *torch.autograd.grad(out, (xg, pg))))
        for a, b in zip(*grads):
            assert torch.allclose(a, b, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("states", [6, 300])  # P stored dense, and sparse
@pytest.mark.parametrize("body", [
    "M.P[s, a, t] * x[t]",
    "x[s] * M.P[s, a, t] * c[t] * x[t] * a",  # factors outside `t` too
    "M.P[s, a, t] * 2 * x[s]",  # nothing in `t`: the row sums
    "M.P[s, a, t] * x[t] * (t == s)",  # a factor in `t` and `s`: contracted whole
    "c[t] * sum {u in M.S} M.P[t, a, u] * x[u] * M.P[s, a, t]",  # an inner sum over `u`
    "sum {u in 0..2} M.P[s, a, t] * x[t] * u * u",  # `u` is no state: another index
])
def test_a_sum_over_the_next_state_is_one_product_with_P(states, body):
    """`sum {t in M.S} M.P[s, a, t] * f(t)` is P.expect(f), with P stored sparse on large
    MDPs (`_expect_over_next`): the same numbers and gradients as the terms one by one."""
    text = (f"brl 1\nseed 4\nmdp M = random_mdp(states = {states}, actions = 3, "
            "successors = 4)\nparam c[M.S] ~ normal(0, 1)\nvar x[M.S] ~ normal(0, 1)\n"
            "lower M {{ temperature = 1  reward[s, a] = sum {{t in M.S}} {r} }}\n"
            "upper minimize norm2(x)\n")
    fast = lower(compile_ok(text.format(r=body)), device="cpu")
    slow = lower(compile_ok(text.format(r=f"(0 + {body})")), device="cpu")
    assert fast.transitions.is_sparse == (states == 300)
    v = torch.randn(states, 3, dtype=DT)
    grads = []
    for problem in (fast, slow):
        x = problem.x0.clone().requires_grad_(True)
        r = problem.reward(x)
        grads.append((r, *torch.autograd.grad((r * v).sum(), x)))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_a_sum_over_the_next_state_needs_no_dense_P_on_a_large_MDP():
    text = ("brl 1\nmdp M = random_mdp(states = 4000, actions = 4, successors = 5)\n"
            "var x[M.S] = 0\nparam c[M.S] ~ normal(0, 1)\n"
            "lower M { temperature = 1  reward[s, a] = sum {t in M.S} M.P[s, a, t] * "
            "(x[t] + c[t]) }\nupper minimize norm2(x)\n")
    checked = compile_ok(text)
    M = checked.names["M"]
    reward = lower(checked, device="cpu").reward(torch.zeros(4000, dtype=DT))
    assert torch.allclose(reward, M.transitions.expect(checked.names["c"].t))
    # P beside a constant factor (a group that neither x nor pi moves), or a whole sum that is
    # constant: P is still found, at check and at solve alike
    for body in ("M.P[s, a, t] * c[t] * (1 + x[t])", "x[s] + sum {t in M.S} M.P[s, a, t] * c[t]"):
        reward_text = text.replace("sum {t in M.S} M.P[s, a, t] * (x[t] + c[t])",
                                   body if body.startswith("x[s]") else
                                   f"sum {{t in M.S}} {body}")
        reward = lower(compile_ok(reward_text), device="cpu").reward(torch.zeros(4000, dtype=DT))
        assert torch.allclose(reward, M.transitions.expect(checked.names["c"].t))
    # a factor that turns infinite during a run (log(0)) keeps the product with P as stored
    # (it fell back to the dense table, refused on this size, in place of the NaN message)
    logged = lower(compile_ok(text.replace("(x[t] + c[t])", "log(1 + x[t])")), device="cpu")
    assert torch.isneginf(logged.reward(torch.full((4000,), -1.0, dtype=DT))).all()
    # written other than as a product with P[s, a, t], the table is still refused, with a hint
    diag = diagnostics(text.replace("M.P[s, a, t] * (x[t] + c[t])",
                                    "(M.P[s, a, t] + 0) * x[t]"))[0]
    assert diag.code == "E301" and "too many to index one by one" in diag.message


def test_a_problem_solved_twice_gives_the_same_numbers_though_its_solves_start_warm():
    """`value(...)` solves iterate on this random MDP and start from their last answers; a
    run of its own forgets them, so that a second run is the first one bit for bit."""
    from solvers import solve

    text = ("brl 1\nseed 2\nmdp M = random_mdp(states = 300, actions = 3, successors = 4, "
            "discount = 0.95)\nparam R[M.S, M.A] ~ uniform(0, 1)\nvar x[M.S, M.A] = 0\n"
            "lower M { temperature = 1  reward[s, a] = R[s, a] + x[s, a] }\n"
            "upper minimize 0.5 * norm2(x) - value(M, policy, R)\n")
    problem = lower(compile_ok(text), device="cpu")
    assert not __import__("bilevel_dsl").softmdp.direct_solves(problem.transitions)
    first = solve(problem, "m_sobirl", {"outer": 4})[1]
    assert problem.warm_starts  # the objective's solves kept their answers
    again = solve(problem, "m_sobirl", {"outer": 4})[1]
    assert torch.equal(first.x, again.x) and first.objective == again.objective


def test_closures_of_two_sizes_interleaved_keep_their_own_layouts():
    # align() and the index positions are cached by shape and set across closures: two
    # sizes of one file, evaluated in turn, must each give their own direct result.
    text = ("brl 1\nseed 5\nmdp M = random_mdp(states = {n}, actions = 3)\n"
            "param c[M.S, M.A] ~ normal(0, 1)\nparam W[M.S, M.S] ~ normal(0, 1)\n"
            "var x[M.S] = 1\n"
            "lower M {{ temperature = 1  reward[s, a] = c[s, a] * quad(x, W) + x[s] }}\n"
            "upper minimize sum {{i in 1..{n}, a in M.A}} policy[i - 1, a] * c[i - 1, a] "
            "+ 0.5 * norm2(x)\n")
    cases = []
    for n in (3, 4):
        checked = compile_ok(text.format(n=n))
        cases.append((lower(checked, device="cpu"), checked.names["c"].t,
                      checked.names["W"].t))
    for _ in range(2):
        for problem, c, W in cases:
            x = torch.linspace(-1, 1, c.shape[0], dtype=DT)
            assert torch.allclose(problem.reward(x), c * (x @ W @ x) + x[:, None])
            pi = torch.softmax(c, -1)
            assert torch.allclose(problem.objective(x, pi), (pi * c).sum() + 0.5 * x @ x)


def test_a_chain_of_thousands_of_lets_neither_recurses_nor_repeats():
    """Each let using the one before, 3,000 deep (and twice each, which would double the work
    per link if a let were evaluated once per use): checked, lowered and evaluated with x."""
    links = 3000
    lets = "\n".join(f"let L{k}[M.S, M.A] = 0.5 * (L{k - 1} + L{k - 1}) + 0.001 * x"
                     for k in range(1, links + 1))
    text = ("brl 1\nmdp M = random_mdp(states = 3, actions = 2)\nvar x[M.S, M.A] = 1\n"
            f"let L0[M.S, M.A] = x\n{lets}\n"
            f"lower M {{ temperature = 1  reward[s, a] = L{links}[s, a] }}\n"
            f"upper minimize norm2(L{links}) - value(M, policy)\n")
    problem = lower(compile_ok(text))
    x = torch.full((3, 2), 2.0, dtype=torch.float64)
    assert torch.allclose(problem.reward(x), x * (1 + 0.001 * links))


def _expected_return_problem(mdp: str, horizon: int, more: str = ""):
    """A problem whose objective is expected_return over `horizon` steps at discount 0.99, and
    a random policy of the MDP's shape that gradients are taken with respect to."""
    text = (f"brl 1\nseed 3\nmdp M = random_mdp({mdp}, discount = 0.99)\n"
            "param R[M.S, M.A] ~ normal(0, 1)\nvar x[M.S, M.A] ~ normal(0, 1)\n"
            "lower M { temperature = 0.5  reward[s, a] = x[s, a] }\n"
            f"upper maximize expected_return(M, policy, horizon = {horizon}, reward = R){more}\n")
    problem = lower(compile_ok(text))
    pi = torch.softmax(torch.randn(problem.n_states, problem.n_actions, dtype=DT,
                                   generator=torch.Generator().manual_seed(1)), -1)
    return problem, pi.requires_grad_(True)


def test_a_long_expected_return_in_segments_has_the_same_gradient(monkeypatch):
    """Past 1 GiB of kept steps, expected_return's steps go in checkpointed segments of about
    sqrt(H): the same value and gradient as keeping every step."""
    from bilevel_dsl import evaluate

    problem, pi = _expected_return_problem("states = 40, actions = 3, successors = 4", 500,
                                           " - norm2(x)")
    results = []
    for limit in (1 << 30, 0):  # every step kept; segments
        monkeypatch.setattr(evaluate, "_SEGMENT_ABOVE_BYTES", limit)
        x = problem.x0.clone().requires_grad_(True)
        f = problem.objective(x, pi)
        results.append((f, *torch.autograd.grad(f, (x, pi))))
    for kept, segmented in zip(*results):
        torch.testing.assert_close(segmented, kept, rtol=1e-12, atol=1e-12)


def test_a_discounted_expected_return_stops_where_its_rest_is_below_rounding(monkeypatch):
    """H = 20,000 at gamma = 0.99 takes the first 5,041 steps: the same value and gradient as
    all 20,000, to rounding (a long horizon on a small MDP took seconds per evaluation)."""
    from bilevel_dsl import evaluate

    assert evaluate._terms_that_count(0.99, 100_000) == 5041
    assert evaluate._terms_that_count(1.0, 100_000) == 100_000
    assert evaluate._terms_that_count(0.0, 100_000) == 1
    problem, pi = _expected_return_problem("states = 6, actions = 2", 20000)
    results = []
    for count in (evaluate._terms_that_count, lambda gamma, horizon: horizon):
        monkeypatch.setattr(evaluate, "_terms_that_count", count)
        f = problem.objective(problem.x0, pi)
        results.append((f, *torch.autograd.grad(f, pi)))
    for stopped, whole in zip(*results):
        torch.testing.assert_close(stopped, whole, rtol=1e-14, atol=1e-14)


TABLE = """brl 1
set Cell = 1..60
mdp chain = table {
    states = Cell
    actions = 3
    transition[s, a, t] = TRANSITION
    reward[s, a, t] = 0.01 * s * t - a + (if t == s then 2 else 0)
    terminal = {60}
}
"""


@pytest.mark.parametrize(("transition", "error"), [
    ("(if t == min(s + a, 60) then 0.75 else 0) + (if t == max(s - 1, 1) then 0.25 else 0)",
     None),
    ("(if t == min(s + a, 60) then 1.25 else 0) + (if t == max(s - 1, 1) then -0.25 else 0)",
     "transition probability P[1, 1, 1] = -0.25 is negative"),
    ("if t == min(s + a, 60) and s < 55 then 1 else 0",
     "transition row (s = 55, a = 0) is not a distribution: it sums to 0, not 1 (and 14 more "
     "rows)"),
])
def test_a_large_table_is_evaluated_a_block_of_states_at_a_time(monkeypatch, transition,
                                                                  error):
    """Above TABLE_BLOCK_ENTRIES (set low here) a table's transition part is evaluated for a
    block of states at a time and kept as its nonzeros, and its reward in (s, a, t) at those
    nonzeros: the same P, reward and errors as the whole table (which at 16,000 states took
    more memory than the machine had)."""
    import sys

    elaborate = sys.modules["bilevel_dsl.elaborate"]  # the package's `elaborate` is a function
    text = TABLE.replace("TRANSITION", transition)
    results = []
    for block in (10**9, 1000):  # whole; blocks of 5 states
        monkeypatch.setattr(elaborate, "TABLE_BLOCK_ENTRIES", block)
        monkeypatch.setattr("bilevel_dsl.softmdp._SPARSE_MIN_ENTRIES", 0)  # P sparse
        if error is not None:
            diags = diagnostics(text)
            assert [d.message for d in diags] == [error]
            results.append((diags[0].span.line, diags[0].span.column))
            continue
        mdp = compile_ok(text).names["chain"]
        assert mdp.transitions.is_sparse
        results.append((mdp.transitions.dense(), mdp.reward))
    if error is not None:
        assert results[0] == results[1]
        return
    (P_whole, r_whole), (P_blocks, r_blocks) = results
    assert torch.equal(P_whole, P_blocks)
    torch.testing.assert_close(r_blocks, r_whole, rtol=1e-14, atol=1e-14)
    s = torch.arange(1, 61, dtype=DT)[:, None, None]
    expected = (P_whole * (0.01 * s * s.reshape(1, 1, 60) - torch.arange(3, dtype=DT)[None, :, None]
                           + 2 * torch.eye(60, dtype=DT)[:, None, :])).sum(-1)
    torch.testing.assert_close(r_blocks, expected, rtol=1e-12, atol=1e-12)


def test_lets_read_along_transitions_in_several_orders_keep_their_own_numbers():
    """A lowered reward caches the nodes that x cannot change, by node: a let's body read along
    P's triples as `phi[t]` and then `phi[s]` (potential-based shaping), or `w[s, a, t]` and
    `w[t, a, s]`, got the first reading's numbers for the second (a review found the shaping
    reward wrong by its own size); a let used whole as well failed with an axis no file
    names. Values and gradients against a dense reference."""
    text = ("brl 1\nseed 1\nmdp M = random_mdp(states = 300, actions = 4, successors = 5, "
            "discount = 0.9)\nvar x[M.S, M.A] ~ normal(0, 1)\n"
            "let phi[s in M.S] = s * 0.01\n"
            "let w[s in M.S, a in M.A, t in M.S] = s + 2 * t + a\n"
            "lower M { temperature = 1  reward[s, a, t] = x[s, a] * (0.9 * phi[t] - phi[s]) "
            "+ x[s, a] * (w[s, a, t] - w[t, a, s]) / 100 }\n"
            "upper minimize norm2(x) + sum {s in M.S, a in M.A} policy[s, a] * w[s, a, s] "
            "/ 1000\n")
    problem = lower(compile_ok(text))
    assert problem.transitions.is_sparse
    P = problem.transitions.dense()
    S, A = problem.n_states, problem.n_actions
    s = torch.arange(S, dtype=DT)
    phi = 0.01 * s
    w = s[:, None, None] + 2 * s[None, None, :] + torch.arange(A, dtype=DT)[None, :, None]
    for trial in range(2):  # the second evaluation reads the cache the first filled
        x = torch.randn(S, A, generator=torch.Generator().manual_seed(trial),
                        dtype=DT).requires_grad_(True)
        table = (x[:, :, None] * (0.9 * phi[None, None, :] - phi[:, None, None])
                 + x[:, :, None] * (w - w.permute(2, 1, 0)) / 100)
        expected = (P * table).sum(-1)
        got = problem.reward(x)
        _same_values_and_gradients(got, expected, x, 1e-12, seed=9)
        pi = torch.full((S, A), 1.0 / A, dtype=DT)
        diagonal = w[torch.arange(S), :, torch.arange(S)]
        assert float(problem.objective(x.detach(), pi)) == pytest.approx(
            float((x.detach() ** 2).sum() + (pi * diagonal).sum() / 1000), rel=1e-12)


def _gather_by_expanding(base, pos):
    """The selection as brl made it before: base expanded over every axis, then torch.gather
    (a gradient the size of the expansion)."""
    from bilevel_dsl.evaluate import expand_axes
    from bilevel_dsl.values import Val

    axes = list(base.axes) + [a for a in pos.axes if a not in base.axes]
    sizes = {}
    for v in (base, pos):
        for i, a in enumerate(v.axes):
            sizes[a] = max(sizes.get(a, 1), v.t.shape[i])
    b = expand_axes(base, tuple(axes), sizes)
    p = expand_axes(Val(pos.t, pos.axes), tuple(axes), sizes)
    rest = base.shape[1:]
    p = p.reshape((*p.shape, *([1] * (len(rest) + 1)))).expand((*p.shape, 1, *rest))
    return torch.gather(b, len(axes), p).squeeze(len(axes))


def test_indexing_by_index_arrays_selects_rows_with_a_gradient_of_the_tables_size():
    """x[s1[i, h], a1[i, h]]: the selection's value and gradient against the expanding gather
    it replaced, over random layouts of shared, new and broadcast axes and trailing dims."""
    from bilevel_dsl.evaluate import _gather
    from bilevel_dsl.values import Val

    rng = torch.Generator().manual_seed(4)
    names = ["i", "j", "k"]
    for case in range(200):
        sizes = {a: int(torch.randint(1, 4, (1,), generator=rng)) for a in names}
        base_axes = tuple(a for a in names if torch.rand(1, generator=rng) < 0.5)
        pos_axes = tuple(a for a in names if torch.rand(1, generator=rng) < 0.6) or ("k",)
        indexed, rest = 5, tuple(int(n) for n in torch.randint(1, 3, (case % 3,), generator=rng))
        shape = [1 if torch.rand(1, generator=rng) < 0.2 else sizes[a] for a in base_axes]
        table = torch.randn(*shape, indexed, *rest, generator=rng, dtype=DT,
                            requires_grad=True)
        where = torch.randint(0, indexed, [sizes[a] for a in pos_axes], generator=rng)
        base, pos = Val(table, base_axes), Val(where, pos_axes, (), "int")
        mine = _gather(base, pos)
        theirs = _gather_by_expanding(base, pos)
        assert torch.equal(mine.t, theirs), case
        weights = torch.randn(theirs.shape, generator=rng, dtype=DT)
        (g_mine,) = torch.autograd.grad((mine.t * weights).sum(), table)
        (g_theirs,) = torch.autograd.grad((theirs * weights).sum(), table)
        torch.testing.assert_close(g_mine, g_theirs, rtol=1e-13, atol=1e-13)
