"""The SAC follower of deep SoBiRL (solvers/deep): learning checks on small tasks, the Atari
encoder path, the replay buffer, autoreset handling, reward relabelling and exact resume.

CPU only; the learning tests pin torch to one thread (faster on a loaded 2-core machine, and
the seeded numbers do not depend on the thread count)."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, SyncVectorEnv
from torch.distributions import AffineTransform, Normal, TanhTransform, TransformedDistribution

from solvers.deep.networks import NatureEncoder, make_encoder
from solvers.deep.replay import ReplayBuffer
from solvers.deep.sac import SACAgent, SACConfig, SACLearner

# Small networks and quick updates for the learning tests (both tasks, both action types).
SMALL = SACConfig(hidden=(64, 64), batch_size=128, actor_lr=1e-3, critic_lr=1e-3,
                  alpha_lr=1e-3, learning_starts=500)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def vector_env(env_id: str, n: int = 1, **kwargs) -> SyncVectorEnv:
    return SyncVectorEnv([lambda: gym.make(env_id, **kwargs)] * n,
                         autoreset_mode=AutoresetMode.SAME_STEP)


def parameters(learner: SACLearner) -> list[torch.Tensor]:
    agent = learner.agent
    return [*agent.actor.parameters(), *agent.critic.parameters(),
            *agent.critic_target.parameters(), agent.log_alpha]


def test_continuous_sac_solves_pendulum():
    """Pendulum-v1, 6,000 steps (500 random, then one update per step): the deterministic
    policy's mean return over 5 evaluation episodes is above -400 (random: about -1,200;
    solved: about -150). Checked on seeds 0-5: all at -146 to -143 by 5,000 steps (two were
    still below -400 at 4,500), and -142 to -139 at 6,000 for seeds 1-5."""
    learner = SACLearner(vector_env("Pendulum-v1"), SMALL)
    stats = learner.train(6_000)
    assert stats["alpha"] < 1.0  # the temperature was tuned down from its initial value
    assert learner.evaluate(lambda: gym.make("Pendulum-v1"), episodes=5, seed=1_000) > -400


def test_discrete_sac_learns_cartpole():
    """CartPole-v1, 3,000 steps (500 random, then one update per step): the deterministic
    policy's mean return over 5 evaluation episodes is at least 150 (random: about 20,
    maximum 500). Seeds 0-3 give 236-291 at 3,000 steps."""
    learner = SACLearner(vector_env("CartPole-v1"), SMALL)
    learner.train(3_000)
    assert learner.evaluate(lambda: gym.make("CartPole-v1"), episodes=5, seed=1_000) >= 150


def test_atari_encoder_path():
    """Discrete SAC on fake uint8 frame stacks: shapes, dtypes and one update."""
    observation_space = spaces.Box(0, 255, (4, 84, 84), np.uint8)
    action_space = spaces.Discrete(6)
    assert isinstance(make_encoder(observation_space), NatureEncoder)
    agent = SACAgent(observation_space, action_space, SACConfig.atari(batch_size=8))
    buffer = ReplayBuffer.for_spaces(16, observation_space, action_space)
    assert buffer.obs.dtype == torch.uint8
    assert buffer.transition_bytes == 4 * 84 * 84 + 8 + 4 + 1  # frames stored once

    generator = torch.Generator().manual_seed(0)
    obs = torch.randint(0, 256, (8, 4, 84, 84), dtype=torch.uint8, generator=generator)
    next_obs = torch.randint(0, 256, (8, 4, 84, 84), dtype=torch.uint8, generator=generator)
    features = agent.actor.encoder(obs)
    assert features.shape == (8, 512) and features.dtype == torch.float32
    action = agent.act(obs)
    assert action.shape == (8,) and action.dtype == torch.int64
    assert ((action >= 0) & (action < 6)).all()
    probs = agent.action_probs(obs)
    assert probs.shape == (8, 6)
    torch.testing.assert_close(probs.sum(-1), torch.ones(8))

    buffer.add(obs, action, torch.zeros(8), next_obs, torch.zeros(8, dtype=torch.bool))
    before = [p.clone() for p in agent.actor.parameters()]
    stats = agent.update(buffer.sample(8, generator))
    assert all(math.isfinite(v) for v in stats.values())
    assert any(not torch.equal(b, p) for b, p in zip(before, agent.actor.parameters()))
    assert agent.target_entropy == pytest.approx(0.89 * math.log(6))


def test_replay_buffer_stores_observations_once_and_returns_every_next_obs(tmp_path):
    """Filled like a vector environment (3 copies, episodes of random lengths, the ring
    wrapping twice), every sampled next_obs is the one added, though only the observations
    that do not continue their copy's next row are stored apart, and a checkpoint keeps them."""
    observation_space = spaces.Box(0, 255, (2, 3), np.uint8)
    buffer = ReplayBuffer.for_spaces(20, observation_space, spaces.Discrete(2))
    generator = torch.Generator().manual_seed(0)

    def frame() -> torch.Tensor:
        return torch.randint(0, 256, (2, 3), dtype=torch.uint8, generator=generator)

    current = [frame() for _ in range(3)]
    added = {}  # row -> the next_obs given for it, overwritten as the ring wraps
    for _ in range(17):  # 51 transitions into 20 rows
        following, last = [], []
        for copy in range(3):
            following.append(frame())
            ended = bool(torch.rand(1, generator=generator) < 0.3)
            # an ended episode's next_obs is its final frame; the copy restarts elsewhere
            last.append(frame() if ended else following[copy])
            following[copy] = frame() if ended else following[copy]
        rows = [(buffer.pos + k) % 20 for k in range(3)]
        buffer.add(torch.stack(current), torch.zeros(3, dtype=torch.long), torch.zeros(3),
                   torch.stack(last), torch.zeros(3, dtype=torch.bool))
        added.update(zip(rows, last))
        current = following
    assert len(buffer) == 20 and len(buffer._apart) < 20
    expected = torch.stack([added[row] for row in range(20)])
    assert torch.equal(buffer.next_obs, expected)
    batch = buffer.sample(64, torch.Generator().manual_seed(1))
    rows = torch.randint(20, (64,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(batch.next_obs, expected[rows]) and torch.equal(batch.obs, buffer.obs[rows])

    buffer.save(tmp_path / "replay")
    loaded = ReplayBuffer.for_spaces(20, observation_space, spaces.Discrete(2))
    loaded.load(tmp_path / "replay")
    assert torch.equal(loaded.next_obs, expected)
    with pytest.raises(ValueError, match="3 transitions at a time"):
        loaded.add(torch.stack(current[:2]), torch.zeros(2, dtype=torch.long), torch.zeros(2),
                   torch.stack(current[:2]), torch.zeros(2, dtype=torch.bool))


def test_replay_buffer_round_trip(tmp_path):
    """save/load restores every stored transition and the ring's position (after a wrap)."""
    observation_space = spaces.Box(-1.0, 1.0, (3,), np.float64)
    action_space = spaces.Box(-2.0, 2.0, (2,), np.float32)
    buffer = ReplayBuffer.for_spaces(10, observation_space, action_space)
    assert buffer.obs.dtype == torch.float32
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):  # 12 transitions into 10 rows
        buffer.add(torch.randn(4, 3, generator=generator), torch.randn(4, 2, generator=generator),
                   torch.randn(4, generator=generator), torch.randn(4, 3, generator=generator),
                   torch.rand(4, generator=generator) < 0.5)
    assert (len(buffer), buffer.pos) == (10, 2)
    buffer.save(tmp_path / "replay")

    loaded = ReplayBuffer.for_spaces(10, observation_space, action_space)
    loaded.load(tmp_path / "replay")
    assert (len(loaded), loaded.pos) == (10, 2)
    for name in ("obs", "action", "reward", "next_obs", "terminated"):
        assert torch.equal(getattr(loaded, name), getattr(buffer, name)), name
    first = buffer.sample(5, torch.Generator().manual_seed(1))
    second = loaded.sample(5, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(first, second))

    with pytest.raises(ValueError, match="holds 10"):
        ReplayBuffer.for_spaces(20, observation_space, action_space).load(tmp_path / "replay")


def test_continuous_actions_stay_in_the_box():
    """Sampled, deterministic, random and Monte Carlo actions all lie within the bounds,
    even when the Gaussian saturates the tanh; log-densities are those of the Box's units."""
    observation_space = spaces.Box(-np.inf, np.inf, (5,), np.float32)
    action_space = spaces.Box(np.array([-2.0, 0.0, 10.0], np.float32),
                              np.array([-1.0, 5.0, 10.5], np.float32))
    agent = SACAgent(observation_space, action_space, SACConfig(hidden=(16,)))
    low, high = torch.from_numpy(action_space.low), torch.from_numpy(action_space.high)
    obs = torch.randn(64, 5, generator=torch.Generator().manual_seed(0))

    mean, log_std = agent.actor(obs)
    actions, log_probs = agent.sample_actions(obs, 7)
    assert actions.shape == (7, 64, 3) and log_probs.shape == (7, 64)
    reference = TransformedDistribution(
        Normal(mean, log_std.exp()),
        [TanhTransform(), AffineTransform(agent.center, agent.half_range)])
    torch.testing.assert_close(log_probs, reference.log_prob(actions).sum(-1),
                               rtol=1e-4, atol=1e-4)

    with torch.no_grad():
        for p in agent.actor.parameters():
            p.mul_(100.0)  # push the pre-tanh Gaussian far past +-1
    for action in (agent.act(obs), agent.act(obs, deterministic=True),
                   agent.random_actions(64, torch.Generator().manual_seed(1)),
                   agent.sample_actions(obs, 3)[0]):
        assert ((action >= low) & (action <= high)).all()


def test_transitions_follow_same_step_autoreset():
    """Truncations are stored as non-terminal, with the true last observation as next_obs
    (checked against Pendulum's dynamics); terminations are flagged; episodes never link."""
    learner = SACLearner(vector_env("Pendulum-v1", 2, max_episode_steps=5),
                         SACConfig(learning_starts=100))
    learner.train(20)  # random actions: 2 truncated episodes per copy
    buffer = learner.buffer
    assert learner.episode_lengths == [5] * 4 and not buffer.terminated[:20].any()
    theta = torch.atan2(buffer.obs[:20, 1], buffer.obs[:20, 0])
    speed = buffer.obs[:20, 2] + (15.0 * torch.sin(theta) + 3.0 * buffer.action[:20, 0]) * 0.05
    torch.testing.assert_close(buffer.next_obs[:20, 2], speed.clamp(-8.0, 8.0))
    # Rows are (step, copy) in order: within an episode, next_obs is the next row's obs.
    within = torch.arange(18) // 2 % 5 != 4
    next_obs, following = buffer.next_obs[:18], buffer.obs[2:20]
    assert torch.equal(next_obs[within], following[within])
    assert (next_obs[~within] != following[~within]).any(-1).all()

    cartpole = SACLearner(vector_env("CartPole-v1", 2), SACConfig(learning_starts=1_000))
    cartpole.train(400)  # random play: every episode ends with the pole falling
    assert int(cartpole.buffer.terminated[:400].sum()) == len(cartpole.episode_returns) > 10


def test_learner_needs_same_step_autoreset():
    envs = SyncVectorEnv([lambda: gym.make("CartPole-v1")],
                         autoreset_mode=AutoresetMode.NEXT_STEP)
    with pytest.raises(ValueError, match="SAME_STEP"):
        SACLearner(envs)


def test_reward_fn_replaces_the_true_reward():
    """With a reward function, learning never reads the stored true reward: scaling and
    shifting the environment's reward changes nothing but the stored true rewards."""
    config = SACConfig(hidden=(32, 32), batch_size=32, learning_starts=100, seed=3)

    def learner(scale: float) -> SACLearner:
        envs = SyncVectorEnv(
            [lambda: gym.wrappers.TransformReward(gym.make("Pendulum-v1"),
                                                  lambda r: scale * r + 5.0)] * 2,
            autoreset_mode=AutoresetMode.SAME_STEP)
        return SACLearner(envs, config)

    def zero(obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return torch.zeros(obs.shape[0])

    plain, scaled = learner(1.0), learner(100.0)
    plain.train(300, zero)
    scaled.train(300, zero)
    assert all(torch.equal(a, b) for a, b in zip(parameters(plain), parameters(scaled)))
    assert not torch.equal(plain.buffer.reward, scaled.buffer.reward)

    true_plain, true_scaled = learner(1.0), learner(100.0)
    true_plain.train(300)
    true_scaled.train(300)
    assert not torch.equal(parameters(true_plain)[0], parameters(true_scaled)[0])


@pytest.mark.parametrize("env_id, config", [
    ("Pendulum-v1", SACConfig(hidden=(32, 32), batch_size=32, learning_starts=100,
                              buffer_size=300, seed=7)),
    ("CartPole-v1", SACConfig(hidden=(32, 32), batch_size=32, learning_starts=100,
                              buffer_size=300, tau=1.0, target_update_interval=25, seed=7)),
])
def test_resume_is_bit_identical(tmp_path, env_id, config):
    """Train 2k steps straight, or k steps, reset, checkpoint, then k steps in a fresh
    learner loaded from the checkpoint: every parameter, optimiser moment, buffer row (the
    ring wraps) and statistic is identical. The reward is a fixed function of (obs, action)."""
    def reward_fn(obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return obs.sum(-1) - action.float().reshape(obs.shape[0], -1).pow(2).sum(-1)

    straight = SACLearner(vector_env(env_id, 2), config)
    straight.train(200, reward_fn)
    straight.reset_envs(1_234)
    straight.train(200, reward_fn)

    first = SACLearner(vector_env(env_id, 2), config)
    first.train(200, reward_fn)
    first.reset_envs(1_234)
    first.save(tmp_path)
    resumed = SACLearner(vector_env(env_id, 2), config)
    resumed.load(tmp_path)
    resumed.train(200, reward_fn)

    assert all(torch.equal(a, b) for a, b in zip(parameters(straight), parameters(resumed)))
    for opt in ("actor_opt", "critic_opt"):
        moments = [getattr(learner.agent, opt).state_dict()["state"][0]["exp_avg_sq"]
                   for learner in (straight, resumed)]
        assert torch.equal(*moments)
    for name in ("obs", "action", "reward", "next_obs", "terminated"):
        assert torch.equal(getattr(straight.buffer, name), getattr(resumed.buffer, name)), name
    assert straight.episode_returns == resumed.episode_returns
    assert straight.steps == resumed.steps == 400
    assert straight.agent.updates == resumed.agent.updates


def test_target_updates_and_fixed_temperature():
    """tau = 1 copies the critics every `target_update_interval` updates; a fixed alpha stays."""
    observation_space = spaces.Box(-1.0, 1.0, (4,), np.float32)
    action_space = spaces.Discrete(3)
    config = SACConfig(hidden=(8,), batch_size=16, tau=1.0, target_update_interval=2,
                       autotune_alpha=False, init_alpha=0.3)
    agent = SACAgent(observation_space, action_space, config)
    buffer = ReplayBuffer.for_spaces(16, observation_space, action_space)
    generator = torch.Generator().manual_seed(0)
    buffer.add(torch.rand(16, 4, generator=generator), torch.randint(3, (16,)),
               torch.randn(16, generator=generator), torch.rand(16, 4, generator=generator),
               torch.zeros(16, dtype=torch.bool))

    def same() -> bool:
        return all(torch.equal(t, p) for t, p in
                   zip(agent.critic_target.parameters(), agent.critic.parameters()))

    agent.update(buffer.sample(16, generator))
    assert not same()
    agent.update(buffer.sample(16, generator))
    assert same()
    assert agent.alpha.item() == pytest.approx(0.3)
