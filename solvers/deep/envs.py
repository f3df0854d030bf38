"""Gymnasium environments for deep problems: MuJoCo and classic control, and Atari.

A `.brl` file names an environment by its id (``gym("HalfCheetah-v5")``). The id is data: it
must already be in gymnasium's registry (after ale_py registers the Atari games), and ids of the
``module:Name`` form, which would make gymnasium import a module, are refused. Vector
environments reset in the same step (``AutoresetMode.SAME_STEP``): the observation that ends an
episode arrives in ``info["final_obs"]`` and the one returned is already the next episode's, so a
stored transition never links two episodes.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import gymnasium as gym
import numpy as np

ATARI_PREFIX = "ALE/"

_registered = False


def _register() -> None:
    """Make the Atari ids known to gymnasium (MuJoCo and classic control are built in)."""
    global _registered
    if not _registered:
        import ale_py

        gym.register_envs(ale_py)
        _registered = True


def _route_mujoco_warnings(env_id: str) -> None:
    """MuJoCo's own warning handler writes ``MUJOCO_LOG.TXT`` into the working directory
    (HalfCheetah's model warns of a deprecated attribute each time it is built): its warnings
    become Python warnings instead, shown once. A handler someone else installed is kept."""
    entry = getattr(gym.registry.get(env_id), "entry_point", None)
    if not (isinstance(entry, str) and entry.startswith("gymnasium.envs.mujoco.")):
        return
    import mujoco

    if mujoco.get_mju_user_warning() is None:
        mujoco.set_mju_user_warning(_mujoco_warning)


def _mujoco_warning(message: str) -> None:
    try:  # called from C: an exception (warnings as errors) must not escape into MuJoCo
        warnings.warn(f"MuJoCo: {message}", RuntimeWarning, stacklevel=1)
    except Exception:  # noqa: BLE001 - a warning filtered to an error is dropped
        pass


def known_ids() -> list[str]:
    """Every environment id a `.brl` file may name."""
    _register()
    return sorted(name for name in gym.registry if ":" not in name)


def check_id(env_id: str) -> str | None:
    """Why ``env_id`` cannot be used, or None when it can."""
    if ":" in env_id:
        return "ids of the form `module:Name` are not allowed (they would import a module)"
    _register()
    if env_id not in gym.registry:
        return "not a registered gymnasium environment"
    return None


# gymnasium's families whose every environment has Box observations and Discrete or bounded
# Box actions: known without making one (a MuJoCo model prints deprecation warnings when made)
_SUITED_FAMILIES = ("gymnasium.envs.mujoco.", "gymnasium.envs.classic_control.")


def unusable(spec: EnvSpec) -> tuple[str, str | None] | None:
    """Why the deep solvers cannot run on this environment, and a hint, or None when they
    can: it must be made (optional dependencies such as Box2D installed) and have ``Box``
    observations and ``Discrete`` or bounded 1-D ``Box`` actions, which is what SAC and the
    reward networks take. Atari games, MuJoCo and classic control always qualify; others are
    made once to see."""
    problem = check_id(spec.env_id)
    if problem is not None:
        return problem, None
    if spec.atari:
        return None
    entry = getattr(gym.registry.get(spec.env_id), "entry_point", None)
    if isinstance(entry, str) and entry.startswith(_SUITED_FAMILIES):
        return None
    try:
        with warnings.catch_warnings():  # a probe: the run itself shows gymnasium's warnings
            warnings.simplefilter("ignore")
            env = gym.make(spec.env_id, **_make_kwargs(spec))
    except gym.error.DependencyNotInstalled as exc:
        return "it needs a package that is not installed", str(exc).strip()
    except Exception as exc:  # noqa: BLE001 - gymnasium fails in many ways (moved ids, jax...)
        text = str(exc).strip()
        return (f"gymnasium cannot make it ({type(exc).__name__})",
                text.splitlines()[0] if text else None)
    try:
        obs, action = env.observation_space, env.action_space
    finally:
        env.close()
    if not isinstance(obs, gym.spaces.Box):
        return (f"its observations are {obs}", "the deep solvers take Box observations "
                "(vectors or images), as in MuJoCo, classic control and Atari")
    if not (isinstance(action, gym.spaces.Discrete) or (
            isinstance(action, gym.spaces.Box) and len(action.shape) == 1
            and action.is_bounded("both"))):
        return f"its actions are {action}", "SAC takes Discrete actions or a bounded 1-D Box"
    return None


def episode_limit(spec: EnvSpec) -> int | None:
    """The most steps an episode can last (the time limit), or None when there is none.
    Fragments never span two episodes, so they cannot be longer than this."""
    if spec.max_episode_steps is not None:
        return spec.max_episode_steps
    if spec.atari:  # make_vector_env's frame cap, in agent steps
        return 27_000
    return gym.registry[spec.env_id].max_episode_steps if spec.env_id in gym.registry else None


def is_atari(env_id: str) -> bool:
    return env_id.startswith(ATARI_PREFIX)


def atari_game(env_id: str) -> str:
    """``ALE/BeamRider-v5`` -> ``beam_rider``, the name ale_py's vector environment takes."""
    name = env_id[len(ATARI_PREFIX):].split("-")[0]
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


@dataclass(frozen=True)
class EnvSpec:
    """How to build an environment: the id and, for Atari, the usual preprocessing.

    The defaults are the preprocessing of the paper's Atari runs: grey 84 x 84 frames, 4
    frames skipped (max-pooled over the last two) and 4 stacked, up to 30 no-op starts, sticky
    actions with probability 0.25 (the v5 games' default). ``max_episode_steps`` overrides the
    registered time limit (None keeps it).
    """

    env_id: str
    frame_skip: int = 4
    frame_stack: int = 4
    screen: int = 84
    grey: bool = True
    noop_max: int = 30
    sticky: float = 0.25
    max_episode_steps: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def atari(self) -> bool:
        return is_atari(self.env_id)


def make_vector_env(spec: EnvSpec, n_envs: int, seed: int) -> gym.vector.VectorEnv:
    """``n_envs`` copies of the environment, reset with seeds ``seed, seed + 1, ...``.

    Atari uses ale_py's own vector environment (preprocessing in C++, one thread per core);
    everything else gymnasium's synchronous vector environment. Rewards are never clipped here:
    the oracle decides whether it sees clipped rewards.
    """
    problem = check_id(spec.env_id)
    if problem is not None:
        raise ValueError(f"environment `{spec.env_id}`: {problem}")
    if spec.atari:
        from ale_py.vector_env import AtariVectorEnv

        frames = (spec.max_episode_steps or 27_000) * spec.frame_skip
        env = AtariVectorEnv(
            atari_game(spec.env_id), n_envs,
            frameskip=spec.frame_skip, stack_num=spec.frame_stack,
            img_height=spec.screen, img_width=spec.screen, grayscale=spec.grey,
            noop_max=spec.noop_max, repeat_action_probability=spec.sticky,
            reward_clipping=False, max_num_frames_per_episode=frames,
            autoreset_mode=gym.vector.AutoresetMode.SAME_STEP, num_threads=min(n_envs, 2),
            **spec.extra,
        )
    else:
        _route_mujoco_warnings(spec.env_id)
        env = gym.vector.SyncVectorEnv(
            [partial(gym.make, spec.env_id, **_make_kwargs(spec)) for _ in range(n_envs)],
            autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
        )
    env.reset(seed=seed)
    return env


def make_env(spec: EnvSpec) -> gym.Env:
    """One environment with the same observations as ``make_vector_env``'s copies, for
    evaluation. Atari games are ale_py's vector environment with one copy behind the
    single-environment interface, so the preprocessing is the very same code."""
    if not spec.atari:
        problem = check_id(spec.env_id)
        if problem is not None:
            raise ValueError(f"environment `{spec.env_id}`: {problem}")
        _route_mujoco_warnings(spec.env_id)
        return gym.make(spec.env_id, **_make_kwargs(spec))
    return _OneCopy(make_vector_env(spec, 1, 0))


def _make_kwargs(spec: EnvSpec) -> dict[str, Any]:
    """``gym.make``'s keywords for a non-Atari environment."""
    kwargs = dict(spec.extra)
    if spec.max_episode_steps is not None:
        kwargs["max_episode_steps"] = spec.max_episode_steps
    return kwargs


class _OneCopy(gym.Env):
    """A one-copy vector environment seen as a plain environment."""

    def __init__(self, vector: gym.vector.VectorEnv) -> None:
        self.vector = vector
        self.observation_space = vector.single_observation_space
        self.action_space = vector.single_action_space

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = self.vector.reset(seed=seed, options=options)
        return obs[0], info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.vector.step(np.asarray([action]))
        return obs[0], float(reward[0]), bool(terminated[0]), bool(truncated[0]), info

    def close(self) -> None:
        self.vector.close()
