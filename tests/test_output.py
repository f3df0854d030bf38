"""What a run leaves behind: progress lines, result.json, the pictures and the summary."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bilevel_dsl.instance import GridLayout, TabularProblem
from bilevel_dsl.softmdp import Transitions
from solvers import SolveResult, solve
from solvers.output import _per_state, default_out_dir, summary_table, write_run
from solvers.progress import ProgressMonitor


class FakeClock:
    """A clock the test moves by hand, so rates and time limits are exact."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_off_a_terminal_prints_about_every_tenth() -> None:
    stream, clock = io.StringIO(), FakeClock()
    monitor = ProgressMonitor(100, stream, sign=-1.0, clock=clock)
    for k in range(0, 101):
        clock.now = 0.01 * k
        monitor.update(k, -2.0, 0.5)
    monitor.close()
    lines = stream.getvalue().splitlines()
    assert [line.split()[0] for line in lines] == [f"{k}/100" for k in range(10, 101, 10)]
    assert "\r" not in stream.getvalue()
    assert "objective 2 " in lines[-1]  # shown in the user's sense
    assert "||h|| 0.5" in lines[-1] and "100.0 it/s" in lines[0] and "ETA 0:01" in lines[0]


def test_progress_off_a_terminal_shows_where_an_early_stop_ended() -> None:
    stream = io.StringIO()
    monitor = ProgressMonitor(100, stream, clock=FakeClock())
    for k in range(0, 15):
        monitor.update(k, 1.0, 0.1)
    monitor.close()
    assert [line.split()[0] for line in stream.getvalue().splitlines()] == ["10/100", "14/100"]


def test_progress_on_a_terminal_redraws_one_line() -> None:
    stream, clock = Terminal(), FakeClock()
    monitor = ProgressMonitor(50, stream, clock=clock)
    for k in range(1, 51):
        clock.now = 0.2 * k
        monitor.update(k, 1.0, 0.1)
    monitor.close()
    text = stream.getvalue()
    assert text.count("\r") == 50 and text.endswith("\n") and text.count("\n") == 1
    assert "50/50 [####################] 100%" in text.splitlines()[-1]


def test_default_out_dir_is_timestamped_and_unique(tmp_path: Path) -> None:
    first = default_out_dir("maze", root=tmp_path)
    assert first.parent == tmp_path and first.name.startswith("maze-")
    first.mkdir()
    second = default_out_dir("maze", root=tmp_path)
    assert second != first and not second.exists()


# A 2x3 grid with one wall:   S . #
#                             . . G
CELLS = ((0, 0), (0, 1), (1, 0), (1, 1), (1, 2))
MOVES = ((-1, 0), (1, 0), (0, -1), (0, 1))


def grid_problem(x0: torch.Tensor, sense: str = "maximize") -> TabularProblem:
    index = {cell: s for s, cell in enumerate(CELLS)}
    P = torch.zeros(len(CELLS), len(MOVES), len(CELLS), dtype=torch.float64)
    for s, (row, col) in enumerate(CELLS):
        for a, (d_row, d_col) in enumerate(MOVES):
            P[s, a, index.get((row + d_row, col + d_col), s)] = 1.0
    P[4] = 0.0  # the goal is terminal
    layout = GridLayout(
        rows=2, cols=3, cells=CELLS, walls=((0, 2),), start=0, goal=4,
        action_names=("up", "down", "left", "right"), action_moves=MOVES,
    )
    return TabularProblem(
        name="tiny_grid",
        transitions=Transitions.from_dense(P),
        discount=0.9,
        initial=torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64),
        temperature=0.1,
        reward=lambda x: torch.zeros(len(CELLS), len(MOVES), dtype=torch.float64),
        objective=lambda x, pi: x.sum(),
        x0=x0,
        var_name="g",
        sense=sense,
        seed=3,
        grid=layout,
    )


def policy_problem() -> TabularProblem:
    """The grid with a reward of one number per state and a policy objective: solvable."""
    problem = grid_problem(torch.zeros(len(CELLS), dtype=torch.float64), sense="minimize")
    problem.reward = lambda x: x.unsqueeze(-1).expand(len(CELLS), len(MOVES))
    problem.objective = lambda x, pi: -pi[0, 1] + 0.01 * x.square().sum()
    problem.features = frozenset({"policy"})
    return problem


def fake_result(x: torch.Tensor) -> SolveResult:
    policy = torch.full((len(CELLS), len(MOVES)), 0.1, dtype=torch.float64)
    policy[[0, 1, 2, 3], [1, 1, 3, 3]] = 0.7  # down, down, right, right
    return SolveResult(
        x=x,
        policy=policy,
        objective=-1.5,
        history={
            "objective": [-1.0, -1.4, -1.5],
            "hypergrad_norm": [1.0, 0.1, 0.0],
            "time": [0.0, 0.01, 0.02],
        },
        iterations=2,
        stopped_because="ran 2 outer iterations",
        extra={"inner_residual": torch.tensor(float("nan"))},
    )


META = {
    "solver": "m_sobirl",
    "options": {"outer": 2, "beta": 0.05},
    "timings": {"parse": 0.01, "compile": 0.02, "solve": 0.03},
    "command": ["brl", "solve", "tiny.brl"],
}


def test_write_run_records_the_run(tmp_path: Path) -> None:
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    problem = grid_problem(x)
    written = write_run(tmp_path / "run", problem, fake_result(x), META)
    assert [path.name for path in written] == ["result.json", "curve.png", "policy.png"]
    for path in written[1:]:
        assert path.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(
        p.name for p in written
    )  # the temporary JSON file is gone

    record = json.loads(written[0].read_text())
    assert {
        "problem", "solver", "seed", "device", "x", "objective", "history", "iterations",
        "stopped_because", "timings", "versions", "command",
    } <= record.keys()
    assert record["problem"] == "tiny_grid" and record["seed"] == 3 and record["device"] == "cpu"
    assert record["solver"] == {"name": "m_sobirl", "options": {"outer": 2, "beta": 0.05}}
    assert record["x"] == [1.0, 2.0]
    assert record["objective"] == 1.5  # maximised: reported in the user's sense
    assert record["history"]["objective"] == [1.0, 1.4, 1.5]
    assert record["history"]["hypergrad_norm"] == [1.0, 0.1, 0.0]
    assert record["extra"] == {"inner_residual": None}  # NaN is not JSON
    assert record["timings"] == META["timings"] and record["command"] == META["command"]
    assert set(record["versions"]) == {"brl", "python", "torch", "numpy"}


def test_policy_picture_with_one_x_entry_per_state(tmp_path: Path) -> None:
    x = torch.arange(len(CELLS), dtype=torch.float64)
    problem = grid_problem(x, sense="minimize")
    written = write_run(tmp_path, problem, fake_result(x), META)
    assert (tmp_path / "policy.png") in written
    assert json.loads((tmp_path / "result.json").read_text())["objective"] == -1.5


def test_policy_picture_heat_map_of_a_bonus_per_pair_is_its_average_under_the_policy(
        tmp_path: Path) -> None:
    x = torch.arange(len(CELLS) * len(MOVES), dtype=torch.float64).reshape(len(CELLS), -1)
    problem, result = grid_problem(x), fake_result(x)
    heat, label = _per_state(x, result.policy, problem)
    assert torch.allclose(heat, (result.policy * x).sum(-1))
    assert label == "g[s, a] averaged over the policy"
    assert _per_state(x[:, 0], result.policy, problem)[0].tolist() == x[:, 0].tolist()
    assert _per_state(torch.zeros(2, dtype=torch.float64), result.policy, problem)[0] is None
    assert (tmp_path / "policy.png") in write_run(tmp_path, problem, result, META)


def test_summary_table(tmp_path: Path) -> None:
    x = torch.linspace(0, 1, 50, dtype=torch.float64)
    problem = grid_problem(x)
    table = summary_table(problem, fake_result(x), {**META, "out_dir": tmp_path})
    rows = {line.split("  ")[0]: line for line in table.splitlines()}
    assert "m_sobirl (outer=2, beta=0.05)" in rows["solver"]
    assert rows["objective"].split()[1] == "1.5" and "running policy" in rows["objective"]
    assert rows["||h|| final"].split()[-1] == "0"
    assert "..." in rows["g"] and "(shape (50,))" in rows["g"]
    assert "parse 0.01 s" in rows["times"]
    assert str(tmp_path) in rows["output"]
    assert "preference queries" not in table  # a model-based run counts none


def test_summary_table_warns_when_the_objective_ends_worse() -> None:
    """A run that ends above where it started (minimised sense) says so and what to try; one
    that improved does not."""
    x = torch.zeros(4, dtype=torch.float64)
    assert "warning" not in summary_table(grid_problem(x), fake_result(x), META)
    worse = fake_result(x)
    worse.objective = -0.5
    rows = {line.split("  ")[0]: line
            for line in summary_table(grid_problem(x), worse, META).splitlines()}
    assert "ended worse than it started" in rows["warning"] and "beta" in rows["warning"]
    cold = {**META, "options": {"start": "cold"}}  # the first objective is not phi(x0) then
    assert "ended worse" not in summary_table(grid_problem(x), worse, cold)


def test_sampled_objectives_end_worse_only_on_the_same_data() -> None:
    """Model-free runs compare their first and last ten samples; a preference loss over pairs
    queried during the run is a loss on other data each time, so it gets no verdict."""
    x = torch.zeros(4, dtype=torch.float64)
    rising = fake_result(x)
    rising.history["objective"] = [0.1 * i for i in range(20)]
    rising.extra["objective_is"] = "the mean of the last 10 sampled estimates"
    assert "ended worse" in summary_table(grid_problem(x), rising, META)
    rising.extra["queries"] = 1280
    assert "ended worse" not in summary_table(grid_problem(x), rising, META)


def test_summary_table_shows_stationarity_with_bounds() -> None:
    """At an optimum on a bound ||h|| stays large: the summary adds the projected step."""
    x = torch.zeros(4, dtype=torch.float64)
    problem, result = grid_problem(x), fake_result(x)
    result.history["stationarity"] = [1.0, 0.5, 0.0]
    problem.lower_bound = problem.upper_bound = None
    assert "stationarity" not in summary_table(problem, result, META)
    problem.lower_bound = torch.zeros_like(x)
    rows = {line.split("  ")[0]: line
            for line in summary_table(problem, result, META).splitlines()}
    assert rows["stationarity"].split()[1] == "0"


def test_summary_table_shows_model_free_counts() -> None:
    x = torch.zeros(4, dtype=torch.float64)
    result = fake_result(x)
    result.extra.update(queries=1280, transitions=3_500_000,
                        objective_is="the mean of the last 10 sampled estimates")
    problem = dataclasses.replace(grid_problem(x), features=frozenset({"preference_loss"}))
    table = summary_table(problem, result, META)
    rows = {line.split("  ")[0]: line for line in table.splitlines()}
    assert rows["preference queries"].split()[-1] == "1,280"
    # not the exact gradient that the progress line's last record may show (verify = exact)
    assert rows["||h|| final"].endswith("0 (the last sampled estimate)")
    assert rows["simulator transitions"].split()[-1] == "3,500,000"
    # an objective that asks no preferences (expected_return) has no count of them to show
    table = summary_table(grid_problem(x), result, META)
    assert "preference queries" not in table and "simulator transitions" in table


@pytest.mark.parametrize("solver", ["m_sobirl", "exact"])
def test_a_registered_solver_runs_end_to_end(solver: str, tmp_path: Path) -> None:
    problem = policy_problem()
    stream = io.StringIO()
    spec, result = solve(problem, solver, {"outer": 20, "beta": 0.005}, ProgressMonitor(20, stream))
    assert spec.name == solver
    lines = stream.getvalue().splitlines()
    bar = [line for line in lines if not line.startswith("m_sobirl:")]
    assert bar[0].startswith("2/20")
    if solver == "m_sobirl":  # its exact solves before and after, which can take minutes
        assert lines[0].endswith("at x0 (start = solved)")
        assert any(line.endswith("exactly (verify = exact)") for line in lines[1:])
    written = write_run(tmp_path, problem, result, {"solver": spec.name})
    record = json.loads(written[0].read_text())
    assert record["objective"] == pytest.approx(result.objective)
    assert len(record["history"]["objective"]) == len(result.history["objective"])
    assert "policy.png" in {path.name for path in written}


def test_a_run_that_swings_away_from_its_best_point_is_flagged():
    """The last stationarity 10x above the smallest reached (a step too large for the problem)
    is worth a warning even when the objective ended below its start."""
    from solvers.output import _unsettled

    assert _unsettled([1.0, 0.5, 0.2, 0.1] + [0.05] * 10, None) is None  # converging
    swinging = [0.05, 0.045, 0.3, 0.2, 0.6, 0.4, 0.9, 0.5, 0.7, 0.82]
    message = _unsettled(swinging, list(range(0, 100, 10)))
    assert message == ("its stationarity ended at 0.82, 18x the smallest it reached (0.045 at "
                       "iteration 10)")
    assert _unsettled([1e-3] + [1e-8] * 9 + [1e-7], None) is None  # below 1e-6: settled


def test_a_run_that_zigzags_without_converging_is_flagged():
    """A step too large can cycle from the start, so the last stationarity is never 10x its
    smallest; an objective that still reverses at most steps with the stationarity near its
    start says the same."""
    from solvers.output import _unsettled

    cycling = [17.0 + (-1) ** k * (0.5 + 0.1 * (k % 3)) for k in range(100)]
    stationarity = [14.0] + [5.0 + (k % 4) for k in range(99)]
    assert "zigzags" in _unsettled(stationarity, None, cycling)
    descending = [1.0 / (k + 1) for k in range(100)]
    assert _unsettled(stationarity, None, descending) is None
    # rounding noise at a converged point zigzags too, but its stationarity fell 1e5-fold
    assert _unsettled([14.0] + [1e-4] * 99, None, cycling) is None


def test_exact_check_after_m_sobirl_is_reported_and_flags_a_lagging_estimate():
    from solvers.output import summary_table

    problem = policy_problem()
    spec, result = solve(problem, "m_sobirl", {"outer": 5, "beta": 0.5})
    exact = result.extra["exact"]
    assert set(exact) == {"objective", "hypergrad_norm", "stationarity"}
    table = summary_table(problem, result, {"solver": spec.name})
    assert "exact at x" in table
    # a running estimate 1000x below the truth is flagged
    result.history["stationarity"][-1] = exact["stationarity"] / 1000
    result.history["hypergrad_norm"][-1] = exact["stationarity"] / 1000
    assert "1000x the running estimate" in summary_table(problem, result,
                                                        {"solver": spec.name})
    # x on a bound, where a projected step does not move: a running estimate of 0
    result.history["stationarity"][-1] = result.history["hypergrad_norm"][-1] = 0.0
    text = summary_table(problem, result, {"solver": spec.name})
    assert "where the running estimate was 0" in text and "inf" not in text
    _, unchecked = solve(problem, "m_sobirl", {"outer": 5, "verify": "off"})
    assert "exact" not in unchecked.extra


def test_model_free_objective_is_labelled_and_compared_like_with_like() -> None:
    """A model-free run's objective says what it is, and the "worse than it started" warning
    compares the mean of its first ten recorded samples with that of its last ten, not one
    noisy first sample with the final value."""
    x = torch.zeros(4, dtype=torch.float64)
    result = fake_result(x)
    meta = {**META, "solver": "sobirl"}
    result.extra["objective_is"] = "f(x, pi) at the follower's running policy, not phi(x)"
    result.history["objective"] = [-3.0] + [-1.0] * 9 + [-1.5] * 20  # a lucky first sample
    result.objective = -1.6
    rows = {line.split("  ")[0]: line
            for line in summary_table(grid_problem(x), result, meta).splitlines()}
    assert "at the follower's running policy, not phi(x)" in rows["objective"]
    assert "warning" not in rows
    result.history["objective"] = [-2.0] * 10 + [-1.0] * 20
    rows = {line.split("  ")[0]: line
            for line in summary_table(grid_problem(x), result, meta).splitlines()}
    # (maximised: the user's sense flips the minimised samples' sign)
    assert "the last 10 recorded samples average 1, the first 10 2" in rows["warning"]


def test_a_small_matrix_variable_is_shown_with_its_shape():
    from solvers.output import _abbreviate

    assert _abbreviate(torch.arange(6.0).view(3, 2)) == "[0, 1, 2, 3, 4, 5] (shape (3, 2))"
    assert _abbreviate(torch.tensor([1.0, 2.0])) == "[1, 2]"
    assert _abbreviate(torch.tensor(0.5)) == "0.5"


def test_a_run_still_improving_from_a_flat_start_is_not_called_unsettled():
    """The smallest stationarity at a flat start is no optimum passed: while the objective kept
    falling since then, no 'did not settle' (a blind user's shaping run, monotone throughout)."""
    from solvers.output import _unsettled

    stationarity = [0.01] + [0.5 - 0.001 * k for k in range(59)]
    falling = [-0.01 * k for k in range(60)]
    assert _unsettled(stationarity, None, falling) is None
    rising_again = falling[:30] + [falling[29] + 0.01 * k for k in range(30)]
    assert "smallest it reached" in _unsettled(stationarity, None, rising_again)


def test_m_sobirl_verified_reports_phi_and_the_exact_policy():
    from solvers.hypergrad import hypergradient

    problem = policy_problem()
    spec, result = solve(problem, "m_sobirl", {"outer": 5, "beta": 0.5})
    truth = hypergradient(problem, result.x)
    assert result.objective == pytest.approx(truth.objective, rel=1e-10)
    assert torch.allclose(result.policy, truth.pi, atol=1e-9)
    assert "running_objective" in result.extra
    assert "phi(x)" in summary_table(problem, result, {"solver": spec.name})


def test_tied_moves_each_get_an_arrow():
    from matplotlib.figure import Figure
    from matplotlib.quiver import Quiver

    from solvers.output import _draw_greedy_actions

    problem = grid_problem(torch.zeros(len(CELLS), dtype=torch.float64))
    cells = np.asarray(problem.grid.cells, dtype=np.int64).reshape(-1, 2)
    uniform = torch.full((len(CELLS), len(MOVES)), 0.25, dtype=torch.float64)
    fig = Figure()
    ax = fig.subplots()
    _draw_greedy_actions(ax, problem.grid, uniform, cells, terminal_goal=True)
    arrows = [c for c in ax.collections if isinstance(c, Quiver)]
    assert len(arrows) == 4 and all(len(q.X) == len(CELLS) - 1 for q in arrows)


def test_a_line_search_stuck_on_a_kink_says_so() -> None:
    """exact's line search stops (no_descent) where no step decreases phi: at rounding level
    that is a stationary point, with a large gradient it is a kink of the objective."""
    x = torch.zeros(4, dtype=torch.float64)
    result = fake_result(x)
    result.stopped_because = "no_descent"
    result.history["hypergrad_norm"][-1] = 1e-9
    assert "kink" not in summary_table(grid_problem(x), result, META)
    result.history["hypergrad_norm"][-1] = 0.08
    assert "x sits on a kink" in summary_table(grid_problem(x), result, META)


def test_a_run_that_ran_out_of_iterations_on_its_way_says_so() -> None:
    """A step too small: the objective still falls at the end and the stationarity is where it
    started (a blind user's goal relocation: 0.268 to 0.141 in 500 iterations, far from the
    optimum). A run that got there, or that stopped for another reason, says nothing."""
    x = torch.zeros(4, dtype=torch.float64)
    result = fake_result(x)
    result.history.update(objective=[1.0 - 0.01 * i for i in range(20)],
                          hypergrad_norm=[0.27 - 0.005 * i for i in range(20)])
    result.history["stationarity"] = []
    result.history["iteration"] = list(range(20))
    result.stopped_because = "max_iterations"
    meta = {**META, "solver": "m_sobirl"}
    assert "ended still improving" in summary_table(grid_problem(x), result, meta)
    result.history["hypergrad_norm"] = [0.27 * 0.5**i for i in range(20)]
    assert "still improving" not in summary_table(grid_problem(x), result, meta)


def test_a_long_cycle_is_flagged_and_not_called_still_improving() -> None:
    """A blind user's gamma = 0.99 chain: the objective cycles with a period of about ten, the
    stationarity ends far above its smallest but the objective below that point's. It was
    called 'still improving ... take larger steps', the opposite of what helps."""
    from solvers.output import _still_going, _unsettled

    objective = [-0.63 * (0.5 - 0.5 * math.cos(2 * math.pi * k / 10)) for k in range(300)]
    # smallest where the (minimised) objective peaks, so the run ends below that point's
    stationarity = [0.86] + [13 * (0.5 - 0.5 * math.cos(2 * math.pi * k / 10)) + 1e-6
                             for k in range(1, 300)]
    assert "its objective cycles" in _unsettled(stationarity, None, objective)
    descending = [1.0 / (k + 1) for k in range(300)]
    assert _unsettled(stationarity, None, descending) is None  # no rise: not a cycle
    # a converged objective moving by ulps is no cycle either (an adversarial review)
    ulps = [2.5 + (k % 3 == 0) * 4e-16 for k in range(300)]
    assert _unsettled([1.0] + [0.01] * 299, None, ulps) is None
    assert _still_going(stationarity, objective) is None


def test_a_slow_steady_descent_after_a_large_first_gradient_is_still_improving() -> None:
    """One large first gradient (15.9) kept 'still improving' quiet for a run still sliding
    towards its optimum at a quarter of its average rate; a geometric convergence slowed to
    under a tenth of it says nothing."""
    from solvers.output import _still_going

    sliding = [0.94 - 0.05 * min(k, 1) - 0.0014 * k for k in range(500)]
    stationarity = [15.9] + [0.09] * 499
    assert "still improving" not in (_still_going(stationarity, sliding) or "")
    assert "improved at each of its last 10 records" in _still_going(stationarity, sliding)
    converging = [0.5 * 0.99**k for k in range(500)]
    assert _still_going(stationarity, converging) is None


def test_m_sobirl_advice_asks_for_follower_steps_near_discount_one() -> None:
    from solvers.output import _m_sobirl_advice

    advice = _m_sobirl_advice(0.99, 10)
    assert "--solver exact --set line_search=armijo" in advice
    assert "--set inner=230" in advice and "remove 10% of the follower's error" in advice
    assert "inner" not in _m_sobirl_advice(0.9, 10)
