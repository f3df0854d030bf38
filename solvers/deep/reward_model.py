"""Reward networks ``r_theta``: the leader's decision variable in deep RLHF problems.

Both kinds can say what a state-action pair is worth and what the follower's policy expects a
state to be worth, ``sum_a' pi(a'|s) r(s, a')``, which the implicit term of the hyper-gradient
needs. With discrete actions the network outputs one reward per action, so the expectation is
exact and costs nothing; with continuous actions it takes the action as an input and the
expectation is a Monte-Carlo average over actions sampled from the policy.

Both end in a linear layer, ``r(s, a) = <theta_L, phi(s, a)>`` with ``theta_L = [W, b]`` (one
row per output) and ``phi(s, a)`` the layer's input ``h`` with a 1 appended, in row ``a`` of an
otherwise zero matrix when there is one output per action (row 0, the only one, with continuous
actions). ``phi`` is the reward's gradient in ``theta_L``, whose successor features the
``implicit = critic`` variant learns (``critic``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .networks import channels_first, flat_features, image_channels

ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.01), "tanh": nn.Tanh,
               "elu": nn.ELU}


@dataclass(frozen=True)
class RewardNetSpec:
    """A reward network and its optimiser, as a `.brl` file declares it.

    ``kind`` is ``mlp`` (over the flattened observation and the action) or ``atari_cnn`` (the
    paper's Atari reward network: four convolutions of 16 filters, 7x7/3, 5x5/2, 3x3/1, 3x3/1,
    each with batch norm, LeakyReLU(0.01) and dropout, then 64 units).
    """

    kind: str = "mlp"
    hidden: tuple[int, ...] = (256, 256)
    activation: str = "leaky_relu"
    dropout: float = 0.0
    lr: float = 3e-4
    weight_decay: float = 0.0
    batch: int = 64


class RewardNet(nn.Module):
    """``r_theta(s, a)`` for a batch; ``discrete`` nets output one value per action."""

    discrete: bool

    def forward(self, obs: Tensor, action: Tensor) -> Tensor:
        raise NotImplementedError

    def expected(self, obs: Tensor, actions: Tensor) -> Tensor:
        """``E_{a' ~ pi(.|s)} r(s, a')`` over sampled continuous ``actions`` (n, B, dim), averaged
        over the n samples (discrete nets give every action's reward in one pass instead)."""
        raise NotImplementedError

    @property
    def last(self) -> nn.Linear:
        """The last linear layer (``theta_L``)."""
        raise NotImplementedError

    def features(self, obs: Tensor, action: Tensor | None = None) -> Tensor:
        """``h``, the last layer's input: of the state alone when discrete, else of the pair
        (``action`` may be ``(n, B, dim)`` samples, giving ``(n, B, H)``)."""
        raise NotImplementedError

    def last_weights(self) -> Tensor:
        """``theta_L = [W, b]``, shape ``(out, H + 1)``."""
        return torch.cat([self.last.weight, self.last.bias.unsqueeze(-1)], -1)

    def phi(self, obs: Tensor, action: Tensor) -> Tensor:
        """``phi(s, a) = dr(s, a)/dtheta_L``, shape ``(..., out, H + 1)``; differentiable in the
        layers below the last."""
        h = _append_one(self.features(obs, action))
        if self.discrete:
            return self._one_hot(action).unsqueeze(-1) * h.unsqueeze(-2)
        return h.unsqueeze(-2)

    def phi_advantage(self, obs: Tensor, action: Tensor, probs: Tensor | None = None,
                      actions: Tensor | None = None, h: Tensor | None = None) -> Tensor:
        """``phi(s, a) - E_{a' ~ pi(.|s)} phi(s, a')``, with ``probs`` or ``actions`` as in
        ``reward_terms``; ``h = features(obs, action)`` when the caller has it already (discrete
        nets then need no pass of their own, as the expectation is exact)."""
        h = _append_one(self.features(obs, action) if h is None else h)
        if self.discrete:
            weights = self._one_hot(action) - probs.to(h.dtype)
            return weights.unsqueeze(-1) * h.unsqueeze(-2)
        return (h - _append_one(self.features(obs, actions)).mean(0)).unsqueeze(-2)

    def _one_hot(self, action: Tensor) -> Tensor:
        return nn.functional.one_hot(action.long().reshape(-1), self.last.out_features).float()


def _append_one(h: Tensor) -> Tensor:
    return torch.cat([h, torch.ones_like(h[..., :1])], -1)


class _DiscreteHead(RewardNet):
    discrete = True

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, obs: Tensor, action: Tensor) -> Tensor:
        return self.body(obs).gather(-1, action.long().reshape(-1, 1)).squeeze(-1)

    @property
    def last(self) -> nn.Linear:
        return self.body.last

    def features(self, obs: Tensor, action: Tensor | None = None) -> Tensor:
        return self.body.features(obs)


def _mlp(sizes: list[int], activation: str, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class MLPReward(RewardNet):
    """``r(s, a) = MLP([s, a])`` for continuous actions."""

    discrete = False

    def __init__(self, obs_dim: int, action_dim: int, spec: RewardNetSpec) -> None:
        super().__init__()
        self.net = _mlp([obs_dim + action_dim, *spec.hidden, 1], spec.activation, spec.dropout)

    @staticmethod
    def _inputs(obs: Tensor, action: Tensor) -> Tensor:
        """``[s, a]``; for ``(n, B, dim)`` sampled actions each state is repeated n times."""
        flat = flat_features(obs)
        if action.dim() == 3:
            flat = flat.unsqueeze(0).expand(action.shape[0], *flat.shape)
        return torch.cat([flat, action.float()], -1)

    def forward(self, obs: Tensor, action: Tensor) -> Tensor:
        return self.net(self._inputs(obs, action)).squeeze(-1)

    def expected(self, obs: Tensor, actions: Tensor) -> Tensor:
        return self.net(self._inputs(obs, actions)).squeeze(-1).mean(0)

    @property
    def last(self) -> nn.Linear:
        return self.net[-1]

    def features(self, obs: Tensor, action: Tensor | None = None) -> Tensor:
        return self.net[:-1](self._inputs(obs, action))


class _FlatFloat(nn.Module):
    def forward(self, obs: Tensor) -> Tensor:
        return flat_features(obs)


class _FlatMLP(nn.Sequential):
    """An MLP over flattened observations with one output per action."""

    def __init__(self, obs_dim: int, n_actions: int, spec: RewardNetSpec) -> None:
        super().__init__(_FlatFloat(),
                         _mlp([obs_dim, *spec.hidden, n_actions], spec.activation, spec.dropout))

    @property
    def last(self) -> nn.Linear:
        return self[1][-1]

    def features(self, obs: Tensor) -> Tensor:
        return self[1][:-1](self[0](obs))


class AtariRewardCNN(nn.Sequential):
    """The paper's Atari reward body over uint8 frame stacks, one output per action."""

    CONVOLUTIONS = ((7, 3), (5, 2), (3, 1), (3, 1))  # (kernel, stride), 16 filters each

    def __init__(self, frames: int, n_actions: int, spec: RewardNetSpec, screen: int = 84) -> None:
        layers: list[nn.Module] = []
        channels = frames
        for kernel, stride in self.CONVOLUTIONS:
            layers += [nn.Conv2d(channels, 16, kernel, stride), nn.BatchNorm2d(16),
                       nn.LeakyReLU(0.01), nn.Dropout(spec.dropout)]
            channels = 16
        flat = 16 * self.side(screen) ** 2
        layers += [nn.Flatten(), nn.Linear(flat, 64), nn.LeakyReLU(0.01), nn.Linear(64, n_actions)]
        super().__init__(*layers)

    def forward(self, obs: Tensor) -> Tensor:  # type: ignore[override]
        return self.last(self.features(obs))

    @property
    def last(self) -> nn.Linear:
        return self[-1]

    def features(self, obs: Tensor) -> Tensor:
        x = channels_first(obs).float() / 255.0
        for layer in list(self)[:-1]:
            x = layer(x)
        return x

    @classmethod
    def side(cls, screen: int) -> int:
        """The side of the last feature map for square frames of side ``screen``."""
        for kernel, stride in cls.CONVOLUTIONS:
            screen = (screen - kernel) // stride + 1 if screen >= kernel else 0
        return screen

    @classmethod
    def smallest_screen(cls) -> int:
        """The smallest frame it reads: a last map of 2 x 2 (batch norm needs two values per
        channel in a batch of one)."""
        return next(s for s in range(1, 1000) if cls.side(s) >= 2)


def build_reward_net(spec: RewardNetSpec, obs_shape: tuple[int, ...], n_actions: int | None,
                     action_dim: int | None) -> RewardNet:
    """The network for an environment: ``n_actions`` for discrete actions, else ``action_dim``."""
    if spec.kind == "atari_cnn":
        if n_actions is None or len(obs_shape) not in (3, 4):
            raise ValueError("atari_cnn needs stacked image observations and discrete actions")
        return _DiscreteHead(AtariRewardCNN(image_channels(obs_shape), n_actions, spec,
                                            obs_shape[2]))
    obs_dim = int(torch.tensor(obs_shape).prod())
    if n_actions is not None:
        return _DiscreteHead(_FlatMLP(obs_dim, n_actions, spec))
    return MLPReward(obs_dim, action_dim, spec)
