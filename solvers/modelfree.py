"""The model-free hyper-gradient estimator (MATH.md, Section 5, eqs. 12-13), shared by the
model-free solvers (sobirl, stoc_sobirl, drlhf).

For the minimised objective ``phi(x) = sum_k c_k E[l_k(xi; x)] + policy_free(x)``::

    grad phi ~ E[grad_x l(xi; x)]                                          (12)
             + E[l(xi; x) sum_{t<H} grad_x log pi*_x(a_t|s_t)]             (13)
    grad_x log pi(a|s) = (dQ(s,a)/dx - dV(s)/dx) / tau
    dQ(s,a)/dx = E[sum_t gamma^t grad_x r_x(s_t,a_t) | s_0 = s, a_0 = a, a_t ~ pi]  (lower MDP)

Everything is sampled through ``Simulator`` objects (never ``P``): trajectories of the upper
MDP, and rollouts of length ``H'`` from chosen ``(s, a)`` in the lower MDP (a generative model).

Reward gradients along trajectories are never formed one by one. ``grad_x sum_t w_t r_x(s_t,a_t)
= J_r^T N`` with ``N[s,a] = sum_t w_t 1{(s_t,a_t) = (s,a)}``, and the estimate is linear in
these tables, so every rollout is folded, with the scalar that multiplies it (its trajectory's
loss, a sign, ``1/m``, ``gamma^t``), into one ``(S, A)`` table per reward function: one
vector-Jacobian product for (13) through the follower's reward, and one per trajectory term
for (12) through the term's reward (return reward or reward model).

Two ways to place the rollouts (option ``share``):

- ``visit`` (the paper): for every visited ``(s_t, a_t)``, ``m`` rollouts from ``(s_t, a_t)``
  for ``dQ`` and ``m`` with ``a_0 ~ pi`` for ``dV``. The ``B`` trajectory tuples then contribute
  i.i.d. terms, so the variance falls like ``1/B``.
- ``pair`` (default): the visit weights are summed per distinct pair first, ``dV(s) = sum_a
  pi(a|s) dQ(s,a)`` is taken in expectation, and ``m`` rollouts start from each pair with a
  nonzero net weight ``W[s,a] - pi(a|s) sum_b W[s,b]``. Still unbiased (the rollouts are
  independent of the trajectories), and at most ``S*A*m`` rollouts however long the batch.

With ``baseline`` (default) each trajectory's loss in (13) is centred by the mean loss of the
others in the batch: ``E[sum_t grad log pi(a_t|s_t)] = 0`` and the leave-one-out mean is
independent of the trajectory it centres, so this stays unbiased. Without it, a loss that is
nearly constant (``log 2`` for preference pairs at the start) multiplies a zero-mean score of
large variance: pure noise in ``x``.

The only bias is the truncation of ``dQ`` at ``H'`` steps, of order ``gamma^H'``
(``rollout_horizon = 0`` picks ``H'`` with ``gamma^H' <= 1e-4``).

Preference data (option ``queue``, default 3,000 pairs). RLHF fits its reward model to every
pair labelled so far, not only to the pairs of the current policy; so do these solvers. The
minimised loss is then the mean BCE over the dataset ``D`` (the last ``queue`` pairs), in which
only the ``B`` fresh pairs were drawn from the current ``pi_x``: its gradient is (12) over all of
``D`` plus (13) over the fresh pairs with weight ``B / |D|``, which is what ``estimate`` returns
when given the data. With ``queue = 0`` the loss is the expectation over the current policy's
pairs alone, as MATH.md writes it; descending that one drives the follower, at low temperature,
towards nearly deterministic policies whose pairs are identical (loss ``log 2``, zero gradient:
a stationary point, often one that never reaches the goal).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from bilevel_dsl.evaluate import MAX_SAMPLED_STEPS
from bilevel_dsl.instance import TabularProblem
from bilevel_dsl.simulator import (
    TabularSimulator,
    discounted_returns,
    rollout,
    sample_actions,
    uniform,
)
from bilevel_dsl.softmdp import soft_bellman_update, soft_policy

from .hypergrad import VERIFY_TOL, exact_record, hypergradient, reward_vjp
from .registry import Option, SolverError
from .result import NOT_FINITE, Monitor, SolveResult, stop_reason, unfinished

# Preferences keeps pairs as dense visit-count rows while S*A <= this * 2H.
DENSE_PREFERENCES = 4

# Options every model-free solver shares, appended to each SPEC's own.
ESTIMATOR_OPTIONS = (
    Option("batch", int, 0, "trajectories (pairs, for preference_loss) per estimate; 0: the "
           "term's own `pairs` for preference_loss, 64 for expected_return", valid="[0, inf)"),
    Option("rollouts", int, 4, "rollouts m per start pair for dQ/dx in the score term (13); "
           "the sampled follower's Q estimates take `q_rollouts`", valid="[1, inf)"),
    Option("rollout_horizon", int, 0, "rollout length H' (truncation bias ~ gamma^H'); 0: the "
           "smallest H' with gamma^H' <= 1e-4", valid="[0, inf)"),
    Option("baseline", bool, True, "subtract from each trajectory's loss, in the score term "
           "(13), the mean loss of the other trajectories of the batch (leave-one-out: "
           "still unbiased, as E[sum_t grad log pi(a_t|s_t)] = 0; far less variance)"),
    Option("queue", int, 3000, "preference pairs kept (the last `queue` queried): term (12) "
           "fits all of them, as RLHF fits a reward model to its whole dataset; 0: only "
           "the current batch", valid="[0, inf)"),
    Option("share", str, "pair", "rollouts per distinct visited pair, shared by its visits "
           "(pair), or per visit as in the paper (visit)", choices=("pair", "visit")),
)

# Options of the outer loop and of the follower's solver, shared by sobirl, stoc_sobirl, drlhf.
LOOP_OPTIONS = (
    Option("inner", int, 3, "lower-level iterations per outer iteration (warm-started)",
           valid="[1, inf)"),
    Option("warm_start", int, 20, "extra lower-level iterations before the first outer one",
           valid="[0, inf)"),
    Option("follower", str, "sampled", "follower's solver: sampled (policy mirror descent / soft "
           "policy iteration on Monte-Carlo soft Q estimates from the simulator) or exact "
           "(soft Bellman steps with the model, the deterministic setting; `lower` is a keyword "
           "of the language, hence the name)",
           choices=("sampled", "exact")),
    Option("q_rollouts", int, 8, "rollouts per pair for the sampled lower level's Q estimates",
           valid="[1, inf)"),
    Option("pmd_rate", float, 0.5, "policy mirror descent rate of the sampled lower level: "
           "log pi <- (1 - rate) log pi + rate Q / tau, normalised (1: soft policy iteration)",
           valid="(0, 1]"),
    Option("query_budget", int, 0, "stop once this many preference pairs have been labelled "
           "(0: off)", valid="[0, inf)"),
    Option("time_limit", float, 0.0, "stop after this many seconds (0: off)", valid="[0, inf)"),
    Option("log_every", int, 1, "record the history every this many iterations",
           valid="[1, inf)"),
    Option("verify", str, "exact", "after the run, phi and its gradient at x0 and at the final "
           "x with the follower solved exactly (the model is known for tabular problems; not "
           "for a preference loss), which the summary compares; off: skip",
           choices=("exact", "off")),
)


def rollout_horizon(gamma: float, given: int, tol: float = 1e-4) -> int:
    """``given``, or the smallest ``H'`` with ``gamma^H' <= tol`` (at least 1)."""
    if given > 0:
        return given
    if gamma <= 0.0:
        return 1
    if gamma >= 1.0:
        return 1000
    return max(1, math.ceil(math.log(tol) / math.log(gamma)))


class Streams:
    """Two seeded generators: one for trajectories and labels, one for lower-level rollouts, so
    that the number of rollouts an estimate draws does not shift its trajectories."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.trajectories = torch.Generator(device=device).manual_seed(seed)
        self.rollouts = torch.Generator(device=device).manual_seed(seed + 0x9E3779B9)


@dataclass
class Environment:
    """Simulators for a problem (the lower MDP and each trajectory term's upper MDP), and the
    number of preference queries made so far (labelled pairs)."""

    lower: TabularSimulator
    upper: list[TabularSimulator] = field(default_factory=list)
    queries: int = 0

    @property
    def transitions(self) -> int:
        """Transitions drawn from all simulators so far."""
        return sum(sim.transitions_drawn for sim in (self.lower, *self.upper))

    @classmethod
    def of(cls, problem: TabularProblem, options: dict[str, Any] | None = None) -> Environment:
        """The simulators; with a solver's ``options``, once the sizes of its estimates are
        known to fit in memory."""
        terms = problem.trajectory_terms or ()
        for term in terms if options is not None else ():
            trajectories = options["batch"] or (
                2 * term.pairs if term.kind == "preference_loss" else 64)
            if options["batch"] and term.kind == "preference_loss":
                trajectories *= 2
            if trajectories * term.horizon > MAX_SAMPLED_STEPS:
                raise SolverError(
                    f"batch = {options['batch']:,} with a horizon of {term.horizon:,} is "
                    f"{trajectories * term.horizon:,} sampled steps an estimate, more than "
                    f"{MAX_SAMPLED_STEPS:,} (each estimate holds all its trajectories at once); "
                    "use a smaller --set batch")
        return cls(TabularSimulator(problem.transitions, problem.initial),
                   [TabularSimulator(t.transitions, t.initial) for t in terms])


@dataclass
class Estimate:
    """One sample of the hyper-gradient and of the minimised objective."""

    grad: Tensor
    objective: float  # sum_k c_k mean(l_k) + policy_free(x)
    losses: list[float]  # mean l per trajectory term


class Preferences:
    """A preference term's dataset: the last ``capacity`` labelled pairs, as in RLHF practice.

    The loss needs of a pair only its label and ``D``, the first trajectory's visit counts
    minus the second's: the model's score difference is ``d = <model, D>`` whatever the reward
    model. ``D`` is kept as a dense ``(capacity, S*A)`` matrix where ``S*A`` is small (a fit is
    then two matrix-vector products), else as the ``2H`` visited indices with signs (+1 along
    the first trajectory, -1 along the second, 0 past an episode's end): ``O(capacity * H)``
    memory whatever the MDP's size.
    """

    def __init__(self, capacity: int, n_pairs: int, width: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.capacity, self.n_pairs = capacity, n_pairs
        self.dense = n_pairs <= DENSE_PREFERENCES * width
        if self.dense:
            self.counts = torch.zeros(capacity, n_pairs, dtype=dtype, device=device)
        else:
            self.index = torch.zeros(capacity, width, dtype=torch.int64, device=device)
            self.sign = torch.zeros(capacity, width, dtype=dtype, device=device)
        self.label = torch.zeros(capacity, dtype=dtype, device=device)
        self.size = 0
        self._head = 0

    def add(self, index: Tensor, sign: Tensor, label: Tensor) -> None:
        """Append pairs ``(n, 2H)``, ``(n, 2H)``, ``(n,)``; the oldest fall out when full."""
        n = min(label.numel(), self.capacity)
        index, sign, label = index[-n:], sign[-n:], label[-n:]
        positions = (self._head + torch.arange(n, device=index.device)) % self.capacity
        if self.dense:
            counts = torch.zeros(n, self.n_pairs, dtype=sign.dtype, device=sign.device)
            self.counts[positions] = counts.scatter_add_(1, index, sign)
        else:
            self.index[positions] = index
            self.sign[positions] = sign
        self.label[positions] = label
        self._head = (self._head + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def fit_table(self, flat: Tensor, weight: float) -> Tensor:
        """The flat table ``T`` with ``J_model^T T = weight * grad mean BCE`` over the data."""
        label = self.label[: self.size]
        if self.dense:
            counts = self.counts[: self.size]
            slope = (torch.sigmoid(counts @ flat) - label) * (weight / self.size)
            return slope @ counts
        index, sign = self.index[: self.size].view(-1), self.sign[: self.size]
        # index_select / index_add_: far cheaper than advanced indexing at this size
        d = (torch.index_select(flat, 0, index).view_as(sign) * sign).sum(-1)
        slope = (torch.sigmoid(d) - label) * (weight / self.size)
        return _table(index, sign * slope.unsqueeze(-1), flat.numel())


def preference_data(problem: TabularProblem, options: dict) -> list[Preferences | None] | None:
    """An empty dataset per preference term when ``queue`` is on, else None."""
    capacity = options["queue"]
    terms = problem.trajectory_terms or ()
    if capacity <= 0 or not any(t.kind == "preference_loss" for t in terms):
        return None
    dtype, device = problem.x0.dtype, problem.x0.device
    n_pairs = problem.n_states * problem.n_actions
    return [Preferences(capacity, n_pairs, 2 * t.horizon, dtype, device)
            if t.kind == "preference_loss" else None for t in terms]


def _gather(flat: Tensor, index: Tensor) -> Tensor:
    """``flat[index]`` by ``index_select``: advanced indexing opens a parallel region for a few
    thousand elements, which costs milliseconds whenever another process holds a core."""
    return torch.index_select(flat, 0, index.reshape(-1)).view(index.shape)


def _table(index: Tensor, weights: Tensor, n: int) -> Tensor:
    """``N[i] = sum_j weights[j] 1{index[j] = i}`` (a flat table of length ``n``)."""
    out = torch.zeros(n, dtype=weights.dtype, device=weights.device)
    return out.index_add_(0, index.reshape(-1), weights.reshape(-1))


def _log(pi: Tensor) -> Tensor:
    return torch.log(pi.clamp_min(torch.finfo(pi.dtype).tiny))


def _path_ratios(log_ratio: Tensor, index: Tensor, alive: Tensor, given: Tensor | None = None
                 ) -> Tensor:
    """``rho_t = prod_{u <= t} pi'(a_u|s_u) / pi(a_u|s_u)`` along paths ``(H, n)`` drawn under
    ``pi`` (``log_ratio``: ``log pi' - log pi``, flat): the importance weight of a path's first
    ``t + 1`` steps, which is all a reward at step ``t`` depends on (per-decision weights).
    ``given[j]``: path ``j``'s first action was chosen, not drawn (a rollout from ``(s, a)``)."""
    steps = _gather(log_ratio, index) * alive
    if given is not None:
        steps[0] = torch.where(given, 0.0, steps[0])
    return torch.exp(torch.cumsum(steps, 0))


def reward_flows(simulator: TabularSimulator, pis: Sequence[Tensor], log_ratios: Sequence[Tensor],
                 states: Tensor, actions: Tensor, given: Tensor, weights: Sequence[Tensor],
                 horizon: int, gamma: float, generator: torch.Generator) -> list[Tensor]:
    """Per policy ``pis[j]``: ``sum_i weights[j][i] sum_{t<H'} gamma^t rho_t 1{(s_t,a_t)}`` over
    one set of rollouts drawn under ``pis[0]`` from each start (``rho``: ``_path_ratios``).

    ``J_r^T`` of entry ``j`` is ``sum_i weights[j][i] * (a one-rollout estimate, under
    ``pis[j]``, of dQ(s_i,a_i)/dx)``; of ``dV(s_i)/dx`` where the first action was drawn
    (``given[i]`` false).
    """
    S, A = pis[0].shape
    if states.numel() == 0:
        return [torch.zeros(S, A, dtype=pi.dtype, device=pi.device) for pi in pis]
    st, ac, alive = rollout(simulator, pis[0], states, actions, horizon, generator)
    index = st * A + ac
    discount = gamma ** torch.arange(horizon, dtype=pis[0].dtype, device=pis[0].device)
    base = discount.unsqueeze(-1) * alive
    return [_table(index, base * w.unsqueeze(0) * _path_ratios(r, index, alive, given), S * A)
            .view(S, A) for w, r in zip(weights, log_ratios)]


@dataclass
class _Visits:
    """Per-visit weights of the score term (13): ``sum over visits of weight * grad log pi``."""

    states: list[Tensor] = field(default_factory=list)
    actions: list[Tensor] = field(default_factory=list)
    weights: list[Tensor] = field(default_factory=list)

    def add(self, st: Tensor, ac: Tensor, alive: Tensor, weight: Tensor) -> None:
        """Visits ``(H, n)`` of trajectories whose score is multiplied by ``weight`` ``(n,)``."""
        mask = alive.reshape(-1)
        self.states.append(st.reshape(-1)[mask])
        self.actions.append(ac.reshape(-1)[mask])
        self.weights.append(weight.unsqueeze(0).expand_as(st).reshape(-1)[mask])


def _score_flows(problem: TabularProblem, env: Environment, pis: Sequence[Tensor],
                 log_ratios: Sequence[Tensor], visits: Sequence[_Visits], rollouts: int,
                 horizon: int, share: str, generator: torch.Generator) -> list[Tensor]:
    """Per policy, the ``(S, A)`` table ``T`` with ``J_r^T T / tau`` estimating term (13), all
    from rollouts under ``pis[0]`` (the visits are the same trajectories, weighted per policy)."""
    S, A = pis[0].shape
    gamma = problem.discount
    if not visits[0].states:
        return [torch.zeros(S, A, dtype=pi.dtype, device=pi.device) for pi in pis]
    st, ac = torch.cat(visits[0].states), torch.cat(visits[0].actions)
    if share == "pair":
        nets = []
        for pi, v in zip(pis, visits):
            W = _table(st * A + ac, torch.cat(v.weights), S * A).view(S, A)
            nets.append((W - pi * W.sum(-1, keepdim=True)).reshape(-1))
        # rollouts from every pair that some policy's net weight needs
        support = torch.stack(nets).abs().sum(0)
        starts = torch.nonzero(support).squeeze(-1).repeat_interleave(rollouts)
        weights = [torch.index_select(net, 0, starts) / rollouts for net in nets]
        given = torch.ones_like(starts, dtype=torch.bool)
        return reward_flows(env.lower, pis, log_ratios, torch.div(starts, A, rounding_mode="floor"),
                            starts % A, given, weights, horizon, gamma, generator)
    st, ac = st.repeat_interleave(rollouts), ac.repeat_interleave(rollouts)
    w = [torch.cat(v.weights).repeat_interleave(rollouts) / rollouts for v in visits]
    # dQ from (s_t, a_t) minus dV from (s_t, a ~ pi), in one batch of rollouts
    other = sample_actions(pis[0], st, generator)
    given = torch.cat([torch.ones_like(st, dtype=torch.bool),
                       torch.zeros_like(st, dtype=torch.bool)])
    return reward_flows(env.lower, pis, log_ratios, torch.cat([st, st]), torch.cat([ac, other]),
                        given, [torch.cat([v, -v]) for v in w], horizon, gamma, generator)


def _centred(loss: Tensor, baseline: bool) -> Tensor:
    """``l_i - mean_{j != i} l_j`` (leave-one-out, so independent of sample ``i``), or ``l``."""
    n = loss.numel()
    if not baseline or n < 2:
        return loss
    return loss - (loss.sum() - loss) / (n - 1)


def estimate(problem: TabularProblem, env: Environment, x: Tensor, pi: Tensor,
             options: dict, streams: Streams, score: bool = True,
             data: Sequence[Preferences | None] | None = None, record: bool = True
             ) -> Estimate:
    """One sample of ``grad phi(x)`` at policy ``pi`` (eqs. 12-13) and of ``phi``.

    ``score = False`` drops the follower's-response term (13): the plain gradient of the
    sampled upper loss, as a method without implicit differentiation uses it.

    ``data`` (one entry per trajectory term, ``None`` for non-preference terms): term (12) of
    a preference term then fits the whole dataset instead of the fresh pairs alone, and term
    (13), which only the fresh pairs (drawn from ``pi``) carry, gets their share of the data,
    ``B / size``: the gradient of the dataset's mean loss. ``record``: the fresh pairs are new
    queries: count them in ``env.queries`` and append them to ``data``.
    """
    return estimates(problem, env, [(x, pi)], options, streams, score, data, record)[0]


def estimates(problem: TabularProblem, env: Environment, points: Sequence[tuple[Tensor, Tensor]],
              options: dict, streams: Streams, score: bool = True,
              data: Sequence[Preferences | None] | None = None, record: bool = True
              ) -> list[Estimate]:
    """``estimate`` at each ``(x, pi)`` of ``points``, all from the trajectories, labels and
    rollouts of one draw under the first point's policy, reweighted for the others by importance
    ratios ``prod_t pi(a_t|s_t) / pi_0(a_t|s_t)``: per decision for returns and rollouts (a
    reward at step ``t`` is weighted by the ratio of the steps up to ``t``), per trajectory (pair)
    for the score term (13) and the preference loss. Each estimate is unbiased for its point,
    and one sample's estimates move smoothly with ``(x, pi)``: what stoc_sobirl's correction
    term needs. The first point's estimate is ``estimate``'s, number for number.
    """
    terms = problem.trajectory_terms
    if terms is None:
        raise ValueError("the problem's objective has no trajectory form")
    behaviour = points[0][1].detach()
    S, A = behaviour.shape
    xs = [x.detach().requires_grad_(True) for x, _ in points]
    pis = [pi.detach() for _, pi in points]
    log_ratios = [(_log(pi) - _log(behaviour)).reshape(-1) for pi in pis]
    grads = [torch.zeros_like(x) for x in xs]
    visits = [_Visits() for _ in points]
    losses: list[list[float]] = [[] for _ in points]
    objectives = [0.0 for _ in points]
    with torch.enable_grad():
        for i, (term, sim) in enumerate(zip(terms, env.upper)):
            c, H = term.coefficient, term.horizon
            if term.kind == "expected_return":
                B = options["batch"] or 64
                st, ac, alive = rollout(sim, behaviour, sim.reset(B, streams.trajectories), None,
                                        H, streams.trajectories)
                discount = term.discount ** torch.arange(H, dtype=behaviour.dtype,
                                                         device=behaviour.device)
                base = discount.unsqueeze(-1) * alive  # (H, B)
                index = st * A + ac
                for j, x in enumerate(xs):
                    reward = term.reward(x)
                    rewards = _gather(reward.detach().reshape(-1), index)
                    rho = _path_ratios(log_ratios[j], index, alive)
                    w = base * rho
                    loss = (w * rewards).sum(0)  # (B,), per-decision weighted
                    exploit = _table(index, w * (c / B), S * A)
                    # the score term weights a trajectory's whole return by its whole ratio
                    plain = (base * rewards).sum(0)
                    visits[j].add(st, ac, alive,
                                  _centred(plain, options["baseline"]) * rho[-1] * (c / B))
                    grads[j] += reward_vjp(x, reward, exploit.view(S, A))
                    losses[j].append(float(loss.mean()))
            elif term.kind == "preference_loss":
                B = options["batch"] or term.pairs
                st, ac, alive = rollout(sim, behaviour, sim.reset(2 * B, streams.trajectories),
                                        None, H, streams.trajectories)
                index = st * A + ac
                truth = (alive * _gather(term.truth.reshape(-1), index)).sum(0)
                p = torch.sigmoid(term.scale * (truth[:B] - truth[B:]))
                u = uniform(2 * B, streams.trajectories, behaviour.dtype)
                y = ((u[:B] < p) ^ (u[B:] < term.noise)).to(behaviour.dtype)
                dataset = data[i] if data is not None else None
                if record:
                    env.queries += B
                    if dataset is not None:
                        live = alive.to(behaviour.dtype)
                        dataset.add(torch.cat([index[:, :B], index[:, B:]]).T,
                                    torch.cat([live[:, :B], -live[:, B:]]).T, y)
                # the fresh pairs' share of the fitted loss: only they depend on pi
                share = 1.0 if dataset is None else min(1.0, B / dataset.size)
                for j, x in enumerate(xs):
                    reward = term.reward(x)
                    flat = reward.detach().reshape(-1)
                    model = (alive * _gather(flat, index)).sum(0)
                    d = model[:B] - model[B:]
                    rho = _path_ratios(log_ratios[j], index, alive)[-1]
                    rho = rho[:B] * rho[B:]  # a pair's weight
                    loss = torch.nn.functional.softplus(d) - y * d  # BCE(y, sigmoid(d))
                    if dataset is None:
                        slope = (torch.sigmoid(d) - y) * rho * (c / B)  # dl/dd, per pair
                        exploit = _table(index, alive * torch.cat([slope, -slope]), S * A)
                    else:
                        exploit = dataset.fit_table(flat, c)
                    centred = _centred(loss, options["baseline"]) * rho
                    visits[j].add(st, ac, alive, torch.cat([centred, centred]) * (c * share / B))
                    grads[j] += reward_vjp(x, reward, exploit.view(S, A))
                    losses[j].append(float((rho * loss).mean()))
            else:
                raise ValueError(f"unknown trajectory term {term.kind!r}")
            for j in range(len(points)):
                objectives[j] += c * losses[j][-1]
        for j, x in enumerate(xs):
            if problem.policy_free is not None:
                rest = problem.policy_free(x)
                objectives[j] += float(rest.detach())
                grads[j] += reward_vjp(x, rest, torch.ones_like(rest))
        if score:
            H_roll = rollout_horizon(problem.discount, options["rollout_horizon"])
            flows = _score_flows(problem, env, pis, log_ratios, visits, options["rollouts"],
                                 H_roll, options["share"], streams.rollouts)
            for j, x in enumerate(xs):
                grads[j] += reward_vjp(x, problem.reward(x), flows[j] / problem.temperature)
    return [Estimate(g.detach(), f, l) for g, f, l in zip(grads, objectives, losses)]


_ROLLOUTS_AT_ONCE = 1 << 20


def sampled_q(problem: TabularProblem, env: Environment, r: Tensor, pi: Tensor, rollouts: int,
              horizon: int, generator: torch.Generator) -> Tensor:
    """Monte-Carlo soft ``Q^pi`` for every pair: ``m`` rollouts of ``H'`` steps from each.

    ``Q(s,a) = r(s,a) + sum_{t>=1} gamma^t r_pi(s_t)`` with the per-state expectation
    ``r_pi(s) = sum_a pi(a|s) (r(s,a) - tau log pi(a|s))`` taken exactly.
    """
    S, A = pi.shape
    tau, gamma = problem.temperature, problem.discount
    r = r.detach()
    r_pi = (pi * (r - tau * _log(pi))).sum(-1)
    # at most _ROLLOUTS_AT_ONCE walk together (`q_rollouts = 10^8` grew until the kernel
    # killed the run); the usual sizes take one batch, with the draws they always had
    at_once = max(1, _ROLLOUTS_AT_ONCE // (S * A))
    total = torch.zeros(S * A, dtype=r.dtype, device=r.device)
    for done in range(0, rollouts, at_once):
        m = min(at_once, rollouts - done)
        starts = torch.arange(S * A, device=pi.device).repeat(m)
        tail = discounted_returns(env.lower, pi, torch.div(starts, A, rounding_mode="floor"),
                                  starts % A, horizon + 1, r_pi, gamma, generator)
        total += tail.view(m, S * A).sum(0)
    return r + (total / rollouts).view(S, A)


def mirror_step(pi: Tensor, Q: Tensor, tau: float, rate: float) -> Tensor:
    """Entropy-regularised policy mirror descent: ``log pi' = (1 - rate) log pi + rate Q / tau``
    (normalised), with ``rate = eta tau / (1 + eta tau)`` for the mirror step size ``eta``.

    ``rate = 1`` is soft policy iteration, ``pi' = softmax(Q / tau)``; a smaller rate averages
    the noise of sampled ``Q`` estimates over iterations (the fixed point is unchanged).
    """
    if rate >= 1.0:
        return soft_policy(Q, tau)
    return soft_policy((1.0 - rate) * tau * _log(pi) + rate * Q, tau)


class Follower:
    """The lower level as a model-free solver sees it: a policy improved a few steps at a time.

    ``sampled``: each iteration estimates soft ``Q^pi`` by rollouts (``sampled_q``) and takes a
    mirror step; ``exact``: soft Bellman steps on a warm-started ``V`` with the model.
    """

    def __init__(self, problem: TabularProblem, env: Environment, options: dict,
                 generator: torch.Generator) -> None:
        self.problem, self.env, self.options, self.generator = problem, env, options, generator
        S, A = problem.n_states, problem.n_actions
        dtype, device = problem.x0.dtype, problem.x0.device
        self.pi = torch.full((S, A), 1.0 / A, dtype=dtype, device=device)
        self.V = torch.zeros(S, dtype=dtype, device=device)
        self.PV: Tensor | None = None  # P.expect(V), kept for the next exact update
        self.horizon = rollout_horizon(problem.discount, options["rollout_horizon"])

    def improve(self, x: Tensor, steps: int) -> Tensor:
        """``steps`` iterations towards ``pi*_x`` from the current policy; returns the policy."""
        problem = self.problem
        tau, gamma = problem.temperature, problem.discount
        with torch.no_grad():
            r = problem.reward(x.detach())
            if self.options["follower"] == "exact":
                P = problem.transitions
                self.V, self.pi, self.PV = soft_bellman_update(P, r, self.V, gamma, tau, steps,
                                                               self.PV)
            else:
                for _ in range(steps):
                    Q = sampled_q(problem, self.env, r, self.pi, self.options["q_rollouts"],
                                  self.horizon, self.generator)
                    self.pi = mirror_step(self.pi, Q, tau, self.options["pmd_rate"])
        return self.pi


# direction(k, x, pi) -> (step direction, objective estimate, ||hyper-gradient estimate||)
Direction = Callable[[int, Tensor, Tensor], tuple[Tensor, float, float]]
# observer(k, x_k, pi_k, env): called once pi_k is computed, before the step of iteration k,
# for benchmarks that evaluate the follower as the run goes (env: queries, transitions so far)
Observer = Callable[[int, Tensor, Tensor, Environment], None]


def outer_loop(problem: TabularProblem, options: dict[str, Any], monitor: Monitor,
               follower: Follower, direction: Direction, observer: Observer | None = None
               ) -> SolveResult:
    """``x <- project(x - beta d_k)`` with ``pi_k`` from the follower and ``d_k`` from
    ``direction``; records ``objective`` (the sampled estimate of the minimised objective),
    ``hypergrad_norm``, ``stationarity``, ``time``, ``iteration``, and the cumulative
    ``queries`` (preference pairs labelled) and ``transitions`` (simulator draws) after it,
    every ``log_every`` iterations and at the last one.

    The returned ``objective`` is ``f(x, pi)`` at the follower's running policy where the
    objective has a closed form (no ``preference_loss``), else the mean of the last ten sampled
    estimates; ``extra["objective_is"]`` says which. An estimate, a step or a policy that is
    not finite stops the run (``NOT_FINITE``) at the last iterate whose numbers were finite.
    """
    env = follower.env
    x = problem.project(problem.x0.detach().clone())
    history: dict[str, list[float]] = {"objective": [], "hypergrad_norm": [], "time": [],
                                       "stationarity": [], "iteration": [], "queries": [],
                                       "transitions": []}
    log_every = max(1, options["log_every"])
    beta, budget = options["beta"], options["query_budget"]
    start = time.perf_counter()
    stopped, k = "max_iterations", 0
    recent: list[float] = []
    last: tuple[Tensor, Tensor] | None = None  # the last finite iterate and its policy
    pending: tuple[int, float, float, float] | None = None  # the last iteration, unrecorded

    def record(k: int, f: float, h_norm: float, mapping: float) -> None:
        history["iteration"].append(k)
        history["objective"].append(f)
        history["hypergrad_norm"].append(h_norm)
        history["stationarity"].append(mapping)
        history["time"].append(time.perf_counter() - start)
        history["queries"].append(env.queries)
        history["transitions"].append(env.transitions)

    try:
        # the warm start, a step at a time: Ctrl-C and time_limit may come during it too (with
        # sampled Q estimates each step can draw millions of transitions)
        for _ in range(options["warm_start"]):
            follower.improve(x, 1)
            reason = stop_reason(options, start, monitor)
            if reason is not None:
                stopped = reason
                break
        while k < options["outer"] and stopped == "max_iterations":
            spent = {"queries": env.queries, "transitions": env.transitions}  # to reach x_k
            pi = follower.improve(x, options["inner"])
            if observer is not None:
                observer(k, x, pi, env)
            d, f, h_norm = direction(k, x, pi)
            x_next = problem.project(x - beta * d)
            if not (math.isfinite(f) and math.isfinite(h_norm)
                    and bool(torch.isfinite(x_next).all() and torch.isfinite(pi).all())):
                stopped = NOT_FINITE
                break
            last = (x, pi)
            mapping = float(torch.linalg.vector_norm(x - x_next)) / beta
            monitor.update(k, f, h_norm)
            recent = (recent + [f])[-10:]
            pending = (k, f, h_norm, mapping)
            if k % log_every == 0:
                record(*pending)
                pending = None
            monitor.keep(partial(unfinished, x, pi, f, history, k, spent))
            x = x_next
            k += 1
            reason = stop_reason(options, start, monitor)
            if budget and env.queries >= budget:
                reason = "query_budget"
            if reason is not None:
                stopped = reason
                break
    except KeyboardInterrupt:
        stopped = "interrupted"
    if pending is not None:
        record(*pending)
    if stopped == NOT_FINITE:
        if last is not None:  # else x0 itself was not finite: report it as it is
            (x, pi), k = last, k - 1
    elif stopped == "interrupted":  # at once: a follower step can take minutes
        pi = follower.pi
    else:
        pi = follower.improve(x, options["inner"])
    if "preference_loss" in problem.features or not recent:
        objective = sum(recent) / len(recent) if recent else math.nan
        meaning = f"the mean of the last {len(recent)} sampled estimates"
    else:
        with torch.no_grad():
            objective = float(problem.objective(x, pi))
        meaning = "f(x, pi) at the follower's running policy, not phi(x)"
    result = SolveResult(x=x.detach(), policy=pi.detach(), objective=objective, history=history,
                         iterations=k, stopped_because=stopped,
                         extra={"time": time.perf_counter() - start, "queries": env.queries,
                                "transitions": env.transitions, "objective_is": meaning})
    if (options["verify"] == "exact" and "preference_loss" not in problem.features
            and stopped not in ("interrupted", "time_limit", NOT_FINITE)):
        _verify(problem, result, beta, monitor)
    return result


def _verify(problem: TabularProblem, result: SolveResult, beta: float, monitor: Monitor) -> None:
    """phi at x0 and at the final x, exactly: the samples the run recorded are noisy and
    taken at a follower that lags, so only these tell whether the run improved phi."""
    try:
        monitor.note("phi(x) and its gradient at x0 and at the final x, exactly (verify = exact)")
        first = hypergradient(problem, problem.project(problem.x0.detach()), tol=VERIFY_TOL)
        final = hypergradient(problem, result.x, V=first.V, tol=VERIFY_TOL)
    except KeyboardInterrupt:
        result.stopped_because = "interrupted"
        return
    result.extra["exact"] = exact_record(problem, result.x, final, beta)
    result.extra["exact_at_x0"] = first.objective
    result.extra["running_objective"] = result.objective
    result.extra["objective_is"] = "phi(x): the follower solved exactly at the final x"
    result.objective, result.policy = final.objective, final.pi.detach()
