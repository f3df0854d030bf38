"""A successor-feature critic: the follower's ``dQ/dtheta`` for the reward network's last layer.

The implicit term needs ``dQ^pi(s, a)/dtheta``. The reward network ends in a linear layer,
``r(s, a) = <theta_L, phi(s, a)>`` (``RewardNet.phi``: the layer's input ``h`` with a 1 appended
for the bias, in the row of action ``a`` when there is one output per discrete action), so for
``theta_L`` the derivative is the successor features of ``phi`` under the follower's policy::

    psi(s, a) = dQ^pi(s, a)/dtheta_L = E[sum_t gamma^t phi(s_t, a_t) | s_0 = s, a_0 = a]

(``h`` held fixed: the derivative in ``theta_L`` only). ``psi`` has ``phi``'s shape,
``(out, H + 1)``: one row with continuous actions, one per action when discrete. It is learnt
by TD on SAC's replay buffer, with ``phi`` from the current reward network (no gradient) and a
Polyak-averaged target copy::

    psi(s, a) <- phi(s, a) + gamma (1 - terminated) E_{a' ~ pi(.|s')} psi_target(s', a')

The expectation is exact with discrete actions (the network outputs ``psi(s, .)`` for every
action, like SAC's critic) and averages ``samples`` policy actions with continuous ones. The
network outputs ``(1 - gamma) psi``, a discounted average of features on ``phi``'s own scale,
so its targets do not grow with the horizon.

The bias column does not cancel in ``psi(s, a) - E_{a'~pi} psi(s, a')`` in general: with one
output per action it counts discounted visits of each action, and with continuous actions it
is the expected discounted remaining lifetime, which depends on ``a`` where termination does
(it is ``1/(1 - gamma)`` for every pair, and cancels, only when episodes never terminate).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from gymnasium import spaces
from torch import Tensor

from .replay import ReplayBuffer
from .reward_model import RewardNet
from .sac import QNetwork, derive_seed

# The critic's random streams: ROLE initialises it, ROLE + 1 draws its minibatches (sac.py
# uses 0 to 2).
ROLE = 3


def policy_expectation(agent: Any, obs: Tensor, samples: int, discrete: bool
                       ) -> tuple[Tensor | None, Tensor | None]:
    """What an expectation over ``pi(.|s)`` needs, without gradient: ``(probs, None)`` with
    discrete actions, ``(None, actions)`` with ``samples`` sampled continuous actions."""
    with torch.no_grad():
        if discrete:
            return agent.action_probs(obs), None
        return None, agent.sample_actions(obs, samples)[0]


class SuccessorCritic:
    """``psi_phi(s, a)``, its target copy, optimiser and minibatch generator."""

    def __init__(self, observation_space: spaces.Box,
                 action_space: spaces.Box | spaces.Discrete, reward_net: RewardNet,
                 hidden: tuple[int, ...], gamma: float, lr: float, tau: float, batch: int,
                 seed: int, device: torch.device) -> None:
        self.gamma, self.tau, self.batch, self.device = gamma, tau, batch, device
        self.discrete = isinstance(action_space, spaces.Discrete)
        self.shape = (reward_net.last.out_features, reward_net.last.in_features + 1)
        n_out = self.shape[0] * self.shape[1]
        if self.discrete:
            self.n_actions = int(action_space.n)
            n_out, action_dim = n_out * self.n_actions, 0
        else:
            action_dim = action_space.shape[0]
            low, high = (torch.as_tensor(b, dtype=torch.float32, device=device)
                         for b in (action_space.low, action_space.high))
            self.center, self.half_range = (high + low) / 2, (high - low) / 2
        with torch.random.fork_rng(devices=[]):  # leaves the run's global stream untouched
            torch.manual_seed(derive_seed(seed, ROLE))
            self.net = QNetwork(observation_space, action_dim, n_out, hidden).to(device)
        self.target = copy.deepcopy(self.net).requires_grad_(False)
        self.optimiser = torch.optim.Adam(self.net.parameters(), lr)
        self.generator = torch.Generator(device).manual_seed(derive_seed(seed, ROLE + 1))

    def _scaled(self, network: QNetwork, obs: Tensor, probs: Tensor | None = None,
                actions: Tensor | None = None) -> Tensor:
        """``(1 - gamma) psi`` at the given actions ``(B,)`` or ``(B, dim)``, or its expectation
        over ``probs`` ``(B, |A|)`` or sampled ``actions`` ``(n, B, dim)``: ``(B, out, H+1)``."""
        if self.discrete:
            every = network(obs).view(obs.shape[0], self.n_actions, *self.shape)
            if probs is not None:
                return torch.einsum("ba,baoh->boh", probs.to(every.dtype), every)
            return every[torch.arange(obs.shape[0], device=obs.device), actions.long()]
        normalised = ((actions.float() - self.center) / self.half_range).clamp(-1.0, 1.0)
        if normalised.dim() == 2:
            return network(obs, normalised).view(obs.shape[0], *self.shape)
        n = normalised.shape[0]
        repeated = obs.unsqueeze(0).expand(n, *obs.shape).flatten(0, 1)
        values = network(repeated, normalised.flatten(0, 1)).view(n, obs.shape[0], *self.shape)
        return values.mean(0)

    def __call__(self, obs: Tensor, actions: Tensor) -> Tensor:
        """``psi(s, a)``, shape ``(B, out, H + 1)``, without gradient."""
        with torch.no_grad():
            return self._scaled(self.net, obs, actions=actions) / (1 - self.gamma)

    def advantage(self, obs: Tensor, actions: Tensor, probs: Tensor | None,
                  sampled: Tensor | None) -> Tensor:
        """``psi(s, a) - E_{a'~pi} psi(s, a')`` (``probs`` or ``sampled`` as from
        ``policy_expectation``), without gradient."""
        with torch.no_grad():
            taken = self._scaled(self.net, obs, actions=actions)
            expected = self._scaled(self.net, obs, probs=probs, actions=sampled)
            return (taken - expected) / (1 - self.gamma)

    def update(self, buffer: ReplayBuffer, reward_net: RewardNet, agent: Any, steps: int,
               samples: int) -> float:
        """``steps`` TD minibatch updates on ``buffer`` under ``agent``'s policy; returns their
        mean squared TD error (of ``(1 - gamma) psi``, per feature), to watch the critic."""
        reward_net.train(False)
        total = torch.zeros((), device=self.device)
        for _ in range(steps):
            batch = buffer.sample(self.batch, self.generator)
            with torch.no_grad():
                phi = reward_net.phi(batch.obs, batch.action)
                probs, sampled = policy_expectation(agent, batch.next_obs, samples,
                                                    self.discrete)
                future = self._scaled(self.target, batch.next_obs, probs=probs, actions=sampled)
                keep = (1.0 - batch.terminated).view(-1, 1, 1)
                target = (1 - self.gamma) * phi + self.gamma * keep * future
            loss = F.mse_loss(self._scaled(self.net, batch.obs, actions=batch.action), target)
            total += loss.detach()
            self.optimiser.zero_grad(set_to_none=True)
            loss.backward()
            self.optimiser.step()
            with torch.no_grad():
                for target_p, p in zip(self.target.parameters(), self.net.parameters()):
                    target_p.lerp_(p, self.tau)
        return float(total) / max(steps, 1)

    def state(self) -> dict[str, Any]:
        """Tensors only, for a checkpoint."""
        return {"net": self.net.state_dict(), "target": self.target.state_dict(),
                "optimiser": self.optimiser.state_dict(), "generator": self.generator.get_state()}

    def load(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.target.load_state_dict(state["target"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.generator.set_state(state["generator"].cpu())
