"""brl's fused C loops (bilevel_dsl/native.c) against torch's, on the same problems, alternately.

    python bench/fused_loops.py [--sizes 1e4,1e5] [--no-maze] [--iterations 40]

For each problem the kernel is lowered once and P copied: one copy runs the fused loops, the
other is pinned to torch's (its layout is decided with BRL_NATIVE=0). Per call, best of five
repeats: N = 10 soft Bellman steps, the policy with its product, one and 30 adjoint steps (the
centred update), and one bare product with P (MKL's CSR, the scaling benchmark's floor). Then
m_sobirl (inner 10, or 30 inner and 30 adjoint steps on the maze, as in bench/maze.py) in ms per
iteration, the two runs alternating, best of three. The largest difference between the two
runs' final x is printed as a check: the loops compute the same numbers up to rounding.
Problems: bench/maze.py's 100 x 110 shaping maze (10,263 states) and bench/scaling.py's random
MDPs (4 actions, 5 successors). Exits 2 where the fused loops cannot be built.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import common
import maze
import scaling
import torch

import bilevel_dsl as brl
from bilevel_dsl import native
from bilevel_dsl.softmdp import pull_steps, soft_bellman_update
from solvers import solve


def best_ms(fn, repeats: int = 5, calls: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e3)
    return best


def lowered_twice(text: str):
    """The problem lowered twice: the first copy's P pinned to torch's loops."""
    plain = brl.lower(brl.compile_source(text, "bench.brl"), device="cpu")
    os.environ["BRL_NATIVE"] = "0"
    try:
        assert plain.transitions.fused_layout() is None
    finally:
        del os.environ["BRL_NATIVE"]
    fused = brl.lower(brl.compile_source(text, "bench.brl"), device="cpu")
    assert fused.transitions.fused_layout() is not None, native.why()
    return plain, fused


def measure(name: str, text: str, options: dict, iterations: int) -> list[list[object]]:
    plain, fused = lowered_twice(text)
    P = fused.transitions
    S, A = P.n_states, P.n_actions
    gamma, tau = fused.discount, fused.temperature
    with torch.no_grad():
        r = fused.reward(fused.x0)
        V, pi, expected = soft_bellman_update(P, r, torch.zeros(S, dtype=torch.float64), gamma,
                                              tau, 100)
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(S, A, generator=g, dtype=torch.float64)
    z = torch.randn(S, generator=g, dtype=torch.float64)
    g_sum = grad.sum(-1)
    v = torch.rand(S, generator=g, dtype=torch.float64)
    matrix = P.flat_matrix()
    rows = []

    def row(what: str, time_plain: float, time_fused: float) -> None:
        rows.append([name, what, f"{time_plain:.3f}", f"{time_fused:.3f}",
                     f"{time_plain / time_fused:.2f}x"])

    product = best_ms(lambda: torch.mv(matrix, v))
    rows.append([name, f"one product with P ({S:,} states)", f"{product:.3f}", "", ""])
    for what, call in [
        ("10 Bellman steps and the policy",
         lambda T: soft_bellman_update(T, r, V, gamma, tau, 10, expected)),
        ("the policy alone", lambda T: soft_bellman_update(T, r, V, gamma, tau, 0, expected)),
        ("1 adjoint step", lambda T: pull_steps(T, grad, pi, z, 1, 1.0, gamma, d=-g_sum)),
        ("30 adjoint steps", lambda T: pull_steps(T, grad, pi, z, 30, 1.0, gamma, d=-g_sum)),
    ]:
        times = [best_ms(lambda T=T, call=call: call(T)) for T in (plain.transitions, P)]
        row(what, *times)

    runs: dict[str, list[float]] = {"plain": [], "fused": []}
    xs = {}
    for _ in range(3):
        for key, problem in (("plain", plain), ("fused", fused)):
            start = time.perf_counter()
            _, result = solve(problem, "m_sobirl", {**options, "outer": iterations,
                                                    "log_every": iterations, "verify": "off"})
            runs[key].append((time.perf_counter() - start) / iterations * 1e3)
            xs[key] = result.x
    row(f"m_sobirl, ms per iteration ({iterations} iterations)", min(runs["plain"]),
        min(runs["fused"]))
    difference = float((xs["plain"] - xs["fused"]).abs().max())
    rows.append([name, "largest difference of the final x", "", f"{difference:.1e}", ""])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e4,1e5",
                        help="states of the random MDPs, comma-separated (1e5 is fine)")
    parser.add_argument("--no-maze", action="store_true", help="leave out the shaping maze")
    parser.add_argument("--iterations", type=int, default=40,
                        help="m_sobirl iterations per timed run")
    common.add_machine_options(parser)
    args = parser.parse_args()
    common.set_threads(args.threads)
    if native.library() is None:
        print(f"the fused loops are not available here: {native.why()}", file=sys.stderr)
        sys.exit(2)
    common.print_machine()
    print()
    rows = []
    if not args.no_maze:
        rows += measure("maze 100x110", maze.shaping_source(100, 110),
                        {"beta": 7, "inner": 30, "adjoint": "centred", "adjoint_steps": 30,
                         "start": "cold"}, args.iterations)
    for size in [int(float(s)) for s in args.sizes.split(",") if s]:
        rows += measure(f"random {size:,}", scaling.source(size, "policy", "pair"),
                        {"beta": 0.5, "inner": scaling.INNER,
                         "start": "cold"}, args.iterations)
    print(common.table(["problem", "ms per call", "torch's loops", "fused", "speed-up"], rows))
    print()
    common.print_load_at_end()


if __name__ == "__main__":
    main()
