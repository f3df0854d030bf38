"""A replay buffer preallocated as torch tensors on the learner's device.

Each transition keeps ``obs, action, next_obs, terminated`` and the environment's *true*
reward. Only ``terminated`` is stored: a time-limit truncation is not the end of the MDP, so
its transition bootstraps from ``next_obs`` like any other. The true reward serves evaluation
and the ``sac_true`` baseline; RLHF followers relabel sampled batches with the current reward
network instead (``Batch._replace(reward=...)``), which is why rewards are not baked in.

Observations are stored once. The buffer is filled by a vector environment, ``N`` copies at a
time, so the transition after row ``i`` of the same copy is row ``i + N`` (mod capacity), and
within an episode its ``obs`` is row ``i``'s ``next_obs``. Only where that chain breaks (an
episode ended and the copy was reset, or the caller's rows do not follow each other) is
``next_obs`` kept apart, found at the next ``add`` by comparing it with the new ``obs``.

Storage dtypes: ``uint8`` image observations stay ``uint8``; float observations are stored as
float32; other observations keep their own dtype. Discrete actions are int64, continuous ones
float32 in the environment's units. Memory per transition is ``obs bytes + action bytes + 5``
(float32 reward, bool flag), see ``transition_bytes``, plus one observation per finished
episode: about 28 KB for a ``(4, 84, 84)`` Atari frame stack, so 100k Atari transitions take
about 2.8 GB (5.6 GB when ``next_obs`` was stored too); 21 B for Pendulum, 97 B for HalfCheetah.

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

FIELDS = ("obs", "action", "reward", "terminated")


class DamagedCheckpoint(Exception):
    """A checkpoint file that is missing, truncated or garbled, as opposed to a whole one that
    another run saved (a ``ValueError``): the two call for different remedies."""


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
        self.action = torch.empty((capacity, *action_shape), dtype=action_dtype,
                                  device=self.device)
        self.reward = torch.empty(capacity, dtype=torch.float32, device=self.device)
        self.terminated = torch.empty(capacity, dtype=torch.bool, device=self.device)
        self.pos = 0  # the next row written
        self.size = 0  # rows holding transitions
        self.copies = 0  # rows per add (the vector environment's copies); 0 before the first
        # next_obs of the last add's rows (their successors are not stored yet), and of the
        # rows whose successor row does not continue them
        self._pending = self.obs[:0].clone()
        self._pending_rows = torch.zeros(0, dtype=torch.long, device=self.device)
        self._apart: dict[int, Tensor] = {}
        self._mark: tuple | None = None  # the counters at ``mark()``
        self._overwritten: dict[int, tuple[Tensor, ...]] = {}  # rows' contents at the mark

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
        """Memory one transition takes, to size ``capacity`` against the device's memory
        (plus one observation per finished episode)."""
        obs = math.prod(self.obs.shape[1:]) * self.obs.element_size()
        action = math.prod(self.action.shape[1:]) * self.action.element_size()
        return obs + action + self.reward.element_size() + self.terminated.element_size()

    def add(self, obs: Tensor, action: Tensor, reward: Tensor, next_obs: Tensor,
            terminated: Tensor) -> None:
        """Store one transition per environment copy (the same number ``N <= capacity`` at
        every call, in the same order); the oldest transitions are overwritten once the buffer
        is full."""
        n = obs.shape[0]
        if self.copies == 0:
            if not 0 < n <= self.capacity:
                raise ValueError(f"cannot add {n} transitions to a buffer of {self.capacity}")
            self.copies = n
        elif n != self.copies:
            raise ValueError(f"this buffer is filled {self.copies} transitions at a time (one "
                             f"per environment copy), got {n}")
        # the last add's next observations that the new ones do not continue are kept apart
        obs = obs.to(self.device, self.obs.dtype)
        if self._pending.shape[0]:
            broken = (self._pending != obs).reshape(n, -1).any(1)
            for j in broken.nonzero().flatten().tolist():
                self._apart[int(self._pending_rows[j])] = self._pending[j].clone()
        rows = (self.pos + torch.arange(n, device=self.device)) % self.capacity
        for row in rows.tolist():
            self._apart.pop(row, None)
            if self._mark is not None and row < self._mark[1] and row not in self._overwritten:
                self._overwritten[row] = tuple(getattr(self, name)[row].clone()
                                               for name in FIELDS)
        self.obs[rows] = obs
        self.action[rows] = action
        self.reward[rows] = reward
        self.terminated[rows] = terminated
        self._pending = next_obs.to(self.device, self.obs.dtype).clone()
        self._pending_rows = rows
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def mark(self) -> None:
        """Remember the buffer as it is now, so that ``rollback`` can undo the adds after it
        (a run stopped halfway through an outer iteration saves the buffer of the last whole
        one). Until the next mark, each stored row that an add overwrites is copied first:
        at most one outer iteration's rows, and none while the buffer is not yet full."""
        self._mark = (self.pos, self.size, self.copies, self._pending, self._pending_rows,
                      dict(self._apart))
        self._overwritten = {}

    def rollback(self) -> None:
        """Return to the buffer as it was at the last ``mark``."""
        if self._mark is None:
            return
        for row, values in self._overwritten.items():
            for name, value in zip(FIELDS, values):
                getattr(self, name)[row] = value
        (self.pos, self.size, self.copies, self._pending, self._pending_rows,
         self._apart) = self._mark
        self.mark()

    def next_obs_of(self, rows: Tensor) -> Tensor:
        """``next_obs`` of the stored transitions in ``rows``."""
        out = self.obs[(rows + self.copies) % self.capacity]
        if self.copies:
            offset = (rows - self._pending_rows[0]) % self.capacity
            last = offset < self.copies
            out[last] = self._pending[offset[last]]
        if self._apart:
            for k, row in enumerate(rows.tolist()):
                kept = self._apart.get(row)
                if kept is not None:
                    out[k] = kept
        return out

    @property
    def next_obs(self) -> Tensor:
        """``next_obs`` of every stored row (rows ``0 .. size - 1``), materialised."""
        return self.next_obs_of(torch.arange(self.size, device=self.device))

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        """``n`` transitions drawn uniformly with replacement; ``reward`` is the true reward."""
        rows = torch.randint(self.size, (n,), generator=generator, device=generator.device)
        rows = rows.to(self.device)
        return Batch(self.obs[rows], self.action[rows], self.reward[rows],
                     self.next_obs_of(rows), self.terminated[rows].float())

    def save(self, directory: str | Path) -> None:
        """Write the stored transitions as ``.npy`` files and the counters as JSON."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in FIELDS:
            np.save(directory / f"{name}.npy", getattr(self, name)[: self.size].cpu().numpy())
        apart_rows = sorted(self._apart)
        np.save(directory / "pending_obs.npy", self._pending.cpu().numpy())
        np.save(directory / "apart_obs.npy", torch.stack(
            [self._apart[r] for r in apart_rows]).cpu().numpy() if apart_rows
            else self.obs[:0].cpu().numpy())
        counters = {"capacity": self.capacity, "pos": self.pos, "size": self.size,
                    "copies": self.copies, "pending_rows": self._pending_rows.tolist(),
                    "apart_rows": apart_rows}
        (directory / "counters.json").write_text(json.dumps(counters))

    def load(self, directory: str | Path) -> None:
        """Read back what ``save`` wrote into this (same-shaped, same-capacity) buffer: a
        ``ValueError`` if it was another buffer, ``DamagedCheckpoint`` if a file is missing,
        cut short or garbled."""
        directory = Path(directory)
        try:
            counters = json.loads((directory / "counters.json").read_text())
            size, pos, copies = (int(counters[k]) for k in ("size", "pos", "copies"))
            apart_rows = [int(r) for r in counters["apart_rows"]]
            pending_rows = [int(r) for r in counters["pending_rows"]]
            capacity = counters["capacity"]
        except KeyError as exc:
            if exc.args == ("copies",):
                raise ValueError("this checkpoint's replay buffer was written by an older "
                                 "version of brl (with next_obs stored); start the run "
                                 "afresh") from None
            raise DamagedCheckpoint(f"counters.json lacks {exc}") from None
        except FileNotFoundError:
            raise DamagedCheckpoint("counters.json is missing") from None
        except (OSError, ValueError, TypeError) as exc:
            raise DamagedCheckpoint(f"counters.json: {first_line(exc)}") from None
        if capacity != self.capacity:
            raise ValueError(f"the saved buffer holds {capacity} transitions, "
                             f"this one {self.capacity}")
        if not (0 <= size <= self.capacity and 0 <= pos < max(self.capacity, 1)
                and 0 <= copies <= self.capacity
                and all(0 <= r < self.capacity for r in apart_rows + pending_rows)):
            raise DamagedCheckpoint("counters.json holds counters out of range")
        expected = {name: (size, *getattr(self, name).shape[1:]) for name in FIELDS}
        expected["pending_obs"] = (len(pending_rows), *self.obs.shape[1:])
        expected["apart_obs"] = (len(apart_rows), *self.obs.shape[1:])
        loaded = {}
        for name, shape in expected.items():
            try:
                saved = torch.from_numpy(np.load(directory / f"{name}.npy", allow_pickle=False))
            except FileNotFoundError:
                raise DamagedCheckpoint(f"{name}.npy is missing") from None
            except (OSError, ValueError, EOFError) as exc:
                raise DamagedCheckpoint(f"{name}.npy: {first_line(exc)}") from None
            dtype = (self.obs if name.endswith("_obs") else getattr(self, name)).dtype
            if saved.shape[1:] != shape[1:] or saved.dtype != dtype:
                raise ValueError(f"{name}.npy holds {saved.dtype} {tuple(saved.shape)}, "
                                 f"expected {dtype} {shape}")
            if saved.shape[0] != shape[0]:
                raise DamagedCheckpoint(f"{name}.npy holds {saved.shape[0]} rows, "
                                        f"counters.json says {shape[0]}")
            loaded[name] = saved.to(self.device)
        for name in FIELDS:
            getattr(self, name)[:size] = loaded[name]
        self.pos, self.size, self.copies = pos, size, copies
        self._pending = loaded["pending_obs"]
        self._pending_rows = torch.tensor(pending_rows, dtype=torch.long, device=self.device)
        self._apart = dict(zip(apart_rows, loaded["apart_obs"]))
        self._mark, self._overwritten = None, {}


def first_line(exc: BaseException) -> str:
    """An exception's first line, or its kind when it has no message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
