"""The critic-based implicit term (``implicit = critic``) and the query schedule of deep RLHF."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gymnasium import spaces

from bilevel_dsl import BrlError, compile_source, lower
from solvers.deep.critic import SuccessorCritic
from solvers.deep.preferences import Fragments, bradley_terry, fragment_returns
from solvers.deep.problem import PreferenceSpec
from solvers.deep.replay import ReplayBuffer
from solvers.deep.reward_model import RewardNetSpec, build_reward_net
from solvers.deep.sobirl_sac import RewardModel, reward_terms

N_STATES, GAMMA = 5, 0.8  # a chain 0 -> 4; stepping from 3 to 4 ends the episode
MU = torch.tensor([0.5, -0.5, 1.0, -1.0, 0.0])  # the continuous follower's action in each state


class DiscreteFollower:
    """A fixed policy over two actions (0: left, 1: right), read off one-hot observations."""

    alpha = torch.tensor(0.5)
    table = torch.tensor([[0.3, 0.7], [0.6, 0.4], [0.2, 0.8], [0.5, 0.5], [0.5, 0.5]])

    def action_probs(self, obs):
        return obs.float() @ self.table


class ContinuousFollower:
    """Always the action ``MU[s]`` (every sample the same): a policy whose psi is exact."""

    alpha = torch.tensor(0.5)

    def sample_actions(self, obs, n):
        action = (obs.float() @ MU).unsqueeze(-1)
        return action.expand(n, *action.shape), None


def _one_hot(states):
    return torch.eye(N_STATES)[torch.as_tensor(states)]


def _chain(discrete: bool):
    """All transitions of the chain (continuous: three actions per state, MU's among them, and
    the state moves right whatever the action), each stored four times, and the exact psi at
    them: (I - gamma P_pi)^-1 phi in the discrete case, a backward sum in the continuous one."""
    torch.manual_seed(0)
    obs_space = spaces.Box(0.0, 1.0, (N_STATES,), np.float32)
    action_space = spaces.Discrete(2) if discrete else spaces.Box(-2.0, 2.0, (1,), np.float32)
    net = build_reward_net(RewardNetSpec(hidden=(3,), activation="tanh"), (N_STATES,),
                           2 if discrete else None, None if discrete else 1)
    rows = []  # (state, action, next state)
    for s in range(N_STATES - 1):
        if discrete:
            rows += [(s, 0, max(s - 1, 0)), (s, 1, s + 1)]
        else:
            rows += [(s, a, s + 1) for a in (-1.5, float(MU[s]), 1.5)]
    states = torch.tensor([r[0] for r in rows])
    actions = torch.tensor([r[1] for r in rows], dtype=torch.int64 if discrete else torch.float32)
    if not discrete:
        actions = actions.unsqueeze(-1)
    following = torch.tensor([r[2] for r in rows])
    ended = following == N_STATES - 1
    with torch.no_grad():
        phi = net.phi(_one_hot(states), actions).double()
        if discrete:  # psi = phi + gamma P psi over the rows, P from the fixed policy
            probs = DiscreteFollower.table.double()
            P = torch.zeros(len(rows), len(rows), dtype=torch.float64)
            for i, (_, _, t) in enumerate(rows):
                if t != N_STATES - 1:
                    for j, (s2, a2, _) in enumerate(rows):
                        if s2 == t:
                            P[i, j] = probs[t, a2]
            psi = torch.linalg.solve(torch.eye(len(rows), dtype=torch.float64) - GAMMA * P,
                                     phi.flatten(1)).view(phi.shape)
        else:  # V(s) = psi(s, MU[s]) = phi(s, MU[s]) + gamma V(s + 1), V(4) unused (terminal)
            on_policy = net.phi(_one_hot(range(N_STATES)), MU.unsqueeze(-1)).double()
            value = torch.zeros_like(on_policy)
            for s in reversed(range(N_STATES - 1)):
                value[s] = on_policy[s] + (GAMMA * value[s + 1] if s + 1 < N_STATES - 1 else 0)
            psi = phi + GAMMA * (~ended).double().view(-1, 1, 1) * value[following]
    buffer = ReplayBuffer.for_spaces(4 * len(rows), obs_space, action_space)
    for _ in range(4):
        buffer.add(_one_hot(states), actions, torch.zeros(len(rows)), _one_hot(following),
                   ended)
    return obs_space, action_space, net, buffer, _one_hot(states), actions, psi


@pytest.mark.parametrize("discrete", [True, False], ids=["discrete", "continuous"])
def test_td_training_recovers_the_exact_successor_features(discrete):
    """On a 5-state chain with one-hot observations and a fixed policy, 600 TD updates bring
    psi within 1% of its largest entry at every stored pair."""
    obs_space, action_space, net, buffer, obs, actions, exact = _chain(discrete)
    critic = SuccessorCritic(obs_space, action_space, net, (64,), GAMMA, lr=3e-3, tau=0.05,
                             batch=32, seed=0, device=torch.device("cpu"))
    follower = DiscreteFollower() if discrete else ContinuousFollower()
    before = (critic(obs, actions).double() - exact).abs().max()
    critic.update(buffer, net, follower, 600, samples=2)
    error = (critic(obs, actions).double() - exact).abs().max()
    scale = exact.abs().max()
    assert error < 0.01 * scale < before, (float(error), float(scale), float(before))


@pytest.mark.parametrize("discrete", [True, False], ids=["discrete", "continuous"])
def test_critic_term_gradients(discrete):
    """The last layer's gradient is mean(BCE * (1/alpha) * sum_t dpsi) over the pairs (both
    fragments); every other layer's is the public form's; r = <theta_L, phi>."""
    obs_space, action_space, net, buffer, _, _, _ = _chain(discrete)
    model = RewardModel.__new__(RewardModel)  # only its network and standardisation are used
    model.net, model.scale = net, torch.ones(())
    critic = SuccessorCritic(obs_space, action_space, net, (16,), GAMMA, lr=1e-3, tau=0.05,
                             batch=8, seed=1, device=torch.device("cpu"))
    follower = DiscreteFollower() if discrete else ContinuousFollower()
    critic.update(buffer, net, follower, 5, samples=2)  # any critic will do: not converged
    g = torch.Generator().manual_seed(2)

    def fragments():
        states = torch.randint(0, N_STATES, (4, 3), generator=g)
        if discrete:
            actions = torch.randint(0, 2, (4, 3), generator=g)
        else:
            actions = 4 * torch.rand(4, 3, 1, generator=g) - 2
        return Fragments(_one_hot(states), actions, torch.randn(4, 3, generator=g))

    first, second = fragments(), fragments()
    labels = torch.tensor([1.0, 0.0, 0.5, 1.0])
    obs, actions = first.steps()
    torch.testing.assert_close((net.last_weights() * net.phi(obs, actions)).sum((-2, -1)),
                               net(obs, actions))
    bce = bradley_terry(fragment_returns(net, first), fragment_returns(net, second),
                        labels).detach()
    params = list(net.parameters())
    last = [net.last.weight, net.last.bias]
    others = [p for p in params if all(p is not q for q in last)]

    def gradients(kind):
        term = (bce * (reward_terms(model, follower, first, kind, GAMMA, 3, critic)[1]
                       + reward_terms(model, follower, second, kind, GAMMA, 3, critic)[1])).mean()
        return torch.autograd.grad(term, last + others)

    critic_grads, public_grads = gradients("critic"), gradients("public")
    dpsi = []
    for frags in (first, second):
        obs, actions = frags.steps()
        if discrete:
            probs, sampled = follower.action_probs(obs), None
        else:
            probs, sampled = None, follower.sample_actions(obs, 3)[0]
        dpsi.append(critic.advantage(obs, actions, probs, sampled).view(4, 3, *critic.shape)
                    .sum(1))
    expected = (bce.view(-1, 1, 1) * (dpsi[0] + dpsi[1]) / follower.alpha).mean(0)
    torch.testing.assert_close(critic_grads[0], expected[:, :-1])
    torch.testing.assert_close(critic_grads[1], expected[:, -1])
    for ours, public in zip(critic_grads[2:], public_grads[2:]):
        torch.testing.assert_close(ours, public)
    assert any(float(p.abs().max()) > 0 for p in critic_grads[2:])


def test_the_decaying_schedule_counts_add_up():
    """pairs * H / (T + H) per iteration at T = k * S steps, the fraction carried: after every
    iteration the count so far is the integral part of the summed rates."""
    spec = PreferenceSpec(pairs_per_iteration=5, schedule="decay", decay_steps=300,
                          initial_pairs=0)
    carry, asked, rates, counts = 0.0, 0, 0.0, []
    for k in range(40):
        count, carry = spec.pairs_due(100 * k, carry, asked)
        asked += count
        counts.append(count)
        rates += 5 * 300 / (100 * k + 300)
        assert asked == math.floor(rates + 1e-9) and 0 <= carry < 1
    assert counts[0] == 5 and counts[-1] in (0, 1)
    capped = PreferenceSpec(pairs_per_iteration=5, schedule="decay", decay_steps=300,
                            initial_pairs=4, total_pairs=20)
    carry, asked = 0.0, 4
    for k in range(40):
        count, carry = capped.pairs_due(100 * k, carry, asked)
        asked += count
    assert asked == 20
    assert PreferenceSpec(pairs_per_iteration=6).pairs_due(10**6, 0.0, 0) == (6, 0.0)


BASE = """brl 1
mdp env = gym("Pendulum-v1")
var r = reward_net(env, hidden = [16])
lower env { temperature = auto   reward[s, a] = r[s, a] }
upper minimize preference_loss(env, policy, truth = env.reward, initial_pairs = 10, {extra})
"""


def test_schedule_options_compile_and_their_errors_are_located():
    checked = compile_source(BASE.replace("{extra}", "schedule = decay, decay_steps = 1e4, "
                                          "total_pairs = 50"), "ok.brl")
    spec = lower(checked, device="cpu").preferences
    assert (spec.schedule, spec.decay_steps, spec.total_pairs) == ("decay", 1e4, 50)
    for extra, code, where in (("schedule = decaying", "E305", "decaying"),
                               ("decay_steps = 100", "E404", "decay_steps"),
                               ("schedule = decay, decay_steps = 0", "E305", "0"),
                               ("total_pairs = 5", "E305", "5"),
                               ("total_pairs = 2.5", "E305", "2.5")):
        source = BASE.replace("{extra}", extra)
        with pytest.raises(BrlError) as info:
            compile_source(source, "bad.brl")
        diag = info.value.diagnostics[0]
        assert diag.code == code, (extra, diag)
        line = source.split("\n")[diag.span.line - 1]
        assert line[diag.span.column - 1:].startswith(where), (extra, diag)
