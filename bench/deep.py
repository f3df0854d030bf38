"""Deep RLHF (issue 5): the bilevel machinery's cost over SAC, and results at a small budget.

    python bench/deep.py speed   [--problem hopper] [--steps 3000] [--block 1000] [--width 256]
                                 [--repeats 1]
    python bench/deep.py results [--problems halfcheetah,hopper] [--seeds 1,2] [--steps 10000]

``speed`` runs ``sobirl_sac`` (implicit term on from the start) and ``sac_true`` on the same
environment, device and SAC settings, and prints environment steps per second of each over the
steps after SAC's random warm-up (the wall time of the outer iterations, so it includes fragment
collection, the oracle and the reward-model updates, but not the initial pairs). Target: the
bilevel solver costs at most 30% over ``sac_true``.

``results`` trains ``sobirl_sac``, ``drlhf_sac`` and ``sac_true`` for ``--steps`` environment
steps on each problem and seed and prints the final evaluation return (deterministic policy, 5
episodes), mean and spread over seeds. Not a test: it measures.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import common

import bilevel_dsl as brl
from solvers import solve

ROOT = Path(__file__).resolve().parent.parent


def run(name: str, solver: str, seed: int, options: dict) -> tuple[float, dict]:
    """One whole solve of problems/rlhf_NAME.brl with 50 initial pairs (20 epochs)."""
    checked = brl.compile_file(ROOT / "problems" / f"rlhf_{name}.brl", seed=seed,
                               overrides={"initial_pairs": "50", "warmup_epochs": "20"})
    p = brl.lower(checked, device="cpu")
    start = time.perf_counter()
    _, result = solve(p, solver, options)
    return time.perf_counter() - start, result.history


def speed(args: argparse.Namespace) -> None:
    blocks = max(2, args.steps // args.block)
    options = {"outer": blocks, "sac_steps": args.block, "learning_starts": args.block,
               "sac_width": args.width, "eval_every": 0, "checkpoint_every": 0}
    solvers = (("sac_true", {}), ("sobirl_sac", {"implicit_warmup": 0}))
    rows, rates = [], {name: [] for name, _ in solvers}
    for repeat in range(args.repeats):
        # alternate the order so that a drift in the machine's speed hits both alike
        for solver, extra in (solvers if repeat % 2 == 0 else solvers[::-1]):
            _, history = run(args.problem, solver, 1, {**options, **extra})
            # iteration 1 is SAC's random warm-up block (no updates): time the rest
            seconds = history["time"][-1] - history["time"][0]
            steps = history["env_steps"][-1] - history["env_steps"][0]
            query = history["query_steps"][-1] - history["query_steps"][0]
            rows.append((repeat + 1, solver, steps, query, seconds, steps / seconds))
            rates[solver].append(steps / seconds)
    print(f"problem rlhf_{args.problem}: {blocks} blocks of {args.block} steps, SAC width "
          f"{args.width}, cpu, {args.repeats} repeat(s)\n")
    print("| repeat | solver | SAC steps timed | fragment steps | seconds | SAC steps/s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for repeat, solver, steps, query, seconds, rate in rows:
        print(f"| {repeat} | {solver} | {steps:,} | {query:,} | {seconds:.1f} | {rate:.2f} |")
    true_rate, bilevel_rate = (statistics.median(rates[name]) for name, _ in solvers)
    overhead = true_rate / bilevel_rate - 1
    print(f"\nmedian SAC steps/s: sac_true {true_rate:.2f}, sobirl_sac {bilevel_rate:.2f}")
    print(f"bilevel overhead over sac_true: {overhead:+.1%} "
          f"(target <= +30%: {'met' if overhead <= 0.30 else 'NOT met'})")


def results(args: argparse.Namespace) -> None:
    seeds = [int(s) for s in args.seeds.split(",")]
    options = {"outer": args.steps // args.block, "sac_steps": args.block,
               "learning_starts": min(args.block, 1000), "sac_width": args.width,
               "eval_every": args.steps // args.block, "eval_episodes": 5,
               "checkpoint_every": 0}
    print(f"budget: {args.steps:,} SAC steps per run (blocks of {args.block}), SAC width "
          f"{args.width}, 50 initial pairs (20 epochs), seeds {seeds}, cpu\n")
    print("| problem | solver | final eval return, mean | spread (min .. max) | minutes/run |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for name in args.problems.split(","):
        for solver in ("sobirl_sac", "drlhf_sac", "sac_true"):
            extra = {"implicit_warmup": args.steps // 10} if solver == "sobirl_sac" else {}
            finals, minutes = [], []
            for seed in seeds:
                seconds, history = run(name, solver, seed, {**options, **extra})
                finals.append(history["eval_return"][-1] if history["eval_return"]
                              else math.nan)
                minutes.append(seconds / 60)
            print(f"| {name} | {solver} | {statistics.mean(finals):.1f} | "
                  f"{min(finals):.1f} .. {max(finals):.1f} | {statistics.mean(minutes):.1f} |",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("speed")
    p.add_argument("--problem", default="hopper")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--block", type=int, default=1000)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of each solver, in alternating order; medians are compared")
    p.set_defaults(run=speed)
    p = sub.add_parser("results")
    p.add_argument("--problems", default="halfcheetah,hopper")
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--block", type=int, default=1000)
    p.add_argument("--width", type=int, default=256)
    p.set_defaults(run=results)
    common.add_machine_options(parser)
    args = parser.parse_args()
    common.set_threads(args.threads)
    common.print_machine()
    args.run(args)
    common.print_load_at_end()


if __name__ == "__main__":
    main()
