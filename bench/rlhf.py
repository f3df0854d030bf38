"""Preference queries, simulator transitions and time until RLHF reaches a true return (issue 4).

    python bench/rlhf.py [--problem rlhf_grid|FILE.brl] [--seeds 5] [--target 0.9] [--outer K]
                         [--set NAME=VALUE] [--quick] [--threads N]

Runs ``sobirl``, ``stoc_sobirl`` and ``drlhf`` on the same problem with the same options and
seeds ``0 .. seeds-1``: the options of the file's ``solve`` statement (rlhf_grid.brl: ``outer =
60, beta = 0.2``), given to all three (each takes those it declares; ``--set name=value`` adds
or overrides one), on top of each solver's defaults. At every outer iteration ``k`` the
follower's policy ``pi_k`` (trained on the reward model fitted after ``k`` steps) is recorded
with the preference queries and simulator transitions made so far and the wall time since the
start, and evaluated after the run with the model (its discounted true return from the initial
distribution, under the oracle's reward, which the solvers never see). A run *reaches* the
target at the first iteration whose policy earns at least ``target`` times the optimal true
return.

Two tables: the cost to reach the target (mean, standard deviation and range over the seeds
that reached it), and the true-return fraction at equal numbers of preference queries. Not a
test: it measures and prints.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import common
import torch

import bilevel_dsl as brl
from bilevel_dsl.softmdp import policy_evaluation
from solvers import REGISTRY, drlhf, parse_option_value, resolve, sobirl, stoc_sobirl
from solvers.modelfree import Environment, outer_loop
from solvers.result import Monitor

PROBLEMS = Path(__file__).resolve().parent.parent / "problems"
SOLVERS = {"sobirl": sobirl, "stoc_sobirl": stoc_sobirl, "drlhf": drlhf}


def optimal_return(problem: brl.TabularProblem) -> float:
    """The best discounted true return from the initial distribution (value iteration)."""
    truth = problem.trajectory_terms[0].truth
    V = torch.zeros(problem.n_states, dtype=truth.dtype)
    for _ in range(2000):
        V = (truth + problem.discount * problem.transitions.expect(V)).amax(-1)
    return float((problem.initial * V).sum())


def true_return(problem: brl.TabularProblem, pi: torch.Tensor) -> float:
    truth = problem.trajectory_terms[0].truth
    V = policy_evaluation(problem.transitions, truth, pi, problem.discount)
    return float((problem.initial * V).sum())


def run(problem: brl.TabularProblem, name: str, options: dict, seed: int) -> dict:
    """One run: per iteration, the true-return fraction, queries, transitions and time."""
    problem.seed = seed
    declared = {option.name: option for option in REGISTRY.get(name).options}
    given = {k: parse_option_value(declared[k], v) if isinstance(v, str) else v
             for k, v in options.items() if k in declared}
    _, typed = resolve(problem, name, given)
    seen: list[tuple[torch.Tensor, int, int, float]] = []
    start = time.perf_counter()

    def observe(k: int, x: torch.Tensor, pi: torch.Tensor, env: Environment) -> None:
        seen.append((pi.detach().clone(), env.queries, env.transitions,
                     time.perf_counter() - start))

    outer_loop(problem, typed, Monitor(), *SOLVERS[name].setup(problem, typed), observer=observe)
    best = optimal_return(problem)
    return {"fraction": [true_return(problem, pi) / best for pi, *_ in seen],
            "queries": [q for _, q, _, _ in seen], "transitions": [n for _, _, n, _ in seen],
            "time": [t for *_, t in seen]}


def first_reach(trace: dict, target: float) -> int | None:
    return next((i for i, f in enumerate(trace["fraction"]) if f >= target), None)


def at_queries(trace: dict, budget: int) -> float:
    """The true-return fraction of the last policy trained with at most ``budget`` queries."""
    index = [i for i, q in enumerate(trace["queries"]) if q <= budget]
    return trace["fraction"][index[-1]] if index else math.nan


def spread(values: list[float], fmt: str) -> str:
    """``mean ± sd (min - max)`` of the values, or ``-`` when there are none."""
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return (f"{format(statistics.mean(values), fmt)} ± {format(sd, fmt)} "
            f"({format(min(values), fmt)} - {format(max(values), fmt)})")


def parse_set(items: list[str]) -> dict[str, str]:
    """``--set name=value`` items (values are typed per solver, in ``run``)."""
    options = {}
    for item in items:
        key, _, value = item.partition("=")
        options[key.strip()] = value.strip()
    return options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="rlhf_grid",
                        help="a file in problems/ (no .brl), or the path of a .brl file")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1 per solver")
    parser.add_argument("--target", type=float, default=0.9,
                        help="fraction of the optimal true return to reach")
    parser.add_argument("--outer", type=int, default=0,
                        help="outer iterations per run (default: the file's, else 200)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a solver option for all three solvers (repeatable)")
    parser.add_argument("--quick", action="store_true", help="3 seeds")
    common.add_machine_options(parser)
    args = parser.parse_args()
    if args.quick:
        args.seeds = 3
    common.set_threads(args.threads)
    common.print_machine()

    path = Path(args.problem) if args.problem.endswith(".brl") else PROBLEMS / f"{args.problem}.brl"
    problem = brl.lower(brl.compile_file(path), device="cpu")
    options = {**problem.solver_options, **parse_set(args.set)}
    if args.outer:
        options["outer"] = args.outer
    problem.solver, problem.solver_options = None, {}  # passed explicitly, to all three
    term = problem.trajectory_terms[0]
    print(f"problem: {path.name} ({problem.n_states} states, {problem.n_actions} "
          f"actions, tau {problem.temperature}, gamma {problem.discount}, pairs of {term.horizon} "
          f"steps); options {options} for all three, on top of each solver's defaults; seeds "
          f"0-{args.seeds - 1}")
    print(f"optimal true return {optimal_return(problem):.4f}; target {args.target:.0%} of it")
    print()

    traces: dict[str, list[dict]] = {}
    start = time.perf_counter()
    for name in SOLVERS:
        traces[name] = [run(problem, name, options, seed) for seed in range(args.seeds)]

    rows = []
    for name, runs in traces.items():
        hits = [(trace, first_reach(trace, args.target)) for trace in runs]
        hits = [(trace, i) for trace, i in hits if i is not None]
        finals = [trace["fraction"][-1] for trace in runs]
        rows.append([name, f"{len(hits)}/{len(runs)}",
                     spread([i for _, i in hits], ".1f"),
                     spread([trace["queries"][i] for trace, i in hits], ",.0f"),
                     spread([trace["transitions"][i] / 1e6 for trace, i in hits], ".2f"),
                     spread([trace["time"][i] for trace, i in hits], ".2f"),
                     f"{statistics.mean(finals):.3f} (min {min(finals):.3f})"])
    print(f"Cost until the follower's policy first earns {args.target:.0%} of the optimal true "
          "return (mean ± sd (min - max) over the seeds that reach it)")
    print(common.table(["solver", "reached", "iterations", "preference queries",
                        "transitions (10^6)", "seconds", "final fraction: mean (min)"], rows))
    print()

    last = min(trace["queries"][-1] for runs in traces.values() for trace in runs)
    marks = [64 * 2**i for i in range(16) if 64 * 2**i <= last] or [last]
    rows = []
    for budget in marks:
        row = [f"{budget:,}"]
        for runs in traces.values():
            values = [at_queries(trace, budget) for trace in runs]
            row.append(f"{statistics.mean(values):.3f} (min {min(values):.3f})")
        rows.append(row)
    print("True-return fraction of the policy after at most Q preference queries "
          "(mean (min) over the seeds)")
    print(common.table(["queries Q", *traces], rows))
    print()
    print(f"total {time.perf_counter() - start:.0f} s")
    common.print_load_at_end()


if __name__ == "__main__":
    main()
