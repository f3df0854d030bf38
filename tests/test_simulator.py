"""The tabular simulator samples P (sub-stochastic rows end episodes), batched and seeded."""

from __future__ import annotations

import pytest
import torch

import bilevel_dsl.simulator as simulator
from bilevel_dsl.simulator import (
    Simulator,
    TabularSimulator,
    discounted_returns,
    rollout,
    sample_actions,
)
from bilevel_dsl.softmdp import Transitions

DT = torch.float64


def random_P(seed: int, S: int = 6, A: int = 3) -> torch.Tensor:
    """Random rows with some zeros; row masses in (0.5, 1], one row with no mass at all."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(S, A, S, generator=g, dtype=DT) * (torch.rand(S, A, S, generator=g) < 0.6)
    w[..., 0] += 0.05  # no empty row by accident
    P = w / w.sum(-1, keepdim=True)
    P = P * (0.5 + 0.5 * torch.rand(S, A, 1, generator=g, dtype=DT))
    P[:, 0] = P[:, 0] / P[:, 0].sum(-1, keepdim=True)  # action 0 never ends the episode
    P[S - 1, A - 1] = 0.0  # a purely terminal pair
    return P


def storages(P: torch.Tensor) -> dict[str, Transitions]:
    dense = Transitions.from_dense(P)
    S, A, _ = P.shape
    return {"dense": dense, "sparse": Transitions.from_coo(*dense.coo(), S, A)}


def outcome_counts(sim: TabularSimulator, n: int, seed: int) -> torch.Tensor:
    """(S, A, S + 1) counts of successors of n draws from every pair (last column: done)."""
    S, A = sim.n_states, sim.n_actions
    pairs = torch.arange(S * A).repeat(n)
    states, actions = pairs // A, pairs % A
    nxt, done = sim.step(states, actions, torch.Generator().manual_seed(seed))
    assert torch.equal(nxt[done], states[done])  # an ended episode stays put
    outcome = torch.where(done, torch.full_like(nxt, S), nxt)
    counts = torch.zeros(S * A * (S + 1), dtype=DT)
    counts.index_add_(0, pairs * (S + 1) + outcome, torch.ones(pairs.numel(), dtype=DT))
    return counts.view(S, A, S + 1)


def assert_matches(counts: torch.Tensor, P: torch.Tensor, n: int) -> None:
    """Every row's frequencies pass a chi-square test (5 sigma of the chi-square law)."""
    expected = torch.cat([P, (1 - P.sum(-1, keepdim=True)).clamp(min=0)], -1) * n
    assert torch.all(counts[expected == 0] == 0)  # impossible outcomes never happen
    positive = expected > 0
    chi2 = torch.where(positive, (counts - expected) ** 2 / expected.clamp(min=1e-300), 0.0)
    df = (positive.sum(-1) - 1).clamp(min=1).to(DT)
    assert torch.all(chi2.sum(-1) < df + 5 * torch.sqrt(2 * df)), chi2.sum(-1) - df


@pytest.mark.parametrize("storage", ["dense", "sparse"])
@pytest.mark.parametrize("alias", [True, False])
def test_successor_frequencies_match_P(storage, alias, monkeypatch):
    if not alias:  # force the binary search in the global running sum
        monkeypatch.setattr(simulator, "ALIAS_MAX_WIDTH", 0)
    P = random_P(0)
    sim = TabularSimulator(storages(P)[storage], torch.full((6,), 1 / 6, dtype=DT))
    assert (sim._width <= simulator.ALIAS_MAX_WIDTH) == alias
    n = 20_000
    assert_matches(outcome_counts(sim, n, seed=1), P, n)
    assert sim.transitions_drawn == n * 6 * 3


def test_alias_tables_reproduce_the_distribution_exactly():
    """The distribution a table implies, ``sum_j (1/W) (t_j 1{pick_j0 = o} + (1 - t_j)
    1{pick_j1 = o})``, is the input to rounding; outcomes of probability zero are never
    reachable, not even as an alias."""
    g = torch.Generator().manual_seed(0)
    R, W = 500, 7
    p = torch.rand(R, W, generator=g, dtype=DT) ** 4 * (torch.rand(R, W, generator=g) < 0.7)
    p[:, 0] += 1e-3
    p[0] = torch.tensor([0, 0, 1, 0, 0, 0, 0], dtype=DT)  # a certain outcome
    p = p / p.sum(-1, keepdim=True)
    outcomes = torch.arange(W).expand(R, W)
    threshold, pick = simulator.alias_tables(p, outcomes)
    assert bool(((threshold >= 0) & (threshold <= 1 + 1e-12)).all())
    implied = torch.zeros(R, W, dtype=DT)
    implied.scatter_add_(1, pick[..., 0], threshold / W)
    implied.scatter_add_(1, pick[..., 1], (1 - threshold) / W)
    assert torch.allclose(implied, p, atol=1e-14, rtol=0)
    reachable = torch.zeros(R, W, dtype=torch.int64)
    reachable.scatter_add_(1, pick[..., 0], (threshold > 0).long())
    reachable.scatter_add_(1, pick[..., 1], (threshold < 1).long())
    assert not bool(reachable[p == 0].any())


def test_terminal_handling():
    P = random_P(2)
    sim = TabularSimulator(Transitions.from_dense(P), torch.full((6,), 1 / 6, dtype=DT))
    g = torch.Generator().manual_seed(0)
    states = torch.full((1000,), 5)
    nxt, done = sim.step(states, torch.full((1000,), 2), g)  # the pair with no mass
    assert bool(done.all()) and torch.equal(nxt, states)
    _, done = sim.step(states, torch.zeros(1000, dtype=torch.long), g)  # rows summing to 1
    assert not bool(done.any())
    # alive is false from the step after the episode ended; actions after that are junk
    pi = torch.tensor([[0.0, 0.0, 1.0]] * 6, dtype=DT)  # always the terminal-prone action
    st, ac, alive = rollout(sim, pi, torch.full((4000,), 5), None, 3, g)
    assert bool(alive[0].all()) and not bool(alive[1].any()) and not bool(alive[2].any())


@pytest.mark.parametrize("alias", [True, False])
def test_sparse_and_dense_storage_sample_alike(alias, monkeypatch):
    if not alias:
        monkeypatch.setattr(simulator, "ALIAS_MAX_WIDTH", 0)
    P = random_P(3)
    sims = {k: TabularSimulator(t, torch.full((6,), 1 / 6, dtype=DT))
            for k, t in storages(P).items()}
    # the same nonzeros in the same order: the same seed gives the very same draws
    a, b = (outcome_counts(s, 2000, seed=4) for s in sims.values())
    assert torch.equal(a, b)


def test_reset_and_policy_sampler_match_their_distributions():
    rho = torch.tensor([0.1, 0.0, 0.6, 0.3], dtype=DT)
    P = torch.full((4, 2, 4), 0.25, dtype=DT)
    sim = TabularSimulator(Transitions.from_dense(P), rho)
    assert isinstance(sim, Simulator)
    g = torch.Generator().manual_seed(0)
    n = 40_000
    freq = torch.bincount(sim.reset(n, g), minlength=4).to(DT) / n
    assert freq[1] == 0 and torch.allclose(freq, rho, atol=0.01)
    pi = torch.tensor([[0.2, 0.8], [1.0, 0.0], [0.5, 0.5], [0.0, 1.0]], dtype=DT)
    states = torch.arange(4).repeat(n // 4)
    actions = sample_actions(pi, states, g)
    freq = torch.zeros(4, 2, dtype=DT).index_put_((states, actions), torch.ones(n, dtype=DT),
                                                  accumulate=True) / (n // 4)
    assert torch.allclose(freq, pi, atol=0.02)
    assert actions[states == 1].eq(0).all() and actions[states == 3].eq(1).all()


def test_same_seed_same_rollouts():
    P = random_P(5)
    sim = TabularSimulator(Transitions.from_dense(P), torch.full((6,), 1 / 6, dtype=DT))
    pi = torch.softmax(torch.randn(6, 3, generator=torch.Generator().manual_seed(0),
                                   dtype=DT), -1)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return rollout(sim, pi, sim.reset(500, g), None, 7, g)

    for x, y in zip(run(1), run(1)):
        assert torch.equal(x, y)
    assert not torch.equal(run(1)[0], run(2)[0])


@pytest.mark.parametrize("chunk", [333, 10**6])
def test_rollout_follows_the_law_of_the_chain_in_chunks_or_not(chunk, monkeypatch):
    """The law of ``(s_t, alive_t)`` at t = 3 matches the exact propagation of rho through
    ``pi`` and ``P`` (episodes end with the rows' missing mass), however the batch is split."""
    monkeypatch.setattr(simulator, "ROLLOUT_CHUNK", chunk)
    P = random_P(7)
    rho = torch.full((6,), 1 / 6, dtype=DT)
    sim = TabularSimulator(Transitions.from_dense(P), rho)
    pi = torch.softmax(torch.randn(6, 3, generator=torch.Generator().manual_seed(1),
                                   dtype=DT), -1)
    n, t = 30_000, 3
    g = torch.Generator().manual_seed(2)
    st, _, alive = rollout(sim, pi, sim.reset(n, g), None, t + 1, g)
    law = rho
    for _ in range(t):
        law = torch.einsum("s,sa,sat->t", law, pi, P)
    seen = torch.bincount(st[t][alive[t]], minlength=6).to(DT) / n
    assert torch.allclose(seen, law, atol=0.01), (seen, law)
    assert bool((alive[1:] <= alive[:-1]).all())  # once ended, an episode stays ended


@pytest.mark.parametrize("chunk", [333, 10**6])
def test_discounted_returns_follow_the_rollouts_of_the_same_draws(chunk, monkeypatch):
    """The streamed sum equals the one over ``rollout``'s stored trajectories, drawn with the
    same seed, to rounding (the sums are taken in another order)."""
    monkeypatch.setattr(simulator, "ROLLOUT_CHUNK", chunk)
    P = random_P(8)
    sim = TabularSimulator(Transitions.from_dense(P), torch.full((6,), 1 / 6, dtype=DT))
    g = torch.Generator().manual_seed(3)
    pi = torch.softmax(torch.randn(6, 3, generator=g, dtype=DT), -1)
    values = torch.randn(6, generator=g, dtype=DT)
    starts = torch.arange(18).repeat(50)
    states, actions, horizon, gamma = starts // 3, starts % 3, 9, 0.9
    st, _, alive = rollout(sim, pi, states, actions, horizon, torch.Generator().manual_seed(4))
    discount = gamma ** torch.arange(1, horizon, dtype=DT)
    expected = discount @ (values[st[1:]] * alive[1:])
    streamed = discounted_returns(sim, pi, states, actions, horizon, values, gamma,
                                  torch.Generator().manual_seed(4))
    torch.testing.assert_close(streamed, expected, rtol=0, atol=1e-14)
    assert bool((expected != 0).any())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_the_distribution():
    P = random_P(6)
    sim = TabularSimulator(Transitions.from_dense(P).to("cuda"),
                           torch.full((6,), 1 / 6, dtype=DT, device="cuda"))
    S, A, n = 6, 3, 20_000
    pairs = torch.arange(S * A, device="cuda").repeat(n)
    nxt, done = sim.step(pairs // A, pairs % A, torch.Generator("cuda").manual_seed(0))
    outcome = torch.where(done, torch.full_like(nxt, S), nxt).cpu()
    counts = torch.zeros(S * A * (S + 1), dtype=DT)
    counts.index_add_(0, pairs.cpu() * (S + 1) + outcome, torch.ones(pairs.numel(), dtype=DT))
    assert_matches(counts.view(S, A, S + 1), P, n)
