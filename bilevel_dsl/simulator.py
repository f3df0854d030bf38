"""Simulators: what model-free solvers use instead of the transition matrix.

A simulator is a batched generative model of an MDP. ``reset(n, generator)`` draws ``n`` initial
states; ``step(states, actions, generator)`` draws one successor for every ``(s, a)`` of the batch,
from *any* state-action pair (a generative model, not only the one an episode is in), and says
which of them ended the episode. Transitions are sub-stochastic: the probability mass missing
from a row of ``P`` is the chance that the episode ends there (it flowed into a terminal state).

``TabularSimulator`` samples from a ``Transitions`` object by inverse-CDF sampling, vectorised
over the whole batch: the nonzeros of ``P`` are laid out row by row (CSR order, for dense and
sparse storage alike), their running sum is taken once, and each draw is one ``searchsorted`` in
that global running sum, restricted to its row's segment. No Python loop touches states, so
thousands of rollouts advance in a handful of kernels on the CPU or a GPU.

Randomness always comes from a ``torch.Generator`` passed in by the caller (on the simulator's
device), so the same seed gives the same samples.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .softmdp import Transitions

# TabularSimulator samples rows with at most this many successors from a padded table of
# running sums, and longer rows by a binary search in the global running sum.
PADDED_MAX_WIDTH = 32


@runtime_checkable
class Simulator(Protocol):
    """A batched generative model of an MDP with ``n_states`` states and ``n_actions`` actions."""

    n_states: int
    n_actions: int

    def reset(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` initial states (int64, shape ``(n,)``), drawn from the initial distribution."""
        ...

    def step(self, states: Tensor, actions: Tensor, generator: torch.Generator
             ) -> tuple[Tensor, Tensor]:
        """Successors of each ``(states[i], actions[i])`` and a bool mask of episodes that ended.

        Where ``done[i]`` is true, ``next_states[i]`` is meaningless (it repeats ``states[i]``).
        """
        ...


def uniform(n: int, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> Tensor:
    """``n`` draws from U[0, 1) on the generator's device."""
    return torch.rand(n, generator=generator, device=generator.device, dtype=dtype)


def sample_actions(policy: Tensor, states: Tensor, generator: torch.Generator) -> Tensor:
    """One action per state from ``policy[s, :]`` (an ``(S, A)`` table), by inverse CDF."""
    cumulative = torch.index_select(policy.detach().cumsum(-1), 0, states)  # (n, A)
    u = uniform(states.numel(), generator, cumulative.dtype) * cumulative[:, -1]
    actions = (cumulative <= u.unsqueeze(-1)).sum(-1)
    return actions.clamp_(max=policy.shape[-1] - 1)


class TabularSimulator:
    """Samples a tabular MDP (``Transitions`` plus an initial distribution), fully batched.

    ``done`` is reported where the draw falls into the row's missing mass (``1 - sum_t P``).
    """

    def __init__(self, transitions: Transitions, initial: Tensor) -> None:
        self.n_states = transitions.n_states
        self.n_actions = transitions.n_actions
        self.device = transitions.device
        rows, cols, values = transitions.coo()  # row-major (CSR) order for both storages
        order = torch.argsort(rows, stable=True)  # a no-op for CSR; cheap insurance otherwise
        rows, cols = rows[order], cols[order]
        values = values[order].to(torch.float64)
        n_rows = self.n_states * self.n_actions
        counts = torch.bincount(rows, minlength=n_rows)
        self._start = torch.zeros(n_rows, dtype=torch.int64, device=self.device)
        self._start[1:] = counts.cumsum(0)[:-1]
        self._end = self._start + counts  # one past the row's last nonzero
        running = values.cumsum(0)
        self._running = running  # global running sum of the nonzeros
        before = torch.cat([running.new_zeros(1), running])  # sum of all nonzeros before index
        self._base = before[self._start]  # (S*A,) running sum where each row starts
        self._mass = before[self._end] - self._base  # (S*A,) row sums (< 1 into terminals)
        self._cols = cols
        # (hot paths use take / index_select: advanced indexing opens a parallel region for a
        # few thousand elements, which costs milliseconds per call on a busy machine)
        # one gather per step: (base, mass, first index, last index) of every row
        last = (self._end - 1).clamp(min=0)
        self._rows = torch.stack([self._base, self._mass, self._start.to(torch.float64),
                                  last.to(torch.float64)], -1)
        # Rows with few successors (grid worlds, most sparse MDPs): a padded (S*A, K) table of
        # each row's running sums, so a draw is a gather and a comparison count. Small batches
        # then avoid searchsorted, which opens a parallel region at a few hundred elements and
        # can cost milliseconds per call on a busy machine.
        width = int(counts.max()) if counts.numel() else 0
        self._width = width if 0 < width <= PADDED_MAX_WIDTH else 0
        if self._width:
            position = torch.arange(rows.numel(), device=self.device) - self._start[rows]
            cdf = torch.full((n_rows, width), torch.inf, dtype=torch.float64, device=self.device)
            cdf[rows, position] = running - self._base[rows]
            succ = torch.zeros(n_rows, width, dtype=torch.int64, device=self.device)
            succ[rows, position] = cols
            self._cdf, self._succ = cdf, succ.view(-1)
            self._last = (counts - 1).clamp(min=0)
            # the mass as the table holds it, so `done` and the draw agree to the last bit
            self._pmass = torch.where(counts > 0, cdf.gather(1, self._last.unsqueeze(-1))
                                      .squeeze(-1), 0.0)
        rho = initial.detach().to(device=self.device, dtype=torch.float64)
        self._initial_cdf = rho.cumsum(0)

    def reset(self, n: int, generator: torch.Generator) -> Tensor:
        u = uniform(n, generator) * self._initial_cdf[-1]
        states = torch.searchsorted(self._initial_cdf, u, right=True)
        return states.clamp_(max=self.n_states - 1)

    def step(self, states: Tensor, actions: Tensor, generator: torch.Generator
             ) -> tuple[Tensor, Tensor]:
        row = states * self.n_actions + actions
        u = uniform(states.numel(), generator)
        if self._width:
            cdf = torch.index_select(self._cdf, 0, row)  # (n, K), +inf past the successors
            done = u >= self._pmass.take(row)
            index = torch.minimum((cdf <= u.unsqueeze(-1)).sum(-1), self._last.take(row))
            next_states = torch.where(done, states, self._succ.take(row * self._width + index))
            return next_states, done
        info = torch.index_select(self._rows, 0, row)  # (n, 4)
        done = u >= info[:, 1]
        index = torch.searchsorted(self._running, info[:, 0] + u, right=True)
        # rounding in the running sum may put a draw just outside its row's segment
        index = torch.clamp(index, min=info[:, 2].long(), max=info[:, 3].long())
        next_states = torch.where(done, states, self._cols.take(index))
        return next_states, done


def rollout(
    simulator: Simulator,
    policy: Tensor,
    states: Tensor,
    actions: Tensor | None,
    horizon: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor]:
    """Roll ``horizon`` steps from each start; the first action is given or drawn from ``policy``.

    Returns ``(states, actions, alive)``, each ``(horizon, n)``; ``alive[t]`` is false once the
    episode has ended before step ``t`` (those entries hold meaningless indices). Every step
    draws the same number of random numbers whatever ends, so runs are reproducible.
    """
    n = states.numel()
    all_states = torch.empty(horizon, n, dtype=torch.int64, device=states.device)
    all_actions = torch.empty_like(all_states)
    alive = torch.empty(horizon, n, dtype=torch.bool, device=states.device)
    live = torch.ones(n, dtype=torch.bool, device=states.device)
    s = states
    a = sample_actions(policy, s, generator) if actions is None else actions
    for t in range(horizon):
        all_states[t], all_actions[t], alive[t] = s, a, live
        if t + 1 == horizon:
            break
        s, done = simulator.step(s, a, generator)
        live = live & ~done
        a = sample_actions(policy, s, generator)
    return all_states, all_actions, alive
