"""The deep solvers' registry entries: capabilities and options, without importing gymnasium.

The registry imports every solver module to list and check options; the algorithm itself
(``solvers.deep.sobirl_sac``) is imported only when a deep problem is solved.
"""

from __future__ import annotations

from typing import Any

from ..registry import Capabilities, Option, SolverSpec
from ..result import Monitor, SolveResult

DEEP = Capabilities(
    model_based=False,
    environments=frozenset({"gymnasium"}),
    forms=frozenset({"preference_loss"}),
    features=frozenset({"trajectory", "reward_network"}),
    devices=frozenset({"cpu", "cuda"}),
)

OPTIONS = (
    Option("outer", int, 430, "outer iterations (the paper: 4.3M SAC steps in blocks of "
           "10,000)", valid="[1, inf)"),
    Option("sac_steps", int, 10_000, "SAC environment steps per outer iteration",
           valid="[1, inf)"),
    Option("envs", int, 1, "parallel training environments", valid="[1, 256]"),
    Option("reward_epochs", int, 1, "passes over the preference queue per outer iteration",
           valid="[0, inf)"),
    Option("reward_batch", int, 64, "preference pairs per reward-model minibatch",
           valid="[1, inf)"),
    Option("implicit", str, "public", "the implicit term: public (the paper's code: one step, "
           "grad r for dQ/dtheta), fragment (discounted over the rest of the fragment), critic "
           "(the reward net's last layer [w, b] gets dQ/d[w, b] = psi(s, a), the successor "
           "features of its input, from a critic learnt by TD on SAC's buffer: "
           "(1/(alpha scale)) [w, b] . (psi(s, a) - E_pi psi(s, .)); other layers the public form) "
           "or off", choices=("public", "fragment", "critic", "off")),
    Option("implicit_warmup", int, 100_000, "SAC steps before the implicit term is switched on",
           valid="[0, inf)"),
    Option("samples", int, 8, "actions sampled per state for E_pi r(s, .) and E_pi psi(s, .) "
           "(continuous actions)", valid="[1, inf)"),
    Option("critic_updates", int, 200, "implicit = critic: TD minibatch updates of the "
           "successor-feature critic per outer iteration (SAC's batch size)", valid="[0, inf)"),
    Option("critic_lr", float, 3e-4, "implicit = critic: the critic's Adam learning rate",
           valid="(0, inf)"),
    Option("critic_tau", float, 0.02, "implicit = critic: Polyak rate of the critic's target "
           "copy, per update", valid="(0, 1]"),
    Option("clip_grad", float, 10.0, "reward-model gradient norm clipping", valid="(0, inf)"),
    Option("sac_batch", int, 0, "SAC minibatch (0: the environment's default)",
           valid="[0, inf)"),
    Option("sac_lr", float, 0.0, "SAC learning rate (0: the environment's default)",
           valid="[0, inf)"),
    Option("sac_width", int, 0, "width of SAC's two hidden layers (0: 256, or none on Atari "
           "after the convolutions)", valid="[0, inf)"),
    Option("learning_starts", int, 0, "random steps before SAC updates (0: default)",
           valid="[0, inf)"),
    Option("buffer", int, 0, "replay buffer size (0: default)", valid="[0, inf)"),
    Option("update_every", int, 0, "environment steps per SAC update (0: default)",
           valid="[0, inf)"),
    Option("target_update", int, 0, "gradient updates between target-network updates "
           "(0: default: 1 with Polyak averaging; Atari 2,000 with hard copies)",
           valid="[0, inf)"),
    Option("eval_every", int, 10, "evaluate the deterministic policy every this many outer "
           "iterations (0: never)", valid="[0, inf)"),
    Option("eval_episodes", int, 5, "episodes per evaluation", valid="[1, inf)"),
    Option("checkpoint_every", int, 10, "save a checkpoint every this many outer iterations "
           "(0: never)", valid="[0, inf)"),
    Option("time_limit", float, 0.0, "stop after this many seconds (0: off)",
           valid="[0, inf)"),
)

_IMPLICIT_ONLY = ("implicit", "implicit_warmup", "samples", "critic_updates", "critic_lr",
                  "critic_tau")
_SAC_ONLY = ("outer", "sac_steps", "envs", "sac_batch", "sac_lr", "sac_width", "learning_starts",
             "buffer", "update_every", "target_update", "eval_every", "eval_episodes",
             "checkpoint_every", "time_limit")

_SUMMARIES = {
    "sobirl_sac": ("Deep SoBiRL (Algorithm 5): SAC follower, reward network with the implicit "
                   "term", ("deep_sobirl", "algorithm5"), OPTIONS),
    "drlhf_sac": ("DRLHF baseline: SAC follower, reward network on the preference loss alone",
                  ("deep_drlhf",), tuple(o for o in OPTIONS if o.name not in _IMPLICIT_ONLY)),
    "sac_true": ("SAC on the environment's true reward (the ceiling for RLHF)", ("sac",),
                 tuple(o for o in OPTIONS if o.name in _SAC_ONLY)),
}


def spec_for(name: str) -> SolverSpec:
    summary, aliases, options = _SUMMARIES[name]
    variant = name.removesuffix("_sac")

    def run(problem: Any, options: dict[str, Any], monitor: Monitor, **kwargs: Any
            ) -> SolveResult:
        from .sobirl_sac import run as run_deep

        return run_deep(problem, options, monitor, variant=variant, **kwargs)

    return SolverSpec(name=name, aliases=aliases, summary=summary, capabilities=DEEP,
                      options=options, run=run, rules=option_rules)


def option_rules(options: dict[str, Any]) -> list[tuple[tuple[str, ...], str]]:
    """What the deep solvers' options must satisfy together."""
    if options["sac_steps"] % options["envs"]:
        return [(("sac_steps", "envs"), f"sac_steps ({options['sac_steps']}) must be a multiple "
                 f"of envs ({options['envs']}): each vector step advances every copy")]
    return []
