"""Solves in ``(I - gamma P_pi)``: SuperLU against GMRES on grid worlds and random MDPs.

    python bench/policy_solves.py [--mazes 50x50,100x110,200x200,300x300]
                                  [--random 1e3,1e4,1e5] [--iterations 5] [--threads N]

What ``solve_policy_system(method="auto")`` decides for sparse P, and what each choice costs.
For each problem: the state graph's envelope (bandwidth and work in reverse Cuthill-McKee order)
and the work of a trial factorisation (``lu_work``, from which ``direct_solves`` decides; "decision
s" is the time both took), and at the lower level's soft-optimal policy (gamma 0.99,
temperature 0.05) the wall time of a solve of each orientation by GMRES (``krylov``) and by
SuperLU (``direct``: building ``P_pi``, the factorisation and the solve), with their relative
residuals. SuperLU is not run where the envelope's work is above 1e11 (minutes, and gigabytes
of fill). Mazes are bench/maze.py's (an open grid crossed by walls with gaps, slip 0.1); random
MDPs are ``random_mdp(actions = 4, successors = 5)``.

Then, on the mazes, m_sobirl with a ``- value(maze, policy)`` objective (goal relocation, as in
problems/maze_nav.brl, whose value and its backward pass are two solves an iteration): ms per
iteration with ``auto`` as it now decides, and with GMRES forced (``direct_solves`` patched to
answer no, what ``auto`` did for sparse P above 500 states before), alternately. Not a test: it
measures.
"""

from __future__ import annotations

import argparse
import time

import common
import maze
import torch

import bilevel_dsl as brl
from bilevel_dsl import softmdp
from solvers import solve

GAMMA, TEMPERATURE = 0.99, 0.05
SUPERLU_MAX_WORK = 1e11


def maze_source(rows: int, cols: int) -> str:
    return f'''brl 1
problem maze_value "goal relocation with a value objective on a {rows} x {cols} maze"
mdp maze = gridworld(map = """
{maze.maze_map(rows, cols)}
""", slip = 0.1, discount = {GAMMA})
var g[2] = [{round(0.8 * rows)}, {round(0.8 * cols)}]
lower maze {{
    temperature = {TEMPERATURE}
    reward[s, a, t] = - norm(maze.pos[t] - g)
}}
upper minimize - value(maze, policy) + 0.005 * norm2(g - maze.goal_pos)
'''


def random_source(states: int) -> str:
    return f'''brl 1
problem random_value "a random MDP with {states} states"
mdp M = random_mdp(states = {states}, actions = 4, successors = 5, discount = {GAMMA})
param R[M.S, M.A] ~ uniform(0, 1)
var x[M.S, M.A] = 0
lower M {{ temperature = {TEMPERATURE}   reward[s, a] = R[s, a] + x[s, a] }}
upper minimize 0.5 * norm2(x) - value(M, policy, R)
'''


def residual(P, pi, b, v, transpose: bool) -> float:
    apply = softmdp.policy_rmatvec if transpose else softmdp.policy_matvec
    r = b - (v - GAMMA * apply(P, pi, v))
    return float(r.norm() / b.norm())


def solve_row(name: str, source: str) -> list[object]:
    problem = brl.lower(brl.compile_source(source))
    P = problem.transitions
    start = time.perf_counter()
    band, work = P.envelope()
    lu_work = P.lu_work()
    decide_s = time.perf_counter() - start
    r = problem.reward(problem.x0).detach()
    V, _ = softmdp.soft_value_iteration(P, r, GAMMA, TEMPERATURE)
    pi = softmdp.soft_policy(softmdp.soft_q(P, r, V, GAMMA), TEMPERATURE)
    b = torch.rand(P.n_states, generator=torch.Generator().manual_seed(0), dtype=r.dtype)
    cells = []
    for transpose in (False, True):
        for method in ("krylov", "direct"):
            if method == "direct" and work > SUPERLU_MAX_WORK:
                cells.append("not run")
                continue
            start = time.perf_counter()
            v = softmdp.solve_policy_system(P, pi, b, GAMMA, transpose, method)
            seconds = time.perf_counter() - start
            cells.append(f"{seconds:.3f} ({residual(P, pi, b, v, transpose):.0e})")
    return [name, f"{P.n_states:,}", f"{P.nnz:,}", band, f"{work:.1e}", f"{lu_work:.1e}",
            f"{decide_s:.2f}",
            "direct" if softmdp.direct_solves(P) else "krylov", *cells]


def ms_per_iteration(problem, iterations: int) -> float:
    solve(problem, "m_sobirl", {"outer": 1, "verify": "off", "start": "cold"})  # caches
    start = time.perf_counter()
    solve(problem, "m_sobirl", {"outer": iterations, "verify": "off", "start": "cold"})
    return 1000 * (time.perf_counter() - start) / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mazes", default="50x50,100x110,200x200,300x300")
    parser.add_argument("--random", default="1e3,1e4,1e5")
    parser.add_argument("--iterations", type=int, default=5,
                        help="m_sobirl iterations timed per setting (0: skip that table)")
    parser.add_argument("--iterate-max", type=int, default=40_000,
                        help="time m_sobirl on mazes up to this many states")
    common.add_machine_options(parser)
    args = parser.parse_args()
    common.set_threads(args.threads)
    common.print_machine()
    mazes = [tuple(int(n) for n in m.split("x")) for m in args.mazes.split(",") if m]
    sizes = [int(float(s)) for s in args.random.split(",") if s]

    rows = [solve_row(f"maze {r}x{c}", maze_source(r, c)) for r, c in mazes]
    rows += [solve_row("random", random_source(S)) for S in sizes]
    print(f"\nat the soft-optimal policy, gamma {GAMMA}, temperature {TEMPERATURE}; "
          "seconds (relative residual)")
    print(common.table(["problem", "states", "nnz(P)", "band", "envelope work", "LU work",
                        "decision s", "auto",
                        "krylov", "direct", "krylov, T", "direct, T"], rows))

    if args.iterations > 0:
        timed = []
        decide = softmdp.direct_solves
        for r, c in mazes:
            problem = brl.lower(brl.compile_source(maze_source(r, c)))
            if problem.transitions.n_states > args.iterate_max:
                continue
            times = {"auto": [], "krylov": []}
            for _ in range(2):  # alternately
                for setting in times:
                    softmdp.direct_solves = decide if setting == "auto" else (lambda P: False)
                    try:
                        times[setting].append(ms_per_iteration(problem, args.iterations))
                    finally:
                        softmdp.direct_solves = decide
            auto, krylov = min(times["auto"]), min(times["krylov"])
            timed.append([f"maze {r}x{c}", f"{problem.transitions.n_states:,}",
                          f"{auto:.0f}", f"{krylov:.0f}", f"{krylov / auto:.1f}x"])
        print(f"\nm_sobirl with - value(maze, policy): ms per iteration (best of 2, "
              f"{args.iterations} iterations each, cold start, no final check)")
        print(common.table(["problem", "states", "auto", "krylov forced", "speed-up"], timed))
    common.print_load_at_end()


if __name__ == "__main__":
    main()
