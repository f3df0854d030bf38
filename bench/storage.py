"""Dense or sparse storage of P, and SuperLU or GMRES for its solves, at the sizes where the
rules change (a few hundred to a few thousand states): ms per iteration of m_sobirl and of
exact under the rules before section 18 of docs/benchmarks.md (a generated MDP dense up to 4 *
10^6 entries whatever its density; SuperLU for every sparse P up to 500 states) and now (dense
up to 2^18 entries or above a tenth nonzero; SuperLU up to 200 states, then only where the
state graph has a narrow envelope). Both rules run in this process, one after the other for each
problem, so they share the machine's state.

    python bench/storage.py            # about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import bilevel_dsl.softmdp as softmdp
import solvers
from bilevel_dsl import compile_source, lower
from solvers.result import Monitor

RULES = {"before": (4_000_000, 500), "now": (softmdp._SPARSE_MIN_ENTRIES,
                                             softmdp._SPARSE_LU_ALWAYS)}


def source(kind: str, states: int) -> str:
    if kind == "grid":
        side = round(states ** 0.5)
        rows = ["." * side for _ in range(side)]
        rows[0] = "S" + rows[0][1:]
        rows[-1] = rows[-1][:-1] + "G"
        return ("brl 1\nmdp M = gridworld(map = \"" + "\\n".join(rows) + "\", slip = 0.1, "
                "discount = 0.95)\nvar x[M.S, M.A] = 0\nlower M { temperature = 0.5  "
                "reward[s, a] = M.R[s, a] + x[s, a] }\nupper minimize 0.5 * norm2(x) - "
                "value(M, policy)\n")
    return (f"brl 1\nmdp M = random_mdp(states = {states}, actions = 4, successors = 5, "
            "discount = 0.9)\nvar x[M.S, M.A] = 0\nlower M { temperature = 0.5  reward[s, a] "
            "= x[s, a] }\nupper minimize 0.5 * norm2(x) - value(M, policy, M.R + 1)\n")


def per_iteration(kind: str, states: int, rule: str) -> tuple[int, str, float, float]:
    """(states, storage and solve method, m_sobirl ms/iteration, exact ms/iteration) under
    ``rule`` (a grid world has the square number of states nearest ``states``)."""
    softmdp._SPARSE_MIN_ENTRIES, softmdp._SPARSE_LU_ALWAYS = RULES[rule]
    problem = lower(compile_source(source(kind, states), "bench.brl"))
    P = problem.transitions
    storage = ("sparse" if P.is_sparse else "dense") + \
        ("/LU" if softmdp.direct_solves(P) else "/GMRES")
    times = []
    for name, options in (("m_sobirl", {"outer": 100, "verify": "off"}),
                          ("exact", {"outer": 5})):
        spec, typed = solvers.resolve(problem, name, options)
        start = time.perf_counter()
        spec.run(problem, typed, Monitor())
        times.append(1000 * (time.perf_counter() - start) / options["outer"])
    return problem.n_states, storage, times[0], times[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, torch "
          f"{torch.__version__}, threads {args.threads}")
    print("| MDP | states | before: storage | m_sobirl ms/it | exact ms/it | now: storage | "
          "m_sobirl ms/it | exact ms/it |")
    print("|---|---:|---|---:|---:|---|---:|---:|")
    per_iteration("random", 144, "now")  # torch's and the solvers' first calls set up
    for kind in ("random", "grid"):
        for states in (144, 256, 400, 625, 1000, 2025):
            cells = []
            for rule in RULES:
                n, storage, m_sobirl, exact = per_iteration(kind, states, rule)
                cells += [storage, f"{m_sobirl:.2f}", f"{exact:.2f}"]
            print(f"| {kind} | {n:,} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
