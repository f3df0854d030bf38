"""Throughput of the tabular simulator: transitions sampled per second on a 10^4-state MDP.

    python bench/sampler.py [--states 10000] [--actions 4] [--successors 8] [--batch 65536]

Prints transitions per second for sparse (CSR) storage, and for the batched policy sampler;
the target on a 2-core CPU is at least 10^6 transitions per second.
"""

from __future__ import annotations

import argparse
import time

import torch

from bilevel_dsl.simulator import TabularSimulator, sample_actions
from bilevel_dsl.softmdp import Transitions


def random_mdp(S: int, A: int, k: int, seed: int = 0) -> Transitions:
    g = torch.Generator().manual_seed(seed)
    rows = torch.arange(S * A).repeat_interleave(k)
    cols = torch.randint(0, S, (S * A * k,), generator=g)
    values = torch.rand(S * A * k, generator=g, dtype=torch.float64)
    values = values / values.view(S * A, k).sum(-1).repeat_interleave(k) * 0.99
    return Transitions.from_coo(rows, cols, values, S, A)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--states", type=int, default=10_000)
    parser.add_argument("--actions", type=int, default=4)
    parser.add_argument("--successors", type=int, default=8)
    parser.add_argument("--batch", type=int, default=65_536)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    S, A = args.states, args.actions
    P = random_mdp(S, A, args.successors)
    sim = TabularSimulator(P, torch.full((S,), 1.0 / S, dtype=torch.float64))
    pi = torch.softmax(torch.randn(S, A, dtype=torch.float64), -1)
    g = torch.Generator().manual_seed(0)
    states = sim.reset(args.batch, g)
    actions = sample_actions(pi, states, g)
    for _ in range(10):  # warm-up: first touches of the tables, allocator
        states, _ = sim.step(states, actions, g)
    start = time.perf_counter()
    for _ in range(args.steps):
        states, _ = sim.step(states, actions, g)
    elapsed = time.perf_counter() - start
    print(f"step:            {args.batch * args.steps / elapsed:,.0f} transitions/s "
          f"(S={S}, A={A}, nnz={P.nnz}, batch={args.batch}, "
          f"threads={torch.get_num_threads()})")
    start = time.perf_counter()
    for _ in range(args.steps):
        states, _ = sim.step(states, actions, g)
        actions = sample_actions(pi, states, g)
    elapsed = time.perf_counter() - start
    print(f"step + policy:   {args.batch * args.steps / elapsed:,.0f} transitions/s")


if __name__ == "__main__":
    main()
