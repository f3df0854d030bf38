"""A deep RLHF problem as the solvers see it: what a `.brl` file with ``gym(...)`` lowers to."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .envs import EnvSpec
from .reward_model import RewardNetSpec


@dataclass(frozen=True)
class PreferenceSpec:
    """The RLHF upper level: fragments, the Bradley-Terry oracle and the query schedule.

    Defaults are the paper's public code's (BeamRider): fragments of 25 steps, 600 initial pairs
    trained for ``warmup_epochs`` epochs, a queue of the last 3,000 pairs and 6 new pairs per
    outer iteration. Every ``heldout_every``-th new pair is kept out of training to measure the
    reward model's preference accuracy.

    ``schedule = decay`` lowers the rate as Christiano et al. (2017) do, to
    ``pairs_per_iteration * decay_steps / (T + decay_steps)`` pairs in an iteration whose SAC
    block starts after ``T`` steps (so ``pairs_per_iteration`` at ``T = 0``; they used 5e6); the
    fractional part is carried to the next iteration, so the counts add up to the integral part
    of the summed rates. ``total_pairs`` caps the queries of the whole run, initial pairs
    included.
    """

    fragment: int = 25
    initial_pairs: int = 600
    pairs_per_iteration: int = 6
    queue: int = 3000
    warmup_epochs: int = 512
    scale: float = 0.0
    noise: float = 0.0
    clip: bool = False
    heldout_every: int = 10
    schedule: str = "constant"
    decay_steps: float = 5e6
    total_pairs: int | None = None

    def pairs_due(self, steps: int, carry: float, asked: int) -> tuple[int, float]:
        """``(pairs to query, carry)`` for an iteration whose SAC block starts after ``steps``
        steps, with ``carry`` the fraction left over so far and ``asked`` pairs queried."""
        due = float(self.pairs_per_iteration)
        if self.schedule == "decay":
            due = due * self.decay_steps / (steps + self.decay_steps) + carry
        count = math.floor(due)
        if self.total_pairs is not None:
            count = max(0, min(count, self.total_pairs - asked))
        return count, due - math.floor(due)


@dataclass(frozen=True)
class DeepProblem:
    """RLHF on a gymnasium environment with a reward network as the leader's variable."""

    name: str
    env: EnvSpec
    reward_net: RewardNetSpec
    preferences: PreferenceSpec
    discount: float = 0.99
    temperature: float | None = None  # None: SAC's automatic temperature
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    source: Path | None = None
    solver: str | None = None
    solver_options: dict = field(default_factory=dict)
    var_name: str = "r"

    environment = "gymnasium"
    form = "preference_loss"
    features: frozenset[str] = frozenset({"trajectory", "reward_network"})
    sign = 1.0
