"""The deep part of the language: gymnasium MDPs, reward networks and the RLHF objective.

A deep problem reads like a tabular one::

    mdp env = gym("HalfCheetah-v5", discount = 0.99)
    var r = reward_net(env, hidden = [256, 256], lr = 3e-4)
    lower env { temperature = auto   reward[s, a] = r[s, a] }
    upper minimize preference_loss(env, policy, truth = env.reward, fragment = 25)
    solve sobirl_sac(outer = 100)

but the MDP is a simulator with no table, the variable is a network's weights, and the only
objective is the preference loss. This module checks those forms (every error located) and
builds the specs the deep solvers take; the elaborator calls it where a declaration names a
gymnasium MDP.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import ir
from .diagnostics import BrlError, Diagnostic, did_you_mean
from .values import POISONED, Cascade, EvalError, Val, by_name

GYM_OPTIONS = ("discount", "frame_skip", "frame_stack", "screen", "grey", "noop_max", "sticky",
               "max_episode_steps")
NET_OPTIONS = ("kind", "hidden", "activation", "dropout", "lr", "weight_decay", "batch")
NET_KINDS = ("mlp", "atari_cnn")
PREFERENCE_OPTIONS = ("truth", "fragment", "initial_pairs", "pairs", "queue", "warmup_epochs",
                      "scale", "noise", "clip", "heldout_every", "schedule", "decay_steps",
                      "total_pairs")
SCHEDULES = ("constant", "decay")
TRUE_WORDS = {"true": True, "false": False}

Number = Callable[[ir.Expr], Val]


@dataclass(frozen=True)
class GymMdp:
    """The value of ``mdp NAME = gym(...)``: an environment spec, no table."""

    name: str
    env: object  # solvers.deep.envs.EnvSpec
    discount: float


@dataclass(frozen=True)
class RewardNetVar:
    """The value of ``var NAME = reward_net(MDP, ...)``: the leader's network."""

    name: str
    mdp: str
    spec: object  # solvers.deep.reward_model.RewardNetSpec


@dataclass(frozen=True)
class DeepLower:
    mdp: GymMdp
    temperature: float | None  # None: automatic
    net: RewardNetVar


def is_reward_net(node: ir.Expr | None) -> bool:
    return isinstance(node, ir.Call) and node.function == "reward_net"


def _keywords(call_name: str, keywords: tuple[ir.Keyword, ...], allowed: tuple[str, ...]
              ) -> dict[str, ir.Keyword]:
    given, errors = by_name([(kw.name, kw.span, kw) for kw in keywords], allowed,
                            f"`{call_name}` has no option", "its options are " + ", ".join(allowed))
    if errors:  # every bad option is reported, not only the first
        first = errors[0]
        raise EvalError(first.code, first.message, first.span, first.hint,
                        also=tuple(errors[1:]))
    return given


def _scalar(kw: ir.Keyword, number: Number, low: float, high: float, integer: bool,
            what: str) -> float:
    v = number(kw.value)
    if v.axes or v.dims:
        raise EvalError("E301", f"`{kw.name}` must be a single number", kw.value.span)
    value = float(v.t)
    if integer and math.isfinite(value) and value != int(value):
        raise EvalError("E305", f"`{kw.name}` must be a whole number, got {value:g}",
                        kw.value.span)
    if not (low <= value <= high and math.isfinite(value)):
        shown = f"{int(value)}" if integer and math.isfinite(value) else f"{value:g}"
        raise EvalError("E305", f"`{kw.name}` must be {what}, got {shown}", kw.value.span)
    return int(value) if integer else value


def _flag(kw: ir.Keyword, number: Number) -> bool:
    if isinstance(kw.value, ir.Name) and kw.value.id in TRUE_WORDS:
        return TRUE_WORDS[kw.value.id]
    return bool(_scalar(kw, number, 0, 1, True, "true, false, 0 or 1"))


def _word(kw: ir.Keyword, choices: tuple[str, ...]) -> str:
    value = kw.value
    word = value.id if isinstance(value, ir.Name) else value.value \
        if isinstance(value, ir.String) else None
    if word not in choices:
        raise EvalError("E305", f"`{kw.name}` must be one of {', '.join(choices)}", value.span,
                        did_you_mean(word, choices) if word else None)
    return word


def gym_mdp(decl: ir.MdpDecl, number: Number) -> GymMdp:
    """``mdp NAME = gym("Id-v5", option = value, ...)``."""
    from solvers.deep.envs import EnvSpec, check_id, is_atari, known_ids, unusable
    from solvers.deep.networks import NATURE_MIN_SCREEN

    if len(decl.args) != 1 or not isinstance(decl.args[0], ir.String):
        span = decl.args[0].span if decl.args else decl.kind_span
        raise EvalError("E404", "gym(...) takes the environment's id as a string first",
                        span, 'for example gym("HalfCheetah-v5") or gym("ALE/BeamRider-v5")')
    id_node = decl.args[0]
    problem = check_id(id_node.value)
    if problem is not None:
        raise EvalError("E406", f"environment `{id_node.value}`: {problem}", id_node.span,
                        did_you_mean(id_node.value, known_ids())
                        or "ids look like HalfCheetah-v5, Hopper-v5 or ALE/BeamRider-v5")
    opts = _keywords("gym", decl.keywords, GYM_OPTIONS)
    atari_only = {"frame_skip", "frame_stack", "screen", "grey", "noop_max", "sticky"}
    if not is_atari(id_node.value):
        for name in sorted(atari_only & opts.keys()):
            raise EvalError("E404", f"`{name}` is an Atari preprocessing option, and "
                            f"`{id_node.value}` is not an Atari game", opts[name].span)
    fields: dict[str, object] = {}
    ints = {"frame_skip": (1, 16), "frame_stack": (1, 16), "screen": (NATURE_MIN_SCREEN, 256),
            "noop_max": (0, 1000), "max_episode_steps": (1, 10**8)}
    for name, (low, high) in ints.items():
        if name in opts:
            why = " (SAC's image encoder reads frames of at least that size)" \
                if name == "screen" else ""
            fields[name] = _scalar(opts[name], number, low, high, True,
                                   f"a whole number from {low} to {high}{why}")
    if "sticky" in opts:
        fields["sticky"] = _scalar(opts["sticky"], number, 0, 1, False, "a probability")
    if "grey" in opts:
        fields["grey"] = _flag(opts["grey"], number)
    discount = 0.99
    if "discount" in opts:
        discount = _scalar(opts["discount"], number, -math.inf, math.inf, False, "finite")
        if not 0 <= discount < 1:  # as for tabular MDPs
            raise EvalError("E402", f"the discount must lie in [0, 1), got {discount:g}",
                            opts["discount"].value.span)
    env = EnvSpec(id_node.value, **fields)
    problem = unusable(env)
    if problem is not None:
        why, hint = problem
        raise EvalError("E406", f"environment `{id_node.value}`: {why}", id_node.span, hint)
    return GymMdp(decl.name, env, discount)


def reward_net_var(decl: ir.VarDecl, names: dict[str, object], number: Number
                   ) -> RewardNetVar:
    """``var NAME = reward_net(MDP, kind = mlp, hidden = [256, 256], ...)``."""
    from solvers.deep.envs import is_atari
    from solvers.deep.reward_model import ACTIVATIONS, AtariRewardCNN, RewardNetSpec

    call = decl.value
    assert isinstance(call, ir.Call)
    if decl.dims or decl.lower is not None or decl.random:
        raise EvalError("E305", "a reward network has no dimensions, bounds or draw", decl.span,
                        "write `var r = reward_net(env, hidden = [256, 256])`")
    if len(call.args) != 1 or not isinstance(call.args[0], ir.Name):
        raise EvalError("E404", "reward_net(...) takes the gym MDP first", call.span,
                        "for example reward_net(env, hidden = [256, 256])")
    mdp_name = call.args[0].id
    mdp = names.get(mdp_name)
    if mdp is POISONED:  # the MDP's own error has been reported
        raise Cascade()
    if not isinstance(mdp, GymMdp):
        gyms = [k for k, v in names.items() if isinstance(v, GymMdp)]
        raise EvalError("E305" if mdp is not None else "E201",
                        f"`{mdp_name}` is not a gym MDP" if mdp is not None
                        else f"undefined MDP `{mdp_name}`", call.args[0].span,
                        did_you_mean(mdp_name, gyms))
    opts = _keywords("reward_net", call.keywords, NET_OPTIONS)
    fields: dict[str, object] = {
        "kind": "atari_cnn" if is_atari(mdp.env.env_id) else "mlp",
        "dropout": 0.5 if is_atari(mdp.env.env_id) else 0.0,
    }
    if "kind" in opts:
        fields["kind"] = _word(opts["kind"], NET_KINDS)
    if fields["kind"] == "atari_cnn" and not is_atari(mdp.env.env_id):
        raise EvalError("E305", "`atari_cnn` reads stacked Atari frames; this MDP is not an "
                        "Atari game", opts["kind"].value.span, "use kind = mlp")
    smallest = AtariRewardCNN.smallest_screen()
    if fields["kind"] == "atari_cnn" and mdp.env.screen < smallest:
        raise EvalError("E305", f"the reward CNN (`atari_cnn`) reads frames of at least "
                        f"{smallest} x {smallest}, and `{mdp_name}` has screen = "
                        f"{mdp.env.screen}", opts["kind"].value.span if "kind" in opts
                        else call.span, f"set screen = {smallest} or more in `{mdp_name}`'s "
                        "gym(...), or use kind = mlp")
    if "activation" in opts:
        fields["activation"] = _word(opts["activation"], tuple(ACTIVATIONS))
    if "hidden" in opts:
        v = number(opts["hidden"].value)
        sizes = [float(h) for h in v.t.reshape(-1).tolist()]
        if v.axes or len(v.dims) > 1 or not sizes or \
                any(h != int(h) or not 1 <= h <= 65536 for h in sizes):
            raise EvalError("E305", "`hidden` is a list of layer widths, e.g. [256, 256]",
                            opts["hidden"].value.span, "one width per hidden layer, at least "
                            "one layer, each a whole number from 1 to 65536")
        fields["hidden"] = tuple(int(h) for h in sizes)
    for name, low, high, what in (("dropout", 0, 0.99, "in [0, 0.99]"),
                                  ("lr", 1e-12, 10, "a positive learning rate"),
                                  ("weight_decay", 0, 10, "in [0, 10]")):
        if name in opts:
            fields[name] = _scalar(opts[name], number, low, high, False, what)
    if "batch" in opts:
        fields["batch"] = _scalar(opts["batch"], number, 1, 10**6, True, "a positive integer")
    return RewardNetVar(decl.name, mdp_name, RewardNetSpec(**fields))


def deep_lower(decl: ir.LowerDecl, mdp: GymMdp, items: dict[str, ir.Item],
               names: dict[str, object], number: Number) -> DeepLower:
    """``lower env { temperature = auto | number   reward[s, a] = r[s, a] }``."""
    temp = items["temperature"].value
    if isinstance(temp, ir.Name) and temp.id == "auto":
        tau = None
    elif isinstance(temp, ir.Name) and temp.id not in names and did_you_mean(temp.id, ["auto"]):
        raise EvalError("E403", "the temperature must be positive or `auto`", temp.span,
                        "did you mean `auto`?")
    else:
        v = number(temp)
        tau = float(v.t) if not (v.axes or v.dims) else math.nan
        if not tau > 0 or not math.isfinite(tau):
            raise EvalError("E403", "the temperature must be positive or `auto`", temp.span,
                            "`auto` lets SAC tune it to a target entropy")
    reward = items["reward"]
    body = reward.value
    index_names = tuple(n.id for n in reward.indices)
    net = names.get(body.base.id) if isinstance(body, ir.Index) and \
        isinstance(body.base, ir.Name) else None
    if net is POISONED:  # the variable's own error has been reported
        raise Cascade()
    if not isinstance(net, RewardNetVar) or len(index_names) != 2 or tuple(
            i.id if isinstance(i, ir.Name) else None for i in body.indices) != index_names:
        nets = [v.name for v in names.values() if isinstance(v, RewardNetVar)]
        hint = (f"write exactly `reward[s, a] = {nets[0]}[s, a]`: the network is the whole "
                "reward (scale or shift it inside the network, not here)") if nets else \
            "declare it with `var r = reward_net(env, ...)`"
        raise EvalError("E305", "on a gym MDP the follower's reward is the reward network: "
                        "`reward[s, a] = r[s, a]`", body.span, hint)
    if net.mdp != mdp.name:
        raise EvalError("E305", f"`{net.name}` is a reward network for `{net.mdp}`, not "
                        f"`{mdp.name}`", body.span)
    return DeepLower(mdp, tau, net)


def preference_objective(decl: ir.UpperDecl, lower: DeepLower, number: Number) -> object:
    """``upper minimize preference_loss(env, policy, truth = env.reward, ...)``."""
    from solvers.deep.envs import episode_limit
    from solvers.deep.problem import PreferenceSpec

    call = decl.objective
    if not (isinstance(call, ir.Call) and call.function == "preference_loss"):
        raise EvalError("E502", "with a gym MDP the upper objective is the RLHF preference loss",
                        decl.objective.span,
                        "write `upper minimize preference_loss(env, policy, truth = env.reward)`")
    if decl.sense != "minimize":
        raise EvalError("E502", "the preference loss is minimised", decl.span,
                        "write `upper minimize preference_loss(...)`")
    if len(call.args) != 2 or not isinstance(call.args[0], ir.Name) or \
            call.args[0].id != lower.mdp.name or not (
                isinstance(call.args[1], ir.Name) and call.args[1].id == "policy"):
        raise EvalError("E404", f"preference_loss takes the follower's MDP and `policy`: "
                        f"preference_loss({lower.mdp.name}, policy, ...)", call.span)
    opts = _keywords("preference_loss", call.keywords, PREFERENCE_OPTIONS)
    truth = opts.get("truth")
    if truth is None:
        raise EvalError("E404", "preference_loss needs the oracle's reward", call.span,
                        f"add `truth = {lower.mdp.name}.reward` (the environment's reward)")
    if not (isinstance(truth.value, ir.Attribute) and isinstance(truth.value.base, ir.Name)
            and truth.value.base.id == lower.mdp.name and truth.value.attr == "reward"):
        raise EvalError("E305", "on a gym MDP the oracle's reward is the environment's own",
                        truth.value.span, f"write `truth = {lower.mdp.name}.reward`")
    fields: dict[str, object] = {}
    for name, low, high in (("fragment", 1, 10_000), ("initial_pairs", 0, 10**7),
                            ("pairs", 1, 10**6), ("queue", 1, 10**7),
                            ("warmup_epochs", 0, 10**6), ("heldout_every", 0, 10**6)):
        if name in opts:
            fields["pairs_per_iteration" if name == "pairs" else name] = _scalar(
                opts[name], number, low, high, True, f"a whole number from {low} to {high}")
    if fields.get("heldout_every") == 1:
        raise EvalError("E305", "`heldout_every = 1` holds every pair out: the reward network "
                        "would never be trained", opts["heldout_every"].value.span,
                        "hold out every 10th pair (the default), or none with 0")
    if "scale" in opts:
        fields["scale"] = _scalar(opts["scale"], number, 0, math.inf, False, "0 or more")
    if "noise" in opts:
        fields["noise"] = _scalar(opts["noise"], number, 0, 1, False, "a probability")
    if "clip" in opts:
        fields["clip"] = _flag(opts["clip"], number)
    if "schedule" in opts:
        fields["schedule"] = _word(opts["schedule"], SCHEDULES)
    if "decay_steps" in opts:
        if fields.get("schedule") != "decay":
            raise EvalError("E404", "`decay_steps` sets the rate of `schedule = decay`",
                            opts["decay_steps"].span, "add `schedule = decay`")
        fields["decay_steps"] = _scalar(opts["decay_steps"], number, 1, 1e15, False,
                                        "a number of steps from 1 to 1e15")
    if "total_pairs" in opts:
        total = _scalar(opts["total_pairs"], number, 0, 10**9, True,
                        "a whole number from 0 to 1000000000")
        initial = fields.get("initial_pairs", PreferenceSpec.initial_pairs)
        if total < initial:
            raise EvalError("E305", f"`total_pairs` ({total}) is below `initial_pairs` "
                            f"({initial}): the budget counts the initial pairs too",
                            opts["total_pairs"].value.span,
                            f"raise `total_pairs` to at least {initial} or lower `initial_pairs`")
        fields["total_pairs"] = total
    spec = PreferenceSpec(**fields)
    limit = episode_limit(lower.mdp.env)
    if limit is not None and spec.fragment > limit:
        where = opts["fragment"].value.span if "fragment" in opts else call.span
        raise EvalError("E305", f"fragments of {spec.fragment} steps are longer than the "
                        f"episodes of `{lower.mdp.env.env_id}` (at most {limit} steps), and a "
                        "fragment never spans two episodes", where,
                        f"set `fragment` to at most {limit}, or raise the gym MDP's "
                        "`max_episode_steps`")
    return spec


def lower_deep(checked, device: torch.device):
    """The deep problem of a checked program (``checked.deep`` set): specs, no tensors yet."""
    from solvers.deep.problem import DeepProblem, PreferenceSpec

    deep = checked.deep
    if checked.upper is None:
        raise BrlError([Diagnostic(
            "E503", "this file is not a complete bilevel problem: it has no `upper` objective",
            None, "add `upper minimize preference_loss(env, policy, truth = env.reward)`")],
            checked.source)
    solve = checked.solve
    return DeepProblem(
        name=checked.name, env=deep.mdp.env, reward_net=deep.net.spec,
        preferences=checked.preferences or PreferenceSpec(), discount=deep.mdp.discount,
        temperature=deep.temperature, seed=checked.seed, device=device,
        source=checked.base_dir,
        solver=solve.solver if solve is not None else None,
        solver_options=dict(solve.options) if solve is not None else {},
        var_name=deep.net.name)
