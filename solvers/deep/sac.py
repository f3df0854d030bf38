"""Soft Actor-Critic, the follower of deep SoBiRL (issue 5).

``SACAgent`` is SAC with automatic temperature (Haarnoja et al. 2018, "Soft Actor-Critic
Algorithms and Applications", Algorithm 1) for continuous ``Box`` actions, and its discrete
form (Christodoulou 2019, "Soft Actor-Critic for Discrete Action Settings") for ``Discrete``
actions. One update is the paper's gradient step::

    y        = r + gamma (1 - terminated) V_target(s')
    V(s')    = E_{a'~pi}[min_i Q_target_i(s', a') - alpha log pi(a'|s')]
    critics  <- minimise sum_i (Q_i(s, a) - y)^2
    actor    <- minimise E_{a~pi}[alpha log pi(a|s) - min_i Q_i(s, a)]
    alpha    <- minimise log(alpha) (H(pi(.|s)) - target entropy)
    targets  <- (1 - tau) targets + tau critics, every ``target_update_interval`` updates

Continuous actions: a tanh-squashed Gaussian, rescaled to the Box; ``log pi`` is the density
of the action in the environment's units (the change of variables through tanh and the
rescaling). Critics see actions normalised to [-1, 1]. The expectation in ``V(s')`` uses one
reparameterised sample. Discrete actions: a categorical actor and critics with one output per
action, so ``V(s')`` and the entropy are exact sums over actions.

``r`` is whatever reward the batch carries: ``SACLearner`` relabels each sampled batch with
the caller's reward function (the current reward network of the outer RLHF loop), and only
the ``sac_true`` baseline learns from the stored true reward.

``SACLearner`` owns a gymnasium vector environment created with
``autoreset_mode=AutoresetMode.SAME_STEP``: when an episode ends, ``step`` already returns the
next episode's first observation and the last one sits in ``info["final_obs"]``, which is the
``next_obs`` stored. So no transition links two episodes, and a truncated episode bootstraps
from its true last observation (only ``terminated`` stops bootstrapping).

Randomness: network initialisation, the agent's action noise and the learner's minibatch and
warm-up draws come from separate streams derived from ``config.seed``; environments are reset
with seeds ``seed, seed + 1, ...`` (gymnasium's vector convention). The same seed gives the
same numbers on the same device. Resuming from ``SACLearner.save`` is exact (bit-identical
parameters) when the checkpoint was taken right after ``reset_envs(seed)``: loading resets the
environments with that same seed, so the interrupted and the uninterrupted run see the same
observations. A checkpoint taken mid-episode still loads, but the episodes then in flight are
restarted, not continued.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, SyncVectorEnv, VectorEnv
from torch import Tensor, nn

from .networks import make_encoder, mlp
from .replay import Batch, ReplayBuffer

RewardFn = Callable[[Tensor, Tensor], Tensor]

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0
LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
STAT_NAMES = ("critic_loss", "actor_loss", "alpha_loss", "alpha", "entropy", "q")
# Roles of the random streams derived from config.seed.
INIT, AGENT_NOISE, LEARNER = range(3)


def derive_seed(seed: int, role: int) -> int:
    """An independent seed for one random stream of a run."""
    return int(np.random.SeedSequence([seed, role]).generate_state(1)[0])


@dataclass(frozen=True)
class SACConfig:
    """SAC hyper-parameters. Defaults are the usual MuJoCo settings; ``atari()`` the
    discrete-action Atari ones. Step counts are environment steps summed over the vector
    environment's copies, except ``target_update_interval`` (gradient updates)."""

    hidden: tuple[int, ...] = (256, 256)  # MLP widths after the observation encoder
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    alpha_lr: float = 3e-4
    adam_eps: float = 1e-8
    batch_size: int = 256
    gamma: float = 0.99
    tau: float = 0.005  # target <- (1 - tau) target + tau online; 1.0 is a hard copy
    target_update_interval: int = 1  # gradient updates between target updates
    buffer_size: int = 1_000_000
    learning_starts: int = 5_000  # uniformly random actions, and no updates, before this
    update_every: int = 1  # environment steps between rounds of updates
    gradient_steps: int = 1  # updates per round
    init_alpha: float = 1.0
    autotune_alpha: bool = True  # False keeps alpha = init_alpha (a fixed-temperature follower)
    target_entropy: float | None = None  # None: -dim(A), or entropy_ratio * ln|A| if discrete
    entropy_ratio: float = 0.89
    seed: int = 0

    @classmethod
    def atari(cls, **changes: Any) -> SACConfig:
        """Discrete SAC on Atari: batch 64, lr 1e-4, an update every 4 steps, a hard target
        copy every 8,000 steps (2,000 updates), target entropy 0.89 ln|A|, 20k random steps.
        The buffer holds 100k transitions (2.8 GB of frames, see ``replay``), the whole of a
        100k-step run; raise it where memory allows."""
        atari = cls(hidden=(), actor_lr=1e-4, critic_lr=1e-4, alpha_lr=1e-4, adam_eps=1e-4,
                    batch_size=64, tau=1.0, target_update_interval=2_000, buffer_size=100_000,
                    learning_starts=20_000, update_every=4)
        return replace(atari, **changes)


class GaussianActor(nn.Module):
    """The pre-tanh Gaussian of a continuous policy: ``(mean, log_std)`` per action dim."""

    def __init__(self, observation_space: spaces.Box, action_dim: int,
                 hidden: tuple[int, ...]) -> None:
        super().__init__()
        self.encoder = make_encoder(observation_space)
        self.head = mlp(self.encoder.out_dim, hidden, 2 * action_dim)

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        mean, log_std = self.head(self.encoder(obs)).chunk(2, dim=-1)
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)


class CategoricalActor(nn.Module):
    """The logits of a discrete policy."""

    def __init__(self, observation_space: spaces.Box, n_actions: int,
                 hidden: tuple[int, ...]) -> None:
        super().__init__()
        self.encoder = make_encoder(observation_space)
        self.head = mlp(self.encoder.out_dim, hidden, n_actions)

    def forward(self, obs: Tensor) -> Tensor:
        return self.head(self.encoder(obs))


class QNetwork(nn.Module):
    """``Q(s, a)`` of a normalised continuous action (``action_dim`` inputs, one output), or
    ``Q(s, .)`` for all discrete actions (no action input, ``n_out`` outputs)."""

    def __init__(self, observation_space: spaces.Box, action_dim: int, n_out: int,
                 hidden: tuple[int, ...]) -> None:
        super().__init__()
        self.encoder = make_encoder(observation_space)
        self.head = mlp(self.encoder.out_dim + action_dim, hidden, n_out)

    def forward(self, obs: Tensor, action: Tensor | None = None) -> Tensor:
        features = self.encoder(obs)
        if action is not None:
            features = torch.cat([features, action], dim=-1)
        return self.head(features)


class TwinQ(nn.Module):
    """Two independent critics; their minimum counters Q over-estimation."""

    def __init__(self, observation_space: spaces.Box, action_dim: int, n_out: int,
                 hidden: tuple[int, ...]) -> None:
        super().__init__()
        self.q1 = QNetwork(observation_space, action_dim, n_out, hidden)
        self.q2 = QNetwork(observation_space, action_dim, n_out, hidden)

    def forward(self, obs: Tensor, action: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.q1(obs, action), self.q2(obs, action)


class SACAgent:
    """SAC's networks, optimisers and temperature, for one observation and action space."""

    def __init__(self, observation_space: spaces.Box,
                 action_space: spaces.Box | spaces.Discrete,
                 config: SACConfig = SACConfig(), device: torch.device | str = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        self.action_space = action_space
        self.discrete = isinstance(action_space, spaces.Discrete)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(config.seed, INIT))
            if self.discrete:
                n = int(action_space.n)
                self.actor: nn.Module = CategoricalActor(observation_space, n, config.hidden)
                self.critic = TwinQ(observation_space, 0, n, config.hidden)
                default_target = config.entropy_ratio * math.log(n)
            else:
                if len(action_space.shape) != 1 or not action_space.is_bounded("both"):
                    raise ValueError(f"SAC needs a bounded 1-D Box of actions, got {action_space}")
                dim = action_space.shape[0]
                self.actor = GaussianActor(observation_space, dim, config.hidden)
                self.critic = TwinQ(observation_space, dim, 1, config.hidden)
                default_target = -float(dim)
                # The Box's bounds, for rescaling tanh outputs (continuous agents only).
                self.low, self.high = (torch.as_tensor(bound, dtype=torch.float32,
                                                       device=self.device)
                                       for bound in (action_space.low, action_space.high))
                self.center = (self.high + self.low) / 2
                self.half_range = (self.high - self.low) / 2
                self.log_scale = self.half_range.log().sum()
        self.actor.to(self.device)
        self.critic.to(self.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.target_entropy = (default_target if config.target_entropy is None
                               else config.target_entropy)
        self.log_alpha = torch.tensor(math.log(config.init_alpha), device=self.device,
                                      requires_grad=config.autotune_alpha)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), config.actor_lr,
                                          eps=config.adam_eps)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), config.critic_lr,
                                           eps=config.adam_eps)
        self.alpha_opt = (torch.optim.Adam([self.log_alpha], config.alpha_lr, eps=config.adam_eps)
                          if config.autotune_alpha else None)
        self.generator = torch.Generator(self.device)
        self.generator.manual_seed(derive_seed(config.seed, AGENT_NOISE))
        self.updates = 0

    @property
    def alpha(self) -> Tensor:
        """The entropy temperature, a detached 0-d tensor on the agent's device."""
        return self.log_alpha.detach().exp()

    # ----- the policy -----

    def _squashed_sample(self, obs: Tensor, n: int | None = None) -> tuple[Tensor, Tensor]:
        """Reparameterised actions normalised to [-1, 1] (shape ``(B, dim)``, or ``(n, B, dim)``
        with ``n``) and the log-density of the corresponding actions in the Box's units."""
        mean, log_std = self.actor(obs)
        shape = mean.shape if n is None else (n, *mean.shape)
        noise = torch.randn(shape, generator=self.generator, device=self.device)
        u = mean + log_std.exp() * noise
        # log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), stable for large |u|.
        log_jacobian = 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))
        log_prob = (-0.5 * noise.pow(2) - log_std - LOG_SQRT_2PI - log_jacobian).sum(-1)
        return torch.tanh(u), log_prob - self.log_scale

    def _to_box(self, normalised: Tensor) -> Tensor:
        return torch.clamp(self.center + self.half_range * normalised, self.low, self.high)

    def _normalise(self, action: Tensor) -> Tensor:
        return ((action - self.center) / self.half_range).clamp(-1.0, 1.0)

    def _log_policy(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """Discrete ``(pi(.|s), log pi(.|s))``, each ``(B, |A|)``."""
        log_probs = torch.log_softmax(self.actor(obs), dim=-1)
        return log_probs.exp(), log_probs

    @torch.no_grad()
    def act(self, obs: Tensor, deterministic: bool = False) -> Tensor:
        """Actions for a batch of observations: sampled, or the mode (evaluation).
        Continuous actions are in the Box's units and within its bounds."""
        if self.discrete:
            logits = self.actor(obs)
            if deterministic:
                return logits.argmax(dim=-1)
            probs = logits.softmax(dim=-1)
            return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
        if deterministic:
            return self._to_box(torch.tanh(self.actor(obs)[0]))
        return self._to_box(self._squashed_sample(obs)[0])

    def random_actions(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` actions drawn uniformly from the action space (the warm-up policy), with
        ``generator`` on any device; returned on the agent's."""
        if self.discrete:
            return torch.randint(int(self.action_space.n), (n,), generator=generator,
                                 device=generator.device).to(self.device)
        uniform = torch.rand((n, *self.low.shape), generator=generator, device=generator.device)
        return self._to_box(2.0 * uniform.to(self.device) - 1.0)

    def action_probs(self, obs: Tensor) -> Tensor:
        """Discrete ``pi(.|s)``, shape ``(B, |A|)``, for expectations over the policy.
        Differentiable: wrap in ``torch.no_grad()`` when only values are needed."""
        return self.actor(obs).softmax(dim=-1)

    def sample_actions(self, obs: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """``n`` continuous actions per observation, ``(n, B, dim)`` in the Box's units, with
        their log-densities ``(n, B)``: Monte Carlo expectations over the policy.
        Reparameterised and differentiable, like ``action_probs``."""
        normalised, log_prob = self._squashed_sample(obs, n)
        return self._to_box(normalised), log_prob

    # ----- the update -----

    def _soft_value(self, obs: Tensor, alpha: Tensor) -> Tensor:
        """``V(s) = E_{a~pi}[min_i Q_target_i(s, a) - alpha log pi(a|s)]`` (no grad)."""
        if self.discrete:
            probs, log_probs = self._log_policy(obs)
            q = torch.min(*self.critic_target(obs))
            return (probs * (q - alpha * log_probs)).sum(-1)
        action, log_prob = self._squashed_sample(obs)
        q = torch.min(*self.critic_target(obs, action)).squeeze(-1)
        return q - alpha * log_prob

    def _q_taken(self, obs: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        """Both critics' ``Q(s, a)`` at the batch's actions, shape ``(B,)`` each."""
        if self.discrete:
            index = action.unsqueeze(-1)
            q1, q2 = self.critic(obs)
            return q1.gather(-1, index).squeeze(-1), q2.gather(-1, index).squeeze(-1)
        q1, q2 = self.critic(obs, self._normalise(action))
        return q1.squeeze(-1), q2.squeeze(-1)

    def _actor_loss(self, obs: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
        """``E_{a~pi}[alpha log pi(a|s) - min_i Q_i(s, a)]`` and the (detached) entropy per
        state; gradients reach the actor only."""
        if self.discrete:
            probs, log_probs = self._log_policy(obs)
            with torch.no_grad():
                q = torch.min(*self.critic(obs))
            loss = (probs * (alpha * log_probs - q)).sum(-1).mean()
            return loss, -(probs * log_probs).sum(-1).detach()
        action, log_prob = self._squashed_sample(obs)
        self.critic.requires_grad_(False)
        q = torch.min(*self.critic(obs, action)).squeeze(-1)
        self.critic.requires_grad_(True)
        return (alpha * log_prob - q).mean(), -log_prob.detach()

    @staticmethod
    def _step(optimiser: torch.optim.Optimizer, loss: Tensor) -> None:
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    def update(self, batch: Batch) -> dict[str, float]:
        """One gradient step on the critics, the actor and the temperature, then the target
        update when due. ``batch.reward`` is the reward learnt from (already relabelled)."""
        config = self.config
        alpha = self.alpha
        # Soft policy evaluation.
        with torch.no_grad():
            next_value = self._soft_value(batch.next_obs, alpha)
            target = batch.reward + config.gamma * (1.0 - batch.terminated) * next_value
        q1, q2 = self._q_taken(batch.obs, batch.action)
        critic_loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
        self._step(self.critic_opt, critic_loss)

        # Soft policy improvement, against the critics just updated.
        actor_loss, entropy = self._actor_loss(batch.obs, alpha)
        self._step(self.actor_opt, actor_loss)

        # Temperature: alpha rises while the entropy is below its target, and falls above it.
        alpha_loss = (self.log_alpha * (entropy - self.target_entropy)).mean()
        if self.alpha_opt is not None:
            self._step(self.alpha_opt, alpha_loss)

        # Target critics: Polyak averaging, or a hard copy.
        self.updates += 1
        if self.updates % config.target_update_interval == 0:
            with torch.no_grad():
                for target_p, p in zip(self.critic_target.parameters(), self.critic.parameters()):
                    target_p.lerp_(p, config.tau)  # exactly p when tau = 1
        stats = torch.stack([critic_loss.detach(), actor_loss.detach(), alpha_loss.detach(),
                             alpha, entropy.mean(), q1.detach().mean()])
        return dict(zip(STAT_NAMES, stats.tolist()))

    # ----- checkpoints -----

    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs, as tensors and plain values only (loadable with
        ``torch.load(weights_only=True)``)."""
        state = {
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "critic_target": self.critic_target.state_dict(),
            "actor_opt": self.actor_opt.state_dict(),
            "critic_opt": self.critic_opt.state_dict(),
            "log_alpha": self.log_alpha.detach().clone(),
            "updates": self.updates,
            "generator": self.generator.get_state(),
        }
        if self.alpha_opt is not None:
            state["alpha_opt"] = self.alpha_opt.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (of an agent built with the same config)."""
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.critic_target.load_state_dict(state["critic_target"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        if self.alpha_opt is not None:
            self.alpha_opt.load_state_dict(state["alpha_opt"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.updates = state["updates"]
        self.generator.set_state(state["generator"].cpu())


class SACLearner:
    """SAC's interaction loop: steps a vector environment, fills the replay buffer and
    updates the agent on batches relabelled by the caller's reward function."""

    def __init__(self, envs: VectorEnv, config: SACConfig = SACConfig(),
                 device: torch.device | str = "cpu") -> None:
        if envs.metadata.get("autoreset_mode") != AutoresetMode.SAME_STEP:
            raise ValueError("SACLearner needs a vector env created with "
                             "autoreset_mode=gymnasium.vector.AutoresetMode.SAME_STEP")
        self.envs = envs
        self.config = config
        self.device = torch.device(device)
        observation_space, action_space = envs.single_observation_space, envs.single_action_space
        self.agent = SACAgent(observation_space, action_space, config, self.device)
        self.buffer = ReplayBuffer.for_spaces(config.buffer_size, observation_space,
                                              action_space, self.device)
        self.generator = torch.Generator(self.device)
        self.generator.manual_seed(derive_seed(config.seed, LEARNER))
        self.steps = 0  # environment steps, summed over the copies
        self.episode_returns: list[float] = []  # true returns of the finished episodes
        self.episode_lengths: list[int] = []
        self.reset_envs(config.seed)

    def _tensor(self, obs: np.ndarray) -> Tensor:
        return torch.as_tensor(obs, dtype=self.buffer.obs.dtype, device=self.device)

    def reset_envs(self, seed: int) -> None:
        """Start fresh episodes in every copy (seeds ``seed, seed + 1, ...``); the episodes
        in flight are dropped from the statistics. Checkpoint right after this call."""
        obs, _ = self.envs.reset(seed=seed)
        self._obs = self._tensor(obs)
        self._reset_seed = seed
        self._returns = np.zeros(self.envs.num_envs)
        self._lengths = np.zeros(self.envs.num_envs, dtype=np.int64)

    def _step_envs(self, action: Tensor) -> None:
        """One vector step; stores a transition per copy and records finished episodes."""
        obs, reward, terminated, truncated, info = self.envs.step(action.cpu().numpy())
        done = np.flatnonzero(terminated | truncated)
        next_obs = self._tensor(obs)
        last_obs = next_obs
        if done.size:
            final = obs.copy()
            final[done] = np.stack([info["final_obs"][i] for i in done])
            last_obs = self._tensor(final)
        self.buffer.add(self._obs, action,
                        torch.as_tensor(reward, dtype=torch.float32, device=self.device),
                        last_obs, torch.as_tensor(terminated, device=self.device))
        self._obs = next_obs
        self._returns += reward
        self._lengths += 1
        for i in done:
            self.episode_returns.append(float(self._returns[i]))
            self.episode_lengths.append(int(self._lengths[i]))
        self._returns[done] = 0.0
        self._lengths[done] = 0

    def _sample(self, reward_fn: RewardFn | None) -> Batch:
        batch = self.buffer.sample(self.config.batch_size, self.generator)
        if reward_fn is None:
            return batch
        with torch.no_grad():
            reward = reward_fn(batch.obs, batch.action)
        return batch._replace(reward=reward.reshape(self.config.batch_size).float())

    def train(self, steps: int, reward_fn: RewardFn | None = None) -> dict[str, float]:
        """Run ``steps`` environment steps (a multiple of the number of copies) with their
        updates. ``reward_fn(obs, action) -> (B,)`` relabels every sampled batch; ``None``
        learns from the true reward. Returns the last update's statistics, and the number and
        mean true return of the episodes finished during the call."""
        n = self.envs.num_envs
        if steps % n:
            raise ValueError(f"steps ({steps}) must be a multiple of the {n} environments")
        config = self.config
        finished_before = len(self.episode_returns)
        stats: dict[str, float] = {}
        for _ in range(steps // n):
            if self.steps < config.learning_starts:
                action = self.agent.random_actions(n, self.generator)
            else:
                action = self.agent.act(self._obs)
            self._step_envs(action)
            before, self.steps = self.steps, self.steps + n
            if self.steps >= config.learning_starts:
                rounds = self.steps // config.update_every - before // config.update_every
                for _ in range(rounds * config.gradient_steps):
                    stats = self.agent.update(self._sample(reward_fn))
        finished = self.episode_returns[finished_before:]
        stats["episodes"] = len(finished)
        stats["mean_return"] = float(np.mean(finished)) if finished else math.nan
        return stats

    def evaluate(self, env_fn: Callable[[], gym.Env], episodes: int, seed: int) -> float:
        """Mean true return of the deterministic policy over ``episodes`` episodes, one per
        fresh environment (seeds ``seed, seed + 1, ...``). Draws no training randomness."""
        envs = SyncVectorEnv([env_fn] * episodes, autoreset_mode=AutoresetMode.SAME_STEP)
        obs, _ = envs.reset(seed=seed)
        returns = np.zeros(episodes)
        running = np.ones(episodes, dtype=bool)
        while running.any():
            action = self.agent.act(self._tensor(obs), deterministic=True)
            obs, reward, terminated, truncated, _ = envs.step(action.cpu().numpy())
            returns += reward * running
            running &= ~(terminated | truncated)
        envs.close()
        return float(returns.mean())

    # ----- checkpoints -----

    def state_dict(self) -> dict[str, Any]:
        """The agent, counters, random state and episode statistics (not the buffer)."""
        return {
            "agent": self.agent.state_dict(),
            "generator": self.generator.get_state(),
            "steps": self.steps,
            "reset_seed": self._reset_seed,
            "episode_returns": torch.tensor(self.episode_returns, dtype=torch.float64),
            "episode_lengths": torch.tensor(self.episode_lengths, dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` and reset the environments with the seed of the last
        ``reset_envs`` before it, so a checkpoint taken right after that reset resumes exactly."""
        self.agent.load_state_dict(state["agent"])
        self.generator.set_state(state["generator"].cpu())
        self.steps = state["steps"]
        self.episode_returns = state["episode_returns"].tolist()
        self.episode_lengths = state["episode_lengths"].tolist()
        self.reset_envs(state["reset_seed"])

    def save(self, directory: str | Path) -> None:
        """Write ``learner.pt`` (tensors only) and the replay buffer (``replay/``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), directory / "learner.pt")
        self.buffer.save(directory / "replay")

    def load(self, directory: str | Path) -> None:
        """Read back what ``save`` wrote, without unpickling anything but tensors."""
        directory = Path(directory)
        state = torch.load(directory / "learner.pt", map_location=self.device, weights_only=True)
        self.load_state_dict(state)
        self.buffer.load(directory / "replay")
