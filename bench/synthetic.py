"""Milliseconds per M-SoBiRL outer iteration on problems/synthetic.brl (issue 3, item 1).

    python bench/synthetic.py [--iterations 1000] [--repeats 7] [--quick] [--threads N]

The paper's Figure 4 problem (10 states, 5 actions, x in R^100). Each run is a whole
``solve(problem, "m_sobirl", {"outer": K, "adjoint": ...})`` call on an already compiled and
lowered problem, divided by K; the table gives the median (and the spread) over the runs.
Compile time (``compile_file`` + ``lower``) is measured separately. Target: under 1 ms per
iteration. For scale, the paper's public code takes about 21 ms per iteration on this problem
(as reported in issue 3; it is not run here). Not a test: it measures and prints.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import common

import bilevel_dsl as brl
from solvers import solve

FILE = Path(__file__).resolve().parent.parent / "problems" / "synthetic.brl"
PAPER_MS = 21.0  # the paper's public code on this problem, as reported in issue 3
TARGET_MS = 1.0


def compile_problem():
    return brl.lower(brl.compile_file(FILE), device="cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1000, help="outer iterations per run")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per setting")
    parser.add_argument("--quick", action="store_true", help="200 iterations, 3 runs")
    common.add_machine_options(parser)
    args = parser.parse_args()
    if args.quick:
        args.iterations, args.repeats = 200, 3
    common.set_threads(args.threads)
    common.print_machine()
    print(f"problem: {FILE.name}; {args.repeats} runs of {args.iterations} outer iterations "
          "per setting (each run a separate solve() call)")
    print()

    start = time.perf_counter()
    problem = compile_problem()
    cold = time.perf_counter() - start
    warm = common.median(common.time_call(compile_problem, repeats=5, warmup=0))
    print(common.table(["compile + lower", "seconds"], [
        ["first (cold, in this process)", f"{cold:.3f}"],
        ["median of 5 more", f"{warm:.3f}"],
    ]))
    print()

    rows = []
    measured = {}
    for adjoint in ("lsq", "fixed_point"):
        options = {"outer": args.iterations, "adjoint": adjoint, "verify": "off"}
        solve(problem, "m_sobirl", {**options, "outer": 50})  # warm-up
        per_iter = []
        h_end = float("nan")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            _, result = solve(problem, "m_sobirl", options)
            per_iter.append((time.perf_counter() - t0) / args.iterations * 1e3)
            h_end = result.history["hypergrad_norm"][-1]
        mid = common.median(per_iter)
        measured[adjoint] = mid
        label = f"{adjoint} (the file's)" if adjoint == "lsq" else adjoint
        rows.append([label, f"{mid:.3f}", f"{min(per_iter):.3f}", f"{max(per_iter):.3f}",
                     f"{PAPER_MS / mid:.0f}x", f"{h_end:.2e}"])
    print(common.table(
        ["adjoint", "ms/iter (median)", "min", "max", "vs paper's ~21 ms", "||h|| at the end"],
        rows))
    print()
    for adjoint, ms in measured.items():
        verdict = "met" if ms < TARGET_MS else "NOT met"
        print(f"target (< {TARGET_MS:g} ms/iter), adjoint={adjoint}: {verdict} ({ms:.3f} ms)")
    common.print_load_at_end()


if __name__ == "__main__":
    main()
