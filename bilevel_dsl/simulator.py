"""Simulators: what model-free solvers use instead of the transition matrix.

A simulator is a batched generative model of an MDP. ``reset(n, generator)`` draws ``n`` initial
states; ``step(states, actions, generator)`` draws one successor for every ``(s, a)`` of the batch,
from *any* state-action pair (a generative model, not only the one an episode is in), and says
which of them ended the episode. Transitions are sub-stochastic: the probability mass missing
from a row of ``P`` is the chance that the episode ends there (it flowed into a terminal state).

``TabularSimulator`` samples each row of ``P`` (its successors, plus "the episode ends") with
Walker's alias method: one uniform draw picks one of the row's ``W`` columns and is compared
with that column's threshold, so a draw costs two gathers whatever the row's length. Rows are
laid out in a padded ``(S*A, W)`` table built once; where a row has more outcomes than
``ALIAS_MAX_WIDTH`` (a dense ``P``), a draw is a binary search in the global running sum of
``P``'s nonzeros (CSR order), restricted to its row's segment. Either way every kernel works on
vectors of the batch's length, never on ``batch x W`` blocks, and uses ``index_select`` rather
than ``take`` or advanced indexing: those open a parallel region for a few thousand elements,
which costs milliseconds per call when the other core is busy. No Python loop touches states,
so thousands of rollouts advance in a handful of kernels on the CPU or a GPU.

Randomness always comes from a ``torch.Generator`` passed in by the caller (on the simulator's
device), so the same seed gives the same samples. Actions are drawn from policies by inverse
CDF, so that the same uniforms give the same actions under two nearby policies (common random
numbers, which stoc_sobirl relies on).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .softmdp import Transitions

# TabularSimulator samples rows with at most this many outcomes (successors, plus "the episode
# ends") from alias tables, and longer rows by a binary search in the global running sum.
ALIAS_MAX_WIDTH = 32
# rollout advances at most this many trajectories at a time on the CPU (see there)
ROLLOUT_CHUNK = 4096


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
    return _draw_actions(policy.detach().cumsum(-1), states, generator)


def _draw_actions(cumulative: Tensor, states: Tensor, generator: torch.Generator) -> Tensor:
    """``sample_actions`` from the policy's row-wise running sums (computed once per rollout)."""
    rows = torch.index_select(cumulative, 0, states)  # (n, A)
    u = uniform(states.numel(), generator, rows.dtype) * rows[:, -1]
    actions = (rows <= u.unsqueeze(-1)).sum(-1)
    return actions.clamp_(max=cumulative.shape[-1] - 1)


def alias_tables(probabilities: Tensor, outcomes: Tensor) -> tuple[Tensor, Tensor]:
    """Walker's alias tables for every row of ``probabilities`` ``(R, W)`` (rows sum to 1).

    Returns ``threshold`` ``(R, W)`` and ``pick`` ``(R, W, 2)``: a draw ``u ~ U[0, 1)`` from row
    ``r`` takes column ``j = floor(u W)`` and yields ``pick[r, j, 0]`` if ``u W - j <
    threshold[r, j]``, else ``pick[r, j, 1]`` (``outcomes[r, j]`` and its alias). Vose's
    construction, vectorised over rows: ``W - 1`` rounds, each closing the column with the least
    remaining mass (``<= 1`` of the ``W`` equal shares) and topping it up from the one with the
    most (``>= 1``), so an outcome of probability zero is never yielded.
    """
    R, W = probabilities.shape
    scaled = probabilities * W
    threshold = torch.ones_like(scaled)
    alias = outcomes.clone()
    open_ = torch.ones(R, W, dtype=torch.bool, device=scaled.device)
    rows = torch.arange(R, device=scaled.device)
    for _ in range(W - 1):
        small = torch.where(open_, scaled, torch.inf).argmin(-1)
        large = torch.where(open_, scaled, -torch.inf).argmax(-1)
        mass = scaled[rows, small]
        threshold[rows, small] = mass
        alias[rows, small] = outcomes[rows, large]
        scaled[rows, large] -= 1.0 - mass
        open_[rows, small] = False
    return threshold, torch.stack([outcomes, alias], -1)


class TabularSimulator:
    """Samples a tabular MDP (``Transitions`` plus an initial distribution), fully batched.

    ``done`` is reported where the draw falls into the row's missing mass (``1 - sum_t P``).
    ``transitions_drawn`` counts the draws ``step`` has made (the sample cost solvers report),
    including those of episodes that already ended (the batch is stepped as a whole).
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
        start = torch.zeros(n_rows, dtype=torch.int64, device=self.device)
        start[1:] = counts.cumsum(0)[:-1]
        mass = torch.zeros(n_rows, dtype=torch.float64, device=self.device)
        mass.index_add_(0, rows, values)
        missing = (1.0 - mass).clamp(min=0.0)  # the chance that the episode ends
        ends = bool((missing > 0).any())
        self._width = (int(counts.max()) if counts.numel() else 0) + int(ends)
        if self._width <= ALIAS_MAX_WIDTH:
            # outcome -1: the episode ends (also the padding, which has probability zero)
            position = torch.arange(rows.numel(), device=self.device) - start[rows]
            prob = torch.zeros(n_rows, self._width, dtype=torch.float64, device=self.device)
            outcome = torch.full((n_rows, self._width), -1, dtype=torch.int64,
                                 device=self.device)
            prob[rows, position] = values
            outcome[rows, position] = cols
            if ends:
                prob[:, -1] = missing
            threshold, pick = alias_tables(prob / prob.sum(-1, keepdim=True), outcome)
            self._threshold = threshold.view(-1)
            small = self.n_states < 2**31 - 1
            self._pick = pick.view(-1).to(torch.int32 if small else torch.int64)
        else:
            # (base, mass, first index, last index) of every row: one gather per step
            running = values.cumsum(0)
            before = torch.cat([running.new_zeros(1), running])  # sum of nonzeros before index
            base = before[start]
            self._running, self._cols = running, cols
            self._rows = torch.stack([base, before[start + counts] - base,
                                      start.to(torch.float64),
                                      (start + counts - 1).clamp(min=0).to(torch.float64)], -1)
        rho = initial.detach().to(device=self.device, dtype=torch.float64)
        self._initial_cdf = rho.cumsum(0)
        self.transitions_drawn = 0

    def reset(self, n: int, generator: torch.Generator) -> Tensor:
        u = uniform(n, generator) * self._initial_cdf[-1]
        states = torch.searchsorted(self._initial_cdf, u, right=True)
        return states.clamp_(max=self.n_states - 1)

    def step(self, states: Tensor, actions: Tensor, generator: torch.Generator
             ) -> tuple[Tensor, Tensor]:
        row = states * self.n_actions + actions
        u = uniform(states.numel(), generator)
        self.transitions_drawn += states.numel()
        W = self._width
        if W <= ALIAS_MAX_WIDTH:
            u = u * W
            column = u.long().clamp_(max=W - 1)
            cell = row * W + column
            alias = (u - column) >= torch.index_select(self._threshold, 0, cell)
            outcome = torch.index_select(self._pick, 0, 2 * cell + alias)
            done = outcome < 0
            return torch.where(done, states, outcome), done
        info = torch.index_select(self._rows, 0, row)  # (n, 4)
        done = u >= info[:, 1]
        index = torch.searchsorted(self._running, info[:, 0] + u, right=True)
        # rounding in the running sum may put a draw just outside its row's segment
        index = torch.clamp(index, min=info[:, 2].long(), max=info[:, 3].long())
        next_states = torch.where(done, states, torch.index_select(self._cols, 0, index))
        return next_states, done


def _walk(simulator: Simulator, policy: Tensor, states: Tensor, actions: Tensor | None,
          horizon: int, generator: torch.Generator
          ) -> Iterator[tuple[slice, int, Tensor, Tensor, Tensor]]:
    """``(part, t, s, a, live)`` for each step ``t < horizon`` of each chunk of rollouts, in
    the order of their random draws (what makes ``rollout`` and ``discounted_returns`` draw
    the same trajectories).

    On the CPU the batch advances ``ROLLOUT_CHUNK`` trajectories at a time: every kernel then
    stays below torch's parallel threshold and runs on the calling thread. Sampling is a few
    gathers per transition, too little work for a parallel region to pay off, and a region
    waits for a descheduled thread whenever another process holds a core.
    """
    n = states.numel()
    cumulative = policy.detach().cumsum(-1)
    chunk = ROLLOUT_CHUNK if states.device.type == "cpu" else max(n, 1)
    for lo in range(0, n, chunk):
        part = slice(lo, min(n, lo + chunk))
        s = states[part]
        a = _draw_actions(cumulative, s, generator) if actions is None else actions[part]
        live = torch.ones(s.numel(), dtype=torch.bool, device=s.device)
        for t in range(horizon):
            yield part, t, s, a, live
            if t + 1 == horizon:
                break
            s, done = simulator.step(s, a, generator)
            live = live & ~done
            a = _draw_actions(cumulative, s, generator)


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
    for part, t, s, a, live in _walk(simulator, policy, states, actions, horizon, generator):
        all_states[t, part], all_actions[t, part], alive[t, part] = s, a, live
    return all_states, all_actions, alive


def discounted_returns(
    simulator: Simulator,
    policy: Tensor,
    states: Tensor,
    actions: Tensor,
    horizon: int,
    values: Tensor,
    gamma: float,
    generator: torch.Generator,
) -> Tensor:
    """``sum_{t=1}^{horizon-1} gamma^t values[s_t]`` along each rollout while it lasts, from
    the same draws as ``rollout``: for Monte-Carlo ``Q`` estimates of every pair, where keeping
    the ``(horizon, n)`` trajectories took gigabytes (7 GiB at 10^5 states and 8 rollouts)."""
    total = torch.zeros(states.numel(), dtype=values.dtype, device=values.device)
    for part, t, s, _, live in _walk(simulator, policy, states, actions, horizon, generator):
        if t > 0:
            total[part] += (gamma**t) * torch.index_select(values, 0, s) * live
    return total
