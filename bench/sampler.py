"""Throughput of the tabular simulator: transitions sampled per second on a 10^4-state MDP.

    python bench/sampler.py [--states 10000] [--actions 4] [--successors 8] [--repeats 7]
                            [--quick] [--threads N]

A random sparse MDP (CSR storage, ``successors`` nonzeros per row, 1% of each row's mass ends
the episode). For several batch sizes it times ``steps`` calls of ``TabularSimulator.step``
(successors only: the alias-table draw) and of ``rollout`` (a successor and a policy action
per transition, as the model-free solvers use it), and prints the median, min and max over
``repeats`` timed runs. Target on this 2-core CPU: at least 10^6 transitions per second for
batches of ``TARGET_BATCH`` trajectories and more; smaller batches are shown too, but they are
bound by the fixed cost of a step's kernels (some 20-30 launches), not by sampling.
Not a test: it measures and prints.
"""

from __future__ import annotations

import argparse
import time

import common
import torch

from bilevel_dsl.simulator import TabularSimulator, rollout
from bilevel_dsl.softmdp import Transitions

TARGET = 1e6
TARGET_BATCH = 4096


def random_mdp(S: int, A: int, k: int, seed: int = 0) -> Transitions:
    g = torch.Generator().manual_seed(seed)
    rows = torch.arange(S * A).repeat_interleave(k)
    cols = torch.randint(0, S, (S * A * k,), generator=g)
    values = torch.rand(S * A * k, generator=g, dtype=torch.float64)
    values = values / values.view(S * A, k).sum(-1).repeat_interleave(k) * 0.99
    return Transitions.from_coo(rows, cols, values, S, A)


def rates(fn, transitions: int, repeats: int) -> list[float]:
    """Transitions per second of ``repeats`` timed calls of ``fn`` (after one untimed call)."""
    return [transitions / t for t in common.time_call(fn, repeats)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--states", type=int, default=10_000)
    parser.add_argument("--actions", type=int, default=4)
    parser.add_argument("--successors", type=int, default=8)
    parser.add_argument("--batches", default="256,4096,65536",
                        help="comma-separated batch sizes (trajectories advanced together)")
    parser.add_argument("--steps", type=int, default=50, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per setting")
    parser.add_argument("--quick", action="store_true", help="3 runs per setting")
    common.add_machine_options(parser)
    args = parser.parse_args()
    if args.quick:
        args.repeats = 3
    common.set_threads(args.threads)
    common.print_machine()
    S, A = args.states, args.actions
    start = time.perf_counter()
    P = random_mdp(S, A, args.successors)
    sim = TabularSimulator(P, torch.full((S,), 1.0 / S, dtype=torch.float64))
    build = time.perf_counter() - start
    pi = torch.softmax(torch.randn(S, A, generator=torch.Generator().manual_seed(1),
                                   dtype=torch.float64), -1)
    print(f"MDP: S={S:,}, A={A}, nnz={P.nnz:,} ({args.successors} successors per pair); "
          f"simulator built in {build:.2f} s; {args.repeats} runs of {args.steps} steps each")
    print()

    rows = []
    worst = float("inf")
    for batch in (int(b) for b in args.batches.split(",")):
        g = torch.Generator().manual_seed(0)
        states = sim.reset(batch, g)
        actions = torch.randint(0, A, (batch,), generator=g)

        def steps(states=states, actions=actions, g=g) -> None:
            s = states
            for _ in range(args.steps):
                s, _ = sim.step(s, actions, g)

        def rollouts(states=states, g=g) -> None:
            rollout(sim, pi, states, None, args.steps + 1, g)

        for label, fn in (("step", steps), ("rollout (step + policy)", rollouts)):
            r = rates(fn, batch * args.steps, args.repeats)
            if batch >= TARGET_BATCH:
                worst = min(worst, common.median(r))
            rows.append([label, f"{batch:,}", f"{common.median(r) / 1e6:.2f}",
                         f"{min(r) / 1e6:.2f}", f"{max(r) / 1e6:.2f}"])
    print(common.table(["what", "batch", "10^6 transitions/s (median)", "min", "max"], rows))
    print()
    if worst < float("inf"):
        verdict = "met" if worst >= TARGET else "NOT met"
        print(f"target >= 10^6 transitions/s at batches >= {TARGET_BATCH:,}: {verdict} "
              f"(lowest median {worst / 1e6:.2f} x 10^6)")
    common.print_load_at_end()


if __name__ == "__main__":
    main()
