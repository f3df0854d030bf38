"""Preference data for deep RLHF: trajectory fragments, a Bradley-Terry oracle, a queue.

Fragments are cut from rollouts of the follower's current (stochastic) policy in their own
vector environment, so the pairs a solver queries are samples from pi_theta, as the implicit term
of the hyper-gradient assumes, and their environment steps are counted apart from SAC's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from ..registry import SolverError
from .replay import DamagedCheckpoint
from .reward_model import RewardNet

# the rollout steps a query may take, per step of the fragments it asks for, before the
# collector gives up: episodes that end before `length` steps yield no fragment at all (a
# falling Hopper early in training needed 63,000 steps for 12 fragments of 25: 210 per step)
PATIENCE = 1000


class FragmentShortage(SolverError):
    """The follower's episodes are too short for the fragments: the run stops, keeping its
    last whole iteration."""


@dataclass
class Fragments:
    """``n`` fragments of ``length`` steps: observations, actions and the true rewards."""

    obs: Tensor      # (n, length, *obs_shape)
    actions: Tensor  # (n, length, *action_shape)
    rewards: Tensor  # (n, length), the environment's reward, seen only by the oracle

    def __len__(self) -> int:
        return self.obs.shape[0]

    def steps(self) -> tuple[Tensor, Tensor]:
        """Observations and actions of every step, fragments laid end to end (one batch)."""
        return self.obs.flatten(0, 1), self.actions.flatten(0, 1)


class FragmentCollector:
    """Cuts fragments of ``length`` consecutive steps from one episode out of running rollouts.

    Episodes continue across calls; a partial fragment is dropped when its episode ends.
    """

    def __init__(self, env: gym.vector.VectorEnv, length: int, device: torch.device) -> None:
        self.env, self.length, self.device = env, length, device
        self.obs, _ = env.reset()
        self.partial: list[list[tuple[np.ndarray, np.ndarray, float]]] = [
            [] for _ in range(env.num_envs)]
        self.steps = 0

    def reset(self, seed: int) -> None:
        self.obs, _ = self.env.reset(seed=seed)
        self.partial = [[] for _ in range(self.env.num_envs)]

    def collect(self, count: int, policy: Callable[[Tensor], Tensor],
                stop: Callable[[], None] | None = None) -> Fragments:
        """``count`` fragments under ``policy`` (batched observations -> actions). ``stop`` is
        called before every step, so a time limit can end a long query by raising; after
        ``PATIENCE * count * length`` steps without the fragments, ``FragmentShortage`` says
        that the episodes are too short."""
        done_fragments: list[list[tuple[np.ndarray, np.ndarray, float]]] = []
        budget = PATIENCE * count * self.length
        taken = 0
        while len(done_fragments) < count:
            if stop is not None:
                stop()
            if taken >= budget:
                raise FragmentShortage(
                    f"the query found {len(done_fragments)} of {count} fragments of "
                    f"{self.length} steps in {taken:,} rollout steps: the follower's episodes "
                    f"rarely last {self.length} steps, and a fragment never spans two episodes; "
                    "lower `fragment` in the file's preference_loss")
            taken += self.env.num_envs
            actions = policy(torch.as_tensor(self.obs, device=self.device)).cpu().numpy()
            next_obs, reward, terminated, truncated, info = self.env.step(actions)
            self.steps += self.env.num_envs
            ended = np.logical_or(terminated, truncated)
            for i in range(self.env.num_envs):
                self.partial[i].append((self.obs[i], actions[i], float(reward[i])))
                if len(self.partial[i]) == self.length:
                    done_fragments.append(self.partial[i])
                    self.partial[i] = []
                elif ended[i]:
                    self.partial[i] = []
            self.obs = next_obs
        chosen = done_fragments[:count]
        obs = np.stack([np.stack([step[0] for step in frag]) for frag in chosen])
        actions = np.stack([np.stack([step[1] for step in frag]) for frag in chosen])
        rewards = np.array([[step[2] for step in frag] for frag in chosen], dtype=np.float64)
        return Fragments(torch.as_tensor(obs, device=self.device),
                         torch.as_tensor(actions, device=self.device),
                         torch.as_tensor(rewards, device=self.device))


@dataclass(frozen=True)
class Oracle:
    """A synthetic Bradley-Terry labeller on the environment's true reward.

    ``P(first preferred) = sigmoid((R_1 - R_2) / scale)`` with ``R`` a fragment's summed
    (optionally sign-clipped) true reward; ``scale = 0`` prefers the larger return outright (ties
    half and half); with probability ``noise`` the label is a fair coin instead.
    """

    scale: float = 0.0
    noise: float = 0.0
    clip: bool = False

    def returns(self, rewards: Tensor) -> Tensor:
        return (rewards.sign() if self.clip else rewards).sum(-1)

    def label(self, first: Fragments, second: Fragments, generator: torch.Generator) -> Tensor:
        """Labels in [0, 1]: the probability mass on ``first`` being preferred, sampled."""
        difference = (self.returns(first.rewards) - self.returns(second.rewards)).cpu()
        if self.scale > 0:
            p = torch.sigmoid(difference / self.scale)
            y = (torch.rand(p.shape, generator=generator, dtype=p.dtype) < p).to(p.dtype)
        else:
            y = (difference > 0).double() + 0.5 * (difference == 0).double()
        if self.noise > 0:
            coin = (torch.rand(y.shape, generator=generator, dtype=y.dtype) < 0.5).to(y.dtype)
            flip = torch.rand(y.shape, generator=generator, dtype=y.dtype) < self.noise
            y = torch.where(flip, coin, y)
        return y.to(first.rewards.device)


class PreferenceQueue:
    """The last ``capacity`` labelled pairs (first in, first out), kept on the device."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.first: Fragments | None = None
        self.second: Fragments | None = None
        self.labels: Tensor | None = None
        self.true_better: Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.labels is None else self.labels.shape[0]

    def push(self, first: Fragments, second: Fragments, labels: Tensor, oracle: Oracle) -> None:
        better = (oracle.returns(first.rewards) > oracle.returns(second.rewards)).double() + \
            0.5 * (oracle.returns(first.rewards) == oracle.returns(second.rewards)).double()
        if self.labels is None:
            self.first, self.second, self.labels, self.true_better = first, second, labels, better
        else:
            self.first = concat(self.first, first)
            self.second = concat(self.second, second)
            self.labels = torch.cat([self.labels, labels])
            self.true_better = torch.cat([self.true_better, better])
        if len(self) > self.capacity:
            keep = slice(len(self) - self.capacity, None)
            self.first, self.second = _slice(self.first, keep), _slice(self.second, keep)
            self.labels, self.true_better = self.labels[keep], self.true_better[keep]

    def batch(self, index: Tensor) -> tuple[Fragments, Fragments, Tensor]:
        return _slice(self.first, index), _slice(self.second, index), self.labels[index]

    def tensors(self) -> dict[str, Tensor]:
        """Everything as plain tensors, for a checkpoint."""
        if self.labels is None:
            return {}
        out = {"labels": self.labels, "true_better": self.true_better}
        for name, frags in (("first", self.first), ("second", self.second)):
            out |= {f"{name}_obs": frags.obs, f"{name}_actions": frags.actions,
                    f"{name}_rewards": frags.rewards}
        return out

    def load_tensors(self, tensors: dict[str, Tensor], length: int,
                     obs_shape: tuple[int, ...]) -> None:
        """Restore ``tensors()`` (empty: no pairs); a ``ValueError`` if its pairs are not
        fragments of ``length`` steps of ``obs_shape`` observations, as this run's are."""
        if not tensors:
            self.first = self.second = self.labels = self.true_better = None
            return
        labels, better = tensors["labels"], tensors["true_better"]
        first, second = (
            Fragments(tensors[f"{n}_obs"], tensors[f"{n}_actions"], tensors[f"{n}_rewards"])
            for n in ("first", "second"))
        n = labels.shape[0] if labels.dim() == 1 else -1
        for frags in (first, second):
            if frags.obs.dim() < 2 or tuple(better.shape) != (n,) or \
                    frags.obs.shape[0] != n or tuple(frags.actions.shape[:1]) != (n,) or \
                    tuple(frags.rewards.shape) != tuple(frags.obs.shape[:2]):
                raise DamagedCheckpoint("its preference pairs' tensors disagree in size")
            if frags.obs.shape[1] != length:
                raise ValueError(f"its preference pairs are fragments of {frags.obs.shape[1]} "
                                 f"steps, this run's of {length} (`fragment`)")
            if tuple(frags.obs.shape[2:]) != tuple(obs_shape):
                raise ValueError(f"its fragments hold observations of shape "
                                 f"{tuple(frags.obs.shape[2:])}, this run's environment "
                                 f"{tuple(obs_shape)}")
        self.first, self.second, self.labels, self.true_better = first, second, labels, better


def concat(a: Fragments, b: Fragments) -> Fragments:
    """The fragments of ``a`` followed by those of ``b``."""
    return Fragments(torch.cat([a.obs, b.obs]), torch.cat([a.actions, b.actions]),
                     torch.cat([a.rewards, b.rewards]))


def _slice(a: Fragments, index: slice | Tensor) -> Fragments:
    return Fragments(a.obs[index], a.actions[index], a.rewards[index])


def fragment_returns(net: RewardNet, frags: Fragments) -> Tensor:
    """``sum_t r_theta(s_t, a_t)`` of each fragment, one batched forward pass."""
    return net(*frags.steps()).view(frags.rewards.shape).sum(-1)


def bradley_terry(first: Tensor, second: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of each pair's label (1: the first fragment preferred) under
    ``P(first) = sigmoid(R(first) - R(second))``, from the two predicted returns; not averaged."""
    logits = first - second
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")


def preference_accuracy(net: RewardNet, queue: PreferenceQueue) -> tuple[float, int]:
    """How often the model ranks a pair as the true reward does, over the pairs whose true
    returns differ, and how many those are. Ties are left out: counted as agreement, an
    untrained network scored 1.0 where every fragment ties (CartPole's +1 a step)."""
    if len(queue) == 0:
        return math.nan, 0
    decided = queue.true_better != 0.5
    count = int(decided.sum())
    if count == 0:
        return math.nan, 0
    with torch.no_grad():
        predicted = fragment_returns(net, queue.first) - fragment_returns(net, queue.second)
    agree = (predicted > 0).double() == queue.true_better
    return float(agree[decided].double().mean()), count
