"""A replay buffer preallocated as torch tensors on the learner's device.

Each transition keeps ``obs, action, next_obs, terminated`` and the environment's *true*
reward. Only ``terminated`` is stored: a time-limit truncation is not the end of the MDP, so
its transition bootstraps from ``next_obs`` like any other. The true reward serves evaluation
and the ``sac_true`` baseline; RLHF followers relabel sampled batches with the current reward
network instead (``Batch._replace(reward=...)``), which is why rewards are not baked in.

Storage dtypes: ``uint8`` image observations stay ``uint8``; float observations are stored as
float32; other observations keep their own dtype. Discrete actions are int64, continuous ones
float32 in the environment's units. Memory per transition is ``2 * obs bytes + action bytes +
5`` (float32 reward, bool flag), see ``transition_bytes``: about 56.5 KB for a ``(4, 84, 84)``
Atari frame stack (observations are stored twice, as ``obs`` and ``next_obs``, for
simplicity), so 100k Atari transitions take about 5.6 GB; 33 B for Pendulum, 165 B for
HalfCheetah.

Checkpoints are plain ``.npy`` files (read back with ``allow_pickle=False``) and a JSON file
with the counters, so loading a buffer never runs pickled code.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

FIELDS = ("obs", "action", "reward", "next_obs", "terminated")


class Batch(NamedTuple):
    """A minibatch of transitions; ``reward`` is whatever reward the learner should fit."""

    obs: Tensor
    action: Tensor
    reward: Tensor  # (B,) float32
    next_obs: Tensor
    terminated: Tensor  # (B,) float32, 1.0 where the episode ended in a terminal state


def storage_dtype(dtype: np.dtype) -> torch.dtype:
    """uint8 stays uint8 (images), floats become float32, other dtypes are kept."""
    if np.issubdtype(dtype, np.floating):
        return torch.float32
    return torch.from_numpy(np.zeros(0, dtype=dtype)).dtype


class ReplayBuffer:
    """A ring buffer of the last ``capacity`` transitions, filled in batches from vector envs."""

    def __init__(
        self,
        capacity: int,
        obs_shape: Sequence[int],
        obs_dtype: torch.dtype,
        action_shape: Sequence[int],
        action_dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.capacity = capacity
        self.device = torch.device(device)
        self.obs = torch.empty((capacity, *obs_shape), dtype=obs_dtype, device=self.device)
        self.next_obs = torch.empty_like(self.obs)
        self.action = torch.empty((capacity, *action_shape), dtype=action_dtype,
                                  device=self.device)
        self.reward = torch.empty(capacity, dtype=torch.float32, device=self.device)
        self.terminated = torch.empty(capacity, dtype=torch.bool, device=self.device)
        self.pos = 0  # the next row written
        self.size = 0  # rows holding transitions

    @classmethod
    def for_spaces(
        cls,
        capacity: int,
        observation_space: spaces.Box,
        action_space: spaces.Box | spaces.Discrete,
        device: torch.device | str = "cpu",
    ) -> ReplayBuffer:
        """A buffer for one (single, not vector) environment's spaces."""
        if isinstance(action_space, spaces.Discrete):
            action_shape: tuple[int, ...] = ()
            action_dtype = torch.int64
        else:
            action_shape, action_dtype = action_space.shape, torch.float32
        return cls(capacity, observation_space.shape, storage_dtype(observation_space.dtype),
                   action_shape, action_dtype, device)

    def __len__(self) -> int:
        return self.size

    @property
    def transition_bytes(self) -> int:
        """Memory one transition takes, to size ``capacity`` against the device's memory."""
        obs = math.prod(self.obs.shape[1:]) * self.obs.element_size()
        action = math.prod(self.action.shape[1:]) * self.action.element_size()
        return 2 * obs + action + self.reward.element_size() + self.terminated.element_size()

    def add(self, obs: Tensor, action: Tensor, reward: Tensor, next_obs: Tensor,
            terminated: Tensor) -> None:
        """Store one transition per environment (leading dimension ``N <= capacity``);
        the oldest transitions are overwritten once the buffer is full."""
        rows = (self.pos + torch.arange(obs.shape[0], device=self.device)) % self.capacity
        self.obs[rows] = obs
        self.action[rows] = action
        self.reward[rows] = reward
        self.next_obs[rows] = next_obs
        self.terminated[rows] = terminated
        self.pos = (self.pos + obs.shape[0]) % self.capacity
        self.size = min(self.size + obs.shape[0], self.capacity)

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        """``n`` transitions drawn uniformly with replacement; ``reward`` is the true reward."""
        rows = torch.randint(self.size, (n,), generator=generator, device=generator.device)
        rows = rows.to(self.device)
        return Batch(self.obs[rows], self.action[rows], self.reward[rows], self.next_obs[rows],
                     self.terminated[rows].float())

    def save(self, directory: str | Path) -> None:
        """Write the stored transitions as ``.npy`` files and the counters as JSON."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in FIELDS:
            np.save(directory / f"{name}.npy", getattr(self, name)[: self.size].cpu().numpy())
        counters = {"capacity": self.capacity, "pos": self.pos, "size": self.size}
        (directory / "counters.json").write_text(json.dumps(counters))

    def load(self, directory: str | Path) -> None:
        """Read back what ``save`` wrote into this (same-shaped, same-capacity) buffer."""
        directory = Path(directory)
        counters = json.loads((directory / "counters.json").read_text())
        if counters["capacity"] != self.capacity:
            raise ValueError(f"the saved buffer holds {counters['capacity']} transitions, "
                             f"this one {self.capacity}")
        size = counters["size"]
        for name in FIELDS:
            saved = torch.from_numpy(np.load(directory / f"{name}.npy", allow_pickle=False))
            target = getattr(self, name)
            if saved.shape != (size, *target.shape[1:]) or saved.dtype != target.dtype:
                raise ValueError(f"{name}.npy holds {saved.dtype} {tuple(saved.shape)}, "
                                 f"expected {target.dtype} {(size, *target.shape[1:])}")
            target[:size] = saved.to(self.device)
        self.pos, self.size = counters["pos"], size
