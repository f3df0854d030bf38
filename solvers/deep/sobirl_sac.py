"""Deep SoBiRL (the paper's Algorithm 5) and its baselines on gymnasium environments.

One outer iteration:

1. the follower, SAC, takes a block of environment steps, learning from rewards that the current
   reward network ``r_theta`` assigns to the replayed transitions (with ``implicit = critic``,
   the successor-feature critic then takes ``critic_updates`` TD steps on the same buffer);
2. new fragment pairs are cut from rollouts of the follower's policy and labelled by the oracle,
   as many as the query schedule says (``PreferenceSpec.pairs_due``);
3. ``r_theta`` takes gradient steps on the Bradley-Terry loss over the queue of pairs, plus the
   implicit term once the warm-up is over:

       loss = mean(BCE) + mean(stopgrad(BCE) * (1/alpha) * sum_t [r(s_t,a_t) - E_pi r(s_t,.)])

   (``implicit = public``, the paper's code: ``dQ*/dtheta`` replaced by ``grad r_theta``; its
   ``1/alpha`` is ``1/(alpha scale)`` here, as SAC learns from ``(r - shift) / scale``), or the
   same with ``r`` replaced by its discounted sum over the rest of the fragment
   (``implicit = fragment``, a Monte-Carlo ``dQ/dtheta`` truncated at the fragment's end), or
   (``implicit = critic``) with the last layer's ``dQ/dtheta_L`` taken from a learnt
   successor-feature critic (``critic.py``) and the public form for the other layers.

``drlhf_sac`` is the same loop without the implicit term (Christiano et al.'s DRLHF) and
``sac_true`` trains SAC on the true reward (the ceiling). Every ``checkpoint_every`` iterations
the whole state is saved; the environments are reset with seeds derived from the run's seed and
the iteration at those points, in resumed and uninterrupted runs alike, so a resumed run
reproduces the uninterrupted one. A run that stops (Ctrl-C, ``time_limit``, its last iteration)
saves the state of its last whole iteration too, and a checkpoint records the run's problem,
seed, solver and options, so that ``--resume`` refuses to continue another run's.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..output import _jsonable, remove_path
from ..registry import SolverError
from ..result import Monitor, SolveResult, interrupts_deferred, stop_reason
from ..resume import check_identity, is_identity, number, whole
from .critic import SuccessorCritic, policy_expectation
from .envs import episode_limit, make_env, make_vector_env, unusable
from .preferences import (
    FragmentCollector,
    Fragments,
    FragmentShortage,
    Oracle,
    PreferenceQueue,
    bradley_terry,
    concat,
    preference_accuracy,
)
from .problem import DeepProblem
from .replay import DamagedCheckpoint, first_line
from .reward_model import RewardNet, build_reward_net
from .sac import SACAgent, SACConfig, SACLearner
from .spec import option_rules

CHECKPOINT = "checkpoint"
# stopped_because when the query could not find its fragments (``extra["failure"]`` says why):
# the run keeps its last whole iteration, and the command line exits 1
NO_FRAGMENTS = "no_fragments"
# ... and when a checkpoint could not be written (a full disk): the run stops there too
CANNOT_SAVE = "cannot_save"
SOLVER_NAMES = {"sobirl": "sobirl_sac", "drlhf": "drlhf_sac", "sac_true": "sac_true"}
# options a resumed run may change: they say how long to go on and what to record, not what
# is computed
RESUME_MAY_CHANGE = frozenset({"outer", "time_limit", "checkpoint_every", "eval_every",
                               "eval_episodes"})


def _action_shape(space) -> tuple[int | None, int | None]:
    """(number of discrete actions, None) or (None, action dimension)."""
    if hasattr(space, "n"):
        return int(space.n), None
    return None, int(np.prod(space.shape))


class RewardModel:
    """``r_theta``, its optimiser, and the standardisation SAC sees (mean 0, std 1 over the
    states in the queue), refreshed after every reward update."""

    def __init__(self, problem: DeepProblem, obs_shape: tuple[int, ...], action_space,
                 device: torch.device) -> None:
        n_actions, action_dim = _action_shape(action_space)
        spec = problem.reward_net
        self.net: RewardNet = build_reward_net(spec, obs_shape, n_actions, action_dim).to(device)
        self.optimiser = torch.optim.AdamW(self.net.parameters(), lr=spec.lr,
                                           weight_decay=spec.weight_decay)
        self.shift = torch.zeros((), device=device)
        self.scale = torch.ones((), device=device)

    def __call__(self, obs: Tensor, action: Tensor) -> Tensor:
        """Standardised rewards for SAC: no gradient, evaluation mode (no dropout)."""
        self.net.train(False)
        with torch.no_grad():
            return (self.net(obs, action) - self.shift) / self.scale

    def restandardise(self, frags: Fragments) -> None:
        self.net.train(False)
        with torch.no_grad():
            values = self.net(*frags.steps())
        self.shift = values.mean()
        self.scale = values.std().clamp(min=1e-6)

    def state(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "optimiser": self.optimiser.state_dict(),
                "shift": self.shift, "scale": self.scale}

    def load(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.shift, self.scale = state["shift"], state["scale"]


def reward_terms(model: RewardModel, agent: SACAgent, frags: Fragments, kind: str,
                 gamma: float, samples: int, critic: SuccessorCritic | None = None
                 ) -> tuple[Tensor, Tensor | None]:
    """Per fragment, the predicted return ``sum_t r(s_t, a_t)`` and (unless ``kind = off``) the
    implicit term ``(1/(alpha scale)) sum_t [r(s_t, a_t) - E_{a'~pi} r(s_t, a')]``, both
    differentiable in theta, from one pass of the network over the steps (continuous actions
    add one over the sampled actions for the expectation).

    With ``kind = fragment`` the bracket is summed discounted over the rest of the fragment.
    With ``kind = critic`` it is ``<sg(theta_L), dphi> + <theta_L, sg(dpsi)>``,
    ``dphi = phi(s_t, a_t) - E_pi phi(s_t, .)`` and ``dpsi`` the critic's ``psi(s_t, a_t) -
    E_pi psi(s_t, .)`` (``sg``: stop-gradient): the last layer's gradient is the critic's
    ``dQ/dtheta_L`` difference, every other layer's is the public form's."""
    n, length = frags.rewards.shape
    obs, actions = frags.steps()
    net = model.net
    if kind == "off":
        return net(obs, actions).view(n, length).sum(-1), None
    probs, sampled = policy_expectation(agent, obs, samples, net.discrete)
    h = net.features(obs, actions)
    out = net.last(h)  # (steps, |A|) with discrete actions, else (steps, 1)
    taken = out.gather(-1, actions.long().reshape(-1, 1)).squeeze(-1) if net.discrete \
        else out.squeeze(-1)
    if kind == "critic":
        theta = net.last_weights()
        dphi = net.phi_advantage(obs, actions, probs, sampled, h=h)
        dpsi = critic.advantage(obs, actions, probs, sampled)
        advantage = (theta.detach() * dphi).sum((-2, -1)) + (theta * dpsi).sum((-2, -1))
    elif net.discrete:
        advantage = taken - (out * probs.to(out.dtype)).sum(-1)
    else:
        advantage = taken - net.expected(obs, sampled)
    advantage = advantage.view(n, length)
    if kind == "fragment":  # sum_{t' >= t} gamma^(t'-t) of the advantage, then summed over t
        weights = (1 - gamma ** torch.arange(length, 0, -1, device=advantage.device,
                                             dtype=advantage.dtype)) / (1 - gamma)
        advantage = advantage * weights
    # SAC learns from (r - shift) / scale, so its soft-optimal policy's score carries 1 / scale
    return taken.view(n, length).sum(-1), advantage.sum(-1) / (agent.alpha * model.scale)


def run(problem: DeepProblem, options: dict[str, Any], monitor: Monitor,
        variant: str = "sobirl", resume: Path | None = None, out: Path | None = None,
        defines: dict[str, str] | None = None, source_sha256: str | None = None
        ) -> SolveResult:
    """Algorithm 5 (``variant = sobirl``), DRLHF (``drlhf``) or SAC on the true reward
    (``sac_true``), from scratch or from the checkpoint in ``resume``.

    A run stopped halfway through an outer iteration (Ctrl-C, SIGTERM, ``time_limit`` during
    a query) returns to the end of the last whole iteration, so that its record and its last
    checkpoint agree; with checkpoints on, that state is saved when the run ends, however it
    ends. ``defines``: the command line's ``-D`` overrides (texts), kept in the checkpoint so
    that a resumed run compiles the file as this one did; ``source_sha256``: the file's, kept
    so that the command line can say when a resumed run's file has changed."""
    device = problem.device
    seed = problem.seed
    spec = problem.preferences
    learned = variant != "sac_true"
    identity = {"problem": problem.name, "seed": seed, "solver": SOLVER_NAMES[variant],
                "options": _jsonable(dict(options)), "defines": dict(defines or {}),
                "environment": _jsonable(dataclasses.asdict(problem.env)),
                "follower": {"discount": problem.discount,
                             "temperature": problem.temperature or "auto"},
                "reward_net": _jsonable(dataclasses.asdict(problem.reward_net)),
                **({"source_sha256": source_sha256} if source_sha256 else {})}
    for _, message in option_rules(options):  # options given by --set: not checked before
        raise SolverError(message)
    problem_with_env = unusable(problem.env)
    if problem_with_env is not None:
        why, hint = problem_with_env
        raise SolverError(f"environment `{problem.env.env_id}`: {why}"
                          + (f"; {hint}" if hint else ""))
    limit = episode_limit(problem.env)
    if learned and limit is not None and spec.fragment > limit:
        raise SolverError(f"fragments of {spec.fragment} steps are longer than the episodes of "
                          f"`{problem.env.env_id}` (at most {limit} steps), and a fragment "
                          f"never spans two episodes: set `fragment` to at most {limit}")
    progress = _read_progress(resume, identity, options["outer"]) if resume else None
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    envs = make_vector_env(problem.env, options["envs"], seed)
    obs_shape = envs.single_observation_space.shape
    changes = sac_overrides(options, problem)
    config = SACConfig.atari(**changes) if problem.env.atari else SACConfig(**changes)
    learner = SACLearner(envs, config, device)
    agent = learner.agent
    model = RewardModel(problem, obs_shape, envs.single_action_space, device)
    oracle = Oracle(spec.scale, spec.noise, spec.clip)
    queue, heldout = PreferenceQueue(spec.queue), PreferenceQueue(max(1, spec.queue // 10))
    collector = FragmentCollector(make_vector_env(problem.env, 1, seed + 10_007),
                                  spec.fragment, device)
    implicit = options.get("implicit", "off") if variant == "sobirl" else "off"
    critic = SuccessorCritic(
        envs.single_observation_space, envs.single_action_space, model.net, config.hidden,
        problem.discount, options["critic_lr"], options["critic_tau"], config.batch_size, seed,
        device) if implicit == "critic" else None

    history: dict[str, list[float]] = {
        "iteration": [], "objective": [], "hypergrad_norm": [], "time": [], "env_steps": [],
        "query_steps": [], "queries": [], "train_return": [], "eval_return": [],
        "eval_step": [], "preference_accuracy": [], "alpha": [], "critic_td_error": []}
    k, queries, carry, wall_before = 0, 0, 0.0, 0.0
    saved_k = None  # the iteration of the checkpoint on disk, if this run wrote or read it
    resumed_at: list[int] = []  # the iterations at which --resume took the run up
    if progress is not None:
        history = progress.pop("history")
        resumed_at = [*progress["resumed_at"], progress["iteration"]]
        _load(resume, learner, model, critic, queue, heldout, generator, spec.fragment,
              obs_shape)
        k, queries, wall_before = progress["iteration"], progress["queries"], progress["wall"]
        carry, collector.steps, saved_k = progress["query_carry"], progress["query_steps"], k
        _reset(learner, collector, seed, k)
    elif learned:  # warm-up: initial pairs from random rollouts, trained for many epochs
        # (the action space's own sampler is seeded apart from the run: draw from ours)
        warmup = torch.Generator(device).manual_seed(seed + 30_011)
        name = SOLVER_NAMES[variant]
        monitor.note(f"{name}: {spec.initial_pairs} initial preference pairs from random "
                     "rollouts (the warm-up; Ctrl-C now saves nothing)")
        queries += _query(collector, lambda o: agent.random_actions(o.shape[0], warmup),
                          spec.initial_pairs, oracle, queue, heldout, generator,
                          spec.heldout_every, queries)
        epochs = spec.warmup_epochs
        monitor.note(f"{name}: the reward network's warm-up, {epochs} "
                     f"epoch{'s' if epochs != 1 else ''} on those pairs")
        _train_reward(model, agent, queue, options, epochs=spec.warmup_epochs, implicit="off",
                      gamma=problem.discount, generator=generator)

    start = time.perf_counter() - wall_before  # the run's clock, its earlier parts included
    invoked = time.perf_counter()  # time_limit counts this invocation's time only

    def stop() -> None:
        reason = stop_reason(options, invoked, monitor)
        if reason is not None:
            raise _Stopped(reason)

    def snapshot() -> None:
        nonlocal last  # set before a held interrupt is raised: the buffer's mark moved with it
        with interrupts_deferred():
            last = _Snapshot.take(k, queries, carry, time.perf_counter() - start, history,
                                  learner, model, critic, queue, heldout, generator, collector)

    def save() -> None:
        """The checkpoint of ``last``; a failed write ends the run as a failure."""
        _reset(learner, collector, seed, k)
        try:
            _save(out / CHECKPOINT, last.progress(identity) | {"resumed_at": resumed_at},
                  history, learner, model, critic, queue, heldout, generator)
        except OSError as exc:
            raise _CannotSave(f"cannot write the checkpoint in {out / CHECKPOINT}: "
                              f"{exc.strerror or exc}") from None
        except RuntimeError:  # how torch reports a short write
            raise _CannotSave(f"cannot write the checkpoint in {out / CHECKPOINT}: the write "
                              "was cut short (a full disk, or a limit on file sizes)") from None

    checkpoints = out is not None and options["checkpoint_every"] > 0
    stopped, failure = "max_iterations", ""
    reward_fn = model if learned else None
    last: _Snapshot
    snapshot()
    try:
        try:
            while k < options["outer"]:
                # 1. a block of SAC steps on the current reward model
                steps_before = learner.steps
                learner.train(options["sac_steps"], reward_fn)
                critic_error = math.nan
                if critic is not None:  # trained from the start: ready after the warm-up
                    critic_error = critic.update(learner.buffer, model.net, agent,
                                                 options["critic_updates"], options["samples"])
                loss, grad_norm = math.nan, math.nan
                if learned:
                    # 2. new pairs from the current policy (as many as the schedule says),
                    # labelled by the oracle
                    due, carry = spec.pairs_due(steps_before, carry, queries)
                    queries += _query(collector, lambda o: agent.act(o), due, oracle, queue,
                                      heldout, generator, spec.heldout_every, queries, stop)
                    # 3. reward-model steps: BCE plus the implicit term after the warm-up
                    on = "off" if implicit == "off" or \
                        learner.steps < options["implicit_warmup"] else implicit
                    loss, grad_norm = _train_reward(model, agent, queue, options,
                                                    epochs=options["reward_epochs"],
                                                    implicit=on, gamma=problem.discount,
                                                    generator=generator, critic=critic)
                k += 1
                _record(history, k, loss, grad_norm, start, learner, collector, queries,
                        heldout, model, agent, critic_error)
                if options["eval_every"] and k % options["eval_every"] == 0:
                    history["eval_step"].append(learner.steps)
                    history["eval_return"].append(learner.evaluate(
                        partial(make_env, problem.env), options["eval_episodes"],
                        seed + 20_011 + k))
                monitor.update(k, loss if learned else -_last(history["train_return"]),
                               grad_norm)
                snapshot()
                if checkpoints and k % options["checkpoint_every"] == 0:
                    save()
                    saved_k = k
                reason = stop_reason(options, invoked, monitor)
                if reason is not None:
                    stopped = reason
                    break
        except (KeyboardInterrupt, _Stopped, FragmentShortage, _CannotSave) as exc:
            # back to the last whole iteration
            if isinstance(exc, (FragmentShortage, _CannotSave)):
                stopped = NO_FRAGMENTS if isinstance(exc, FragmentShortage) else CANNOT_SAVE
                failure = str(exc)
            else:
                stopped = exc.reason if isinstance(exc, _Stopped) else "interrupted"
            try:
                with interrupts_deferred():  # a Ctrl-C now is held until the restore is done
                    k, queries, carry, history = last.restore(learner, model, critic, queue,
                                                              heldout, generator, collector)
            except KeyboardInterrupt:
                stopped = "interrupted"
        if checkpoints and k != saved_k and stopped != CANNOT_SAVE:
            try:
                with interrupts_deferred():
                    save()
            except KeyboardInterrupt:
                stopped = "interrupted"
            except _CannotSave as exc:
                stopped, failure = CANNOT_SAVE, str(exc)
    finally:
        envs.close()
        collector.env.close()

    parameters = torch.cat([p.detach().flatten().cpu() for p in model.net.parameters()])
    final = history["objective"][-1] if history["objective"] else math.nan
    return SolveResult(
        x=parameters, policy=torch.empty(0), objective=final, history=history,
        iterations=k, stopped_because=stopped,
        extra={"reward_net": model.net.state_dict(), "env_steps": learner.steps,
               "queries": queries, "time": time.perf_counter() - start,
               **({"failure": failure} if failure else {}),
               **({"resumed_at": resumed_at} if resumed_at else {})})


def sac_overrides(options: dict[str, Any], problem: DeepProblem) -> dict[str, Any]:
    """SACConfig fields set by the problem and the solver options (0 keeps the default)."""
    out: dict[str, Any] = {"gamma": problem.discount, "seed": problem.seed}
    names = {"sac_batch": ("batch_size",), "sac_lr": ("actor_lr", "critic_lr", "alpha_lr"),
             "learning_starts": ("learning_starts",), "buffer": ("buffer_size",),
             "update_every": ("update_every",), "target_update": ("target_update_interval",)}
    for name, fields in names.items():
        if options.get(name):
            out |= dict.fromkeys(fields, options[name])
    if options.get("sac_width"):
        out["hidden"] = (options["sac_width"],) * 2
    if problem.temperature is not None:  # a fixed-temperature follower
        out |= {"autotune_alpha": False, "init_alpha": problem.temperature}
    return out


def _last(values: list[float]) -> float:
    return values[-1] if values else math.nan


def _query(collector: FragmentCollector, policy, pairs: int, oracle: Oracle,
           queue: PreferenceQueue, heldout: PreferenceQueue, generator: torch.Generator,
           heldout_every: int, asked: int, stop: Callable[[], None] | None = None) -> int:
    """Collect and label ``pairs`` new pairs; every ``heldout_every``-th query of the run
    (``asked`` were made before) goes to ``heldout``. ``stop`` may end a long rollout."""
    if pairs == 0:
        return 0
    frags = collector.collect(2 * pairs, policy, stop)
    first = Fragments(frags.obs[0::2], frags.actions[0::2], frags.rewards[0::2])
    second = Fragments(frags.obs[1::2], frags.actions[1::2], frags.rewards[1::2])
    labels = oracle.label(first, second, generator)
    index = torch.arange(asked, asked + pairs)
    held = index % heldout_every == heldout_every - 1 if heldout_every else index < 0
    train = ~held
    if bool(train.any()):
        queue.push(_take(first, train), _take(second, train), labels[train], oracle)
    if bool(held.any()):
        heldout.push(_take(first, held), _take(second, held), labels[held], oracle)
    return pairs


def _take(frags: Fragments, mask: Tensor) -> Fragments:
    index = mask.nonzero().squeeze(-1).to(frags.obs.device)
    return Fragments(frags.obs[index], frags.actions[index], frags.rewards[index])


def _train_reward(model: RewardModel, agent: SACAgent, queue: PreferenceQueue,
                  options: dict[str, Any], epochs: int, implicit: str, gamma: float,
                  generator: torch.Generator, critic: SuccessorCritic | None = None
                  ) -> tuple[float, float]:
    """``epochs`` passes over the queue in minibatches; returns the last mean BCE and the norm
    of the last gradient."""
    batch = options["reward_batch"]
    samples = options.get("samples", 1)  # drlhf_sac has no implicit term, so no `samples`
    loss_value, grad_norm = math.nan, math.nan
    model.net.train()
    for _ in range(epochs):
        order = torch.randperm(len(queue), generator=generator)
        for begin in range(0, len(queue), batch):
            first, second, labels = queue.batch(order[begin:begin + batch])
            # both fragments of every pair in one forward pass (one batch-norm batch)
            returns, term = reward_terms(model, agent, concat(first, second), implicit, gamma,
                                         samples, critic)
            pairs = len(first)
            bce = bradley_terry(returns[:pairs], returns[pairs:], labels)
            loss = bce.mean()
            if term is not None:
                loss = loss + (bce.detach() * (term[:pairs] + term[pairs:])).mean()
            model.optimiser.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.net.parameters(),
                                                             options["clip_grad"]))
            model.optimiser.step()
            loss_value = float(bce.detach().mean())
    if len(queue):
        model.restandardise(queue.first)
    return loss_value, grad_norm


def _record(history, k, loss, grad_norm, start, learner, collector, queries, heldout, model,
            agent, critic_error) -> None:
    history["iteration"].append(k)
    history["objective"].append(loss)
    history["hypergrad_norm"].append(grad_norm)
    history["time"].append(time.perf_counter() - start)
    history["env_steps"].append(learner.steps)
    history["query_steps"].append(collector.steps)
    history["queries"].append(queries)
    recent = learner.episode_returns[-10:]
    history["train_return"].append(float(np.mean(recent)) if recent else math.nan)
    accuracy, decided = preference_accuracy(model.net, heldout)
    history["preference_accuracy"].append(accuracy)
    # (a checkpoint written before these records existed resumes without them)
    history.setdefault("preference_accuracy_pairs", []).append(decided)
    history.setdefault("heldout_pairs", []).append(len(heldout))
    history["alpha"].append(float(agent.alpha))
    # (a checkpoint written before this record existed resumes without it)
    history.setdefault("critic_td_error", []).append(critic_error)


def _reset(learner: SACLearner, collector: FragmentCollector, seed: int, k: int) -> None:
    """Fresh episodes at a checkpoint, with seeds fixed by the run's seed and the iteration."""
    learner.reset_envs(seed + 1_000 * k + 1)
    collector.reset(seed + 1_000 * k + 2)


class _CannotSave(Exception):
    """A checkpoint could not be written: the run stops at its last whole iteration."""


class _Stopped(Exception):
    """Raised inside a long query phase when the run must stop (``time_limit``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Snapshot:
    """The run at the end of its last whole outer iteration, kept in memory so that a run
    stopped halfway through the next one can return to it: every network, optimiser, counter
    and random state (copies), the preference queues (their tensors are replaced, never
    changed in place, so references do) and a mark in the replay buffer."""

    k: int
    queries: int
    carry: float
    wall: float
    query_steps: int
    history: dict[str, list[float]]
    learner: dict[str, Any]
    model: dict[str, Any]
    critic: dict[str, Any] | None
    queue: dict[str, Tensor]
    heldout: dict[str, Tensor]
    generator: Tensor
    torch_rng: dict[str, Tensor]

    @classmethod
    def take(cls, k: int, queries: int, carry: float, wall: float, history, learner: SACLearner,
             model: RewardModel, critic: SuccessorCritic | None, queue: PreferenceQueue,
             heldout: PreferenceQueue, generator: torch.Generator,
             collector: FragmentCollector) -> _Snapshot:
        learner.buffer.mark()
        return cls(k, queries, carry, wall, collector.steps,
                   {key: list(values) for key, values in history.items()},
                   copy.deepcopy(learner.state_dict()), copy.deepcopy(model.state()),
                   copy.deepcopy(critic.state()) if critic is not None else None,
                   queue.tensors(), heldout.tensors(), generator.get_state(),
                   _rng_states(learner.device))

    def restore(self, learner: SACLearner, model: RewardModel, critic: SuccessorCritic | None,
                queue: PreferenceQueue, heldout: PreferenceQueue, generator: torch.Generator,
                collector: FragmentCollector) -> tuple[int, int, float, dict[str, list[float]]]:
        """Put the objects back; returns the iteration, queries, carry and history."""
        learner.load_state_dict(self.learner)
        learner.buffer.rollback()
        model.load(self.model)
        if critic is not None:
            critic.load(self.critic)
        fragment, obs_shape = collector.length, tuple(learner.buffer.obs.shape[1:])
        queue.load_tensors(self.queue, fragment, obs_shape)
        heldout.load_tensors(self.heldout, fragment, obs_shape)
        generator.set_state(self.generator)
        _set_rng_states(self.torch_rng, learner.device)
        collector.steps = self.query_steps
        return self.k, self.queries, self.carry, self.history

    def progress(self, identity: dict[str, Any]) -> dict[str, Any]:
        """``progress.json`` of a checkpoint of this state, but its history."""
        return {"iteration": self.k, "queries": self.queries, "query_carry": self.carry,
                "query_steps": self.query_steps, "wall": self.wall, "run": identity}


def _save(path: Path, progress: dict[str, Any], history, learner: SACLearner,
          model: RewardModel, critic: SuccessorCritic | None, queue: PreferenceQueue,
          heldout: PreferenceQueue, generator: torch.Generator) -> None:
    """Everything a resumed run needs; tensors only (``torch.load(weights_only=True)``) and
    strict JSON (NaN written as null), written to a temporary folder and renamed so a kill
    never leaves half a checkpoint. ``progress``: the iteration, the queries and rollout steps
    so far, the query schedule's fractional carry, the wall time and the run's identity."""
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    # leftovers of a save that a kill cut short: between the renames, `old` is the checkpoint
    if not path.exists() and (old / "progress.json").is_file():
        old.rename(path)
    remove_path(old)
    remove_path(tmp)
    tmp.mkdir(parents=True)
    state = {"model": model.state(), "queue": queue.tensors(), "heldout": heldout.tensors(),
             "generator": generator.get_state(), **_rng_states(learner.device)}
    if critic is not None:
        state["critic"] = critic.state()
    try:
        torch.save(state, tmp / "state.pt")
        learner.save(tmp / "learner")
        (tmp / "progress.json").write_text(
            json.dumps(_jsonable(progress | {"history": history}), allow_nan=False))
    except BaseException:  # a full disk, an interrupt: no half-written folder stays behind
        remove_path(tmp)
        raise
    with interrupts_deferred():  # never between the two renames
        if path.exists():
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)


def _rng_states(device: torch.device) -> dict[str, Tensor]:
    """torch's global generators that the run draws from: the CPU's, and the GPU's when it
    runs there (the reward network's dropout)."""
    states = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng_states(states: dict[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(states["torch_rng"])
    if device.type == "cuda" and "cuda_rng" in states:
        torch.cuda.set_rng_state(states["cuda_rng"], device)


def find_checkpoint(folder: Path) -> Path | None:
    """The checkpoint in a run's output folder: ``checkpoint/``, or the previous one that a
    kill between ``_save``'s two renames left as ``checkpoint.old``; None without either."""
    for name in (CHECKPOINT, CHECKPOINT + ".old"):
        if (Path(folder) / name / "progress.json").is_file():
            return Path(folder) / name
    return None


def saved_run(checkpoint: Path) -> dict[str, Any] | None:
    """The identity of the run that saved ``checkpoint`` (a run's ``checkpoint/`` folder):
    ``{"problem": str, "seed": int, "solver": str, "options": {name: value}, "defines":
    {name: text}}``, the options as that run resolved them (non-finite numbers as None), the
    defines as its ``-D`` gave them. None when the checkpoint predates
    this record or cannot be read; never raises, so a caller can offer the saved options as
    defaults before the run checks the checkpoint properly."""
    try:
        run = json.loads((Path(checkpoint) / "progress.json").read_text()).get("run")
    except (OSError, ValueError, AttributeError):
        return None
    return run if is_identity(run) else None


def _damaged(path: Path, why: str) -> SolverError:
    return SolverError(f"the checkpoint in {path} is damaged or incomplete ({why}), so it "
                       "cannot be resumed; start afresh with another --out (or --force)")


def _read_progress(path: Path, identity: dict[str, Any], outer: int) -> dict[str, Any]:
    """``progress.json``, checked: the run it belongs to must be this one (but for the
    options in ``RESUME_MAY_CHANGE``) and its counters whole; null history entries read back
    as NaN."""
    try:
        progress = json.loads((path / "progress.json").read_text())
    except (OSError, ValueError) as exc:
        raise _damaged(path, f"progress.json: {first_line(exc)}") from None
    if not isinstance(progress, dict):
        raise _damaged(path, "progress.json does not hold an object")
    saved = progress.get("run")
    if saved is not None:
        if not is_identity(saved):
            raise _damaged(path, "progress.json: `run` is garbled")
        check_identity(f"the checkpoint in {path}", saved, identity, RESUME_MAY_CHANGE)
    k = progress.get("iteration")
    if not whole(k):
        raise _damaged(path, f"progress.json: `iteration` is {json.dumps(k)}, not a count "
                             "of iterations (a whole number, 0 or more)")
    saved_outer = saved["options"].get("outer") if saved is not None else None
    if number(saved_outer) and k > saved_outer:
        raise _damaged(path, f"progress.json: iteration {k} is past the saved run's outer = "
                             f"{saved_outer}")
    history = progress.get("history")
    for name, check in (("queries", whole), ("wall", number)):
        if not check(progress.get(name)):
            raise _damaged(path, f"progress.json: `{name}` is missing or not a number")
    progress.setdefault("resumed_at", [])  # (absent from checkpoints older than it)
    if not (isinstance(progress["resumed_at"], list) and all(map(whole, progress["resumed_at"]))):
        raise _damaged(path, "progress.json: `resumed_at` is not a list of iterations")
    progress.setdefault("query_carry", 0.0)
    if not number(progress["query_carry"]):
        raise _damaged(path, "progress.json: `query_carry` is not a number")
    # one entry per iteration in each record, but the evaluations' (every eval_every) and
    # critic_td_error (absent from checkpoints older than it)
    if not (isinstance(history, dict) and all(
            isinstance(v, list) and all(x is None or number(x) for x in v)
            for v in history.values()) and len(history.get("iteration", [])) == k
            and all(len(values) == k for name, values in history.items()
                    if name not in ("eval_step", "eval_return", "critic_td_error"))
            and len(history.get("eval_step", [])) == len(history.get("eval_return", []))):
        raise _damaged(path, f"progress.json: its `history` is missing, garbled or not "
                             f"{k} iterations long")
    # (a checkpoint written before `query_steps` was kept has it as the last recorded value)
    steps = history.get("query_steps") or [0]
    progress.setdefault("query_steps", steps[-1])
    if not whole(progress["query_steps"]):
        raise _damaged(path, "progress.json: `query_steps` is not a whole number")
    progress["history"] = {name: [math.nan if x is None else x for x in values]
                           for name, values in history.items()}
    if k > outer:
        raise SolverError(f"the checkpoint in {path} is at iteration {k}, past this run's "
                          f"outer = {outer}; resume with --set outer=N for an N above {k}")
    return progress


def _load(path: Path, learner: SACLearner, model: RewardModel, critic: SuccessorCritic | None,
          queue: PreferenceQueue, heldout: PreferenceQueue, generator: torch.Generator,
          fragment: int, obs_shape: tuple[int, ...]) -> None:
    """Load the checkpoint's tensors into this run's objects: a SolverError that says whether
    a file is damaged or the checkpoint belongs to another run."""
    try:
        _load_state(path, learner, model, critic, queue, heldout, generator, fragment,
                    obs_shape)
    except DamagedCheckpoint as exc:
        raise _damaged(path, str(exc)) from None
    except (ValueError, RuntimeError) as exc:  # other sizes, networks or format
        raise SolverError(f"the checkpoint in {path} does not fit this run "
                          f"({first_line(exc)}); resume with the file and options it was saved "
                          "with, or start afresh with another --out") from None


def _load_state(path: Path, learner: SACLearner, model: RewardModel,
                critic: SuccessorCritic | None, queue: PreferenceQueue,
                heldout: PreferenceQueue, generator: torch.Generator, fragment: int,
                obs_shape: tuple[int, ...]) -> None:
    device = learner.device
    state = _read_tensors(path, "state.pt", "cpu")
    learned = _read_tensors(path, "learner/learner.pt", device)
    with _entries("learner/learner.pt"):
        learner.load_state_dict(learned)
    try:
        learner.buffer.load(path / "learner" / "replay")
    except DamagedCheckpoint as exc:
        raise DamagedCheckpoint(f"learner/replay/{exc}") from None
    copies = learner.buffer.copies
    if copies and copies != learner.envs.num_envs:
        raise ValueError(f"its replay buffer was filled by {copies} environment copies, this "
                         f"run has {learner.envs.num_envs} (--set envs={copies})")
    with _entries("state.pt"):
        model.load(state["model"])
        model.shift, model.scale = model.shift.to(device), model.scale.to(device)
        if critic is not None:
            if "critic" not in state:
                raise SolverError(f"the checkpoint in {path} was saved without "
                                  "`implicit = critic`, so it has no critic to resume")
            critic.load(state["critic"])
        queue.load_tensors({k: v.to(device) for k, v in state["queue"].items()}, fragment,
                           obs_shape)
        heldout.load_tensors({k: v.to(device) for k, v in state["heldout"].items()},
                             fragment, obs_shape)
        generator.set_state(state["generator"])
        # dropout in the reward network draws from torch's generators
        _set_rng_states(state, device)


def _read_tensors(path: Path, name: str, device: torch.device | str) -> dict[str, Any]:
    """A checkpoint's torch file, tensors only; DamagedCheckpoint if it cannot be read."""
    file = path / name
    if not file.is_file():
        raise DamagedCheckpoint(f"{name} is missing")
    try:
        state = torch.load(file, map_location=device, weights_only=True)
    except Exception as exc:  # torch reports a cut or garbled file in many ways
        raise DamagedCheckpoint(f"{name} cannot be read: "
                                f"{first_line(exc).split('. ')[0]}") from None
    if not isinstance(state, dict):
        raise DamagedCheckpoint(f"{name} does not hold a dictionary")
    return state


@contextlib.contextmanager
def _entries(name: str) -> Iterator[None]:
    """Report a missing or ill-typed entry of the file ``name`` as damage."""
    try:
        yield
    except DamagedCheckpoint as exc:
        raise DamagedCheckpoint(f"{name}: {exc}") from None
    except (KeyError, TypeError, AttributeError, IndexError) as exc:
        raise DamagedCheckpoint(f"{name} lacks an entry or holds a garbled one "
                                f"({first_line(exc)})") from None

