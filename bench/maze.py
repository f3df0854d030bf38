"""Wall time until the exact ||grad phi|| <= 1e-3 on a 10^4-state maze (issue 3, item 3).

    python bench/maze.py [--problem goal|shaping] [--rows 100] [--cols 110] [--beta 10]
                         [--exact-betas 10,50,100]
                         [--variants centred:1,fixed_point:1,lsq:1,centred:10]
                         [--inner 10] [--quick] [--threads N]

``--problem shaping`` replaces the 2-D goal by a bonus ``x[s, a] in [-1, 1]`` for every pair
(``shaping_source``), an outer problem that takes exact gradient descent hundreds of steps;
with bounds, "stationarity" below is the projected gradient mapping, the solvers' own test.

The problem (brl source, generated below): goal relocation, as in problems/maze_nav.brl, on a
generated maze (an open grid crossed every 12 rows by walls with 4-cell gaps; 100 x 110 cells
give 10,263 states), slip 0.1, discount 0.99, temperature 0.05. The robot's reward is minus the
distance of its next cell from the relocated goal g; the designer wants every step of the robot
to bring it closer to the true goal G (the mean over states of the expected one-step distance
to G under the robot's policy) and pays 0.005 ||g - G||^2.

How the time is measured (the checks of ||grad phi|| are never inside a timed region):

* exact: one run with ``tol = 1e-3``. Its history already holds the exact ||grad phi(x_k)||
  of every iterate (the lower level is solved to 1e-10 and the adjoint exactly), and with no
  bounds on g its stopping test is ||grad phi(x_k)|| < tol, so the run's wall time is the answer.
* m_sobirl: its ||h|| is an estimate, so runs are repeated from the start with budgets of K
  outer iterations (100, 200, 400, ... then bisection to within 10%), each timed as a whole
  ``solve()`` call; after each, ``solvers.hypergrad.hypergradient`` computes the exact gradient
  at the returned x_K, untimed. The answer is the wall time of the smallest budget found whose
  x_K has ||grad phi|| <= 1e-3.

Every solver starts from the same x0 with the same step size (``--beta``); exact is also run
with the other step sizes in ``--exact-betas``, since exact gradients tolerate larger steps.
m_sobirl runs with each adjoint update and ``adjoint_steps = 1`` (Algorithm 2 as written), and
with 10 centred adjoint steps per outer iteration (``--variants``).
Target: m_sobirl at least 10x faster than exact. Not a test: it measures.
"""

from __future__ import annotations

import argparse
import math
import time

import common

import bilevel_dsl as brl
from bilevel_dsl.softmdp import newton_pays
from solvers import solve
from solvers.hypergrad import hypergradient

TARGET_GRAD = 1e-3
TARGET_SPEEDUP = 10.0


def maze_map(rows: int, cols: int) -> str:
    """An open grid crossed every 12 rows by a wall with 4-cell gaps every 25 cells, shifted
    from one wall to the next; start at the top left, goal at the bottom right."""
    grid = [["#" if r % 12 == 6 and (c + 7 * (r // 12)) % 25 > 3 else "." for c in range(cols)]
            for r in range(rows)]
    grid[0][0], grid[rows - 1][cols - 1] = "S", "G"
    return "\n".join("".join(row) for row in grid)


def _maze_and_distances(rows: int, cols: int) -> str:
    """The maze and ``D[s, a]``, the distance to the true goal of the cell that a aims at."""
    return f'''mdp maze = gridworld(map = """
{maze_map(rows, cols)}
""", slip = 0.1, discount = 0.99)

param move[maze.A, 2] = [[-1, 0], [1, 0], [0, -1], [0, 1]]   # up, down, left, right
param D[s in maze.S, a in maze.A] = norm(maze.pos[s] + move[a] - maze.goal_pos)
'''


def source(rows: int, cols: int, beta: float) -> str:
    g0 = [round(0.8 * rows), round(0.8 * cols)]
    return f'''brl 1
problem maze_bench "goal relocation on a {rows} x {cols} maze"
{_maze_and_distances(rows, cols)}
param lam = 0.005
var g[2] = [{g0[0]}, {g0[1]}]

lower maze {{
    temperature = 0.05
    reward[s, a, t] = - norm(maze.pos[t] - g)
}}

upper minimize sum {{s in maze.S, a in maze.A}} policy[s, a] * D[s, a] / card(maze.S)
               + lam * norm2(g - maze.goal_pos)

solve m_sobirl(beta = {beta})
'''


def shaping_source(rows: int, cols: int) -> str:
    """The same maze with a harder outer level: a shaping bonus x[s, a] in [-1, 1] for every
    pair (about 41,000 variables for 10^4 states) on a sparse reward (1 at the goal), the same
    objective as ``source`` with a smaller price on ||x||^2."""
    return f'''brl 1
problem maze_shaping "per-pair reward shaping on a {rows} x {cols} maze"
{_maze_and_distances(rows, cols)}
param price = 0.001
var x[maze.S, maze.A] = 0 in [-1, 1]

lower maze {{
    temperature = 0.1
    reward[s, a] = maze.R[s, a] + x[s, a]
}}

upper minimize sum {{s in maze.S, a in maze.A}} policy[s, a] * D[s, a] / card(maze.S)
               + price * sum {{s in maze.S, a in maze.A}} x[s, a]^2
'''


class GradientChecker:
    """Exact stationarity at x (never timed): ||grad phi(x)|| without bounds, and the projected
    gradient mapping ||x - project(x - beta grad phi(x))|| / beta with them, as the solvers'
    own stopping tests; warm-started from the last check."""

    def __init__(self, problem, beta: float) -> None:
        self.problem, self.beta, self.V = problem, beta, None

    def __call__(self, x) -> float:
        if not bool(x.isfinite().all()):  # the solver diverged
            return math.inf
        result = hypergradient(self.problem, x, V=self.V)
        self.V = result.V
        step = x - self.problem.project(x - self.beta * result.grad)
        value = float(step.norm()) / self.beta
        return value if math.isfinite(value) else math.inf


def time_m_sobirl(problem, adjoint: str, steps: int, beta: float, zeta: float, inner: int,
                  max_outer: int, check: GradientChecker, log: list[str]) -> dict:
    """Smallest budget (doubling, then bisection to 10%) whose x_K meets the target."""
    runs: dict[int, tuple[float, float]] = {}

    def run(K: int) -> tuple[float, float]:
        if K not in runs:
            start = time.perf_counter()
            # Algorithm 2's cold start, as in docs/benchmarks.md (start = solved would begin
            # with the exact solve that exact's first iteration makes)
            _, result = solve(problem, "m_sobirl", {"outer": K, "beta": beta, "zeta": zeta,
                                                    "inner": inner, "adjoint": adjoint,
                                                    "adjoint_steps": steps, "log_every": K,
                                                    "start": "cold", "verify": "off"})
            wall = time.perf_counter() - start
            grad = check(result.x)
            runs[K] = (wall, grad)
            log.append(f"  m_sobirl {adjoint} x{steps}: K={K}: {wall:.2f} s, "
                       f"exact stationarity at x_K = {grad:.2e}")
        return runs[K]

    low, high = 0, 100
    while True:
        wall, grad = run(high)
        if grad <= TARGET_GRAD:
            break
        if not math.isfinite(grad) or 2 * high > max_outer:  # diverged, or out of budget
            return {"K": None, "wall": wall, "grad": grad, "budget": high,
                    "note": "diverged (NaN)" if not math.isfinite(grad) else "not reached"}
        low, high = high, 2 * high
    while high - low > max(1, math.ceil(0.1 * high)):
        mid = (low + high) // 2
        if run(mid)[1] <= TARGET_GRAD:
            high = mid
        else:
            low = mid
    wall, grad = run(high)
    return {"K": high, "wall": wall, "grad": grad, "budget": high, "note": ""}


def time_exact(problem, beta: float, time_limit: float, max_outer: int) -> dict:
    start = time.perf_counter()
    _, result = solve(problem, "exact", {"outer": max_outer, "beta": beta, "tol": TARGET_GRAD,
                                         "time_limit": time_limit})
    wall = time.perf_counter() - start
    grads = result.history["stationarity"]
    reached = result.stopped_because == "converged"
    return {"K": result.iterations if reached else None, "wall": wall, "grad": grads[-1],
            "budget": result.iterations,
            "lower": sum(result.history["lower_iterations"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", choices=("goal", "shaping"), default="goal",
                        help="goal: relocate the goal (2 variables); shaping: a bonus for every "
                        "state-action pair (about 41,000 variables, bounded)")
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--cols", type=int, default=110)
    parser.add_argument("--beta", type=float, default=10.0, help="step size of every solver")
    parser.add_argument("--exact-betas", default="10,50,100",
                        help="step sizes for exact (comma-separated; --beta is always run)")
    parser.add_argument("--variants", default="centred:1,fixed_point:1,lsq:1,centred:10",
                        help="m_sobirl runs as adjoint:adjoint_steps (comma-separated)")
    parser.add_argument("--inner", type=int, default=10,
                        help="m_sobirl's soft Bellman steps per outer iteration (its default 10)")
    parser.add_argument("--zeta", type=float, default=0.5,
                        help="step of the lsq adjoint update (m_sobirl's default 0.5)")
    parser.add_argument("--max-outer", type=int, default=12_800,
                        help="largest m_sobirl budget tried")
    parser.add_argument("--exact-time-limit", type=float, default=900.0,
                        help="seconds before an exact run is stopped (then reported as >)")
    parser.add_argument("--quick", action="store_true",
                        help="a 50 x 60 maze (about 2,800 states: below the target's 10^4)")
    common.add_machine_options(parser)
    args = parser.parse_args()
    if args.quick:
        args.rows, args.cols = 50, 60
    common.set_threads(args.threads)
    common.print_machine()

    start = time.perf_counter()
    text = source(args.rows, args.cols, args.beta) if args.problem == "goal" \
        else shaping_source(args.rows, args.cols)
    problem = brl.lower(brl.compile_source(text, "maze.brl"), device="cpu")
    compile_s = time.perf_counter() - start
    P = problem.transitions
    print(f"maze {args.rows} x {args.cols}: {P.n_states:,} states, {P.n_actions} actions, "
          f"nnz(P) = {P.nnz:,} ({'sparse' if P.is_sparse else 'dense'}), discount "
          f"{problem.discount}, temperature {problem.temperature}; compiled in {compile_s:.2f} s")
    print(f"target: exact stationarity <= {TARGET_GRAD:g} (||grad phi||, or with bounds the "
          f"projected gradient mapping); step size beta = {args.beta:g} unless stated")
    print()

    check = GradientChecker(problem, args.beta)
    g0 = check(problem.x0)
    print(f"exact stationarity at x0 = {g0:.3e}")
    log: list[str] = []
    rows, exact_best, sobirl_best = [], math.inf, math.inf
    for variant in [v for v in args.variants.split(",") if v]:
        adjoint, _, steps_text = variant.partition(":")
        steps = int(steps_text or 1)
        res = time_m_sobirl(problem, adjoint, steps, args.beta, args.zeta, args.inner,
                            args.max_outer, check, log)
        reached = res["K"] is not None
        if reached:
            sobirl_best = min(sobirl_best, res["wall"])
        rows.append([f"m_sobirl, adjoint={adjoint}, adjoint_steps={steps}", f"{args.beta:g}",
                     res["K"] if reached else f"> {res['budget']}",
                     f"{res['wall']:.2f}" if reached else f"> {res['wall']:.2f}",
                     f"{res['wall'] / res['budget'] * 1e3:.2f}", f"{res['grad']:.2e}",
                     res["note"] + (f" (zeta {args.zeta:g})" if adjoint == "lsq" else "")])
    # exact solves its lower level by Newton's method where factorisations pay (softmdp)
    lower_method = ("Newton" if newton_pays(problem.transitions, problem.discount)
                    else "soft VI")
    betas = [args.beta] + [float(b) for b in args.exact_betas.split(",")
                           if b and float(b) != args.beta]
    for beta in betas:
        res = time_exact(problem, beta, args.exact_time_limit, args.max_outer)
        reached = res["K"] is not None
        if reached:
            exact_best = min(exact_best, res["wall"])
        rows.append([f"exact{' (same beta)' if beta == args.beta else ''}", f"{beta:g}",
                     res["K"] if reached else f"> {res['budget']}",
                     f"{res['wall']:.2f}" if reached else f"> {res['wall']:.2f}",
                     f"{res['wall'] / max(res['budget'] + 1, 1) * 1e3:.0f}", f"{res['grad']:.2e}",
                     f"{res['lower']:,} lower-level steps ({lower_method})"])
    print("\n".join(log))
    print()
    print(common.table(["solver", "beta", "outer iterations", "wall s", "ms/iter",
                        "exact stationarity there", "note"], rows))
    print()
    exact_same = next((r for r in rows if r[0] == "exact (same beta)"), None)
    if math.isfinite(sobirl_best) and exact_same is not None:
        same = float(exact_same[3].lstrip("> "))
        bound = "> " if exact_same[3].startswith(">") else ""
        print(f"fastest m_sobirl vs exact at the same beta: {bound}{same / sobirl_best:.1f}x")
    if math.isfinite(sobirl_best) and math.isfinite(exact_best):
        ratio = exact_best / sobirl_best
        verdict = "met" if ratio >= TARGET_SPEEDUP else "NOT met"
        print(f"target (m_sobirl >= {TARGET_SPEEDUP:g}x faster than the fastest exact run): "
              f"{verdict} ({ratio:.1f}x)")
    common.print_load_at_end()


if __name__ == "__main__":
    main()
