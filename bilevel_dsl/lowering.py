"""Stage 3: a checked program -> a `TabularProblem` on a device, which solvers consume.

Lowering is late and per device: constants move to the device once, and the reward and the
objective become closures that run the interpreter on the device's tensors.
"""

from __future__ import annotations

import math

import torch

from . import ir
from .deep import lower_deep
from .diagnostics import BrlError, Diagnostic, SourceFile
from .elaborate import CheckedProgram, lower_reward
from .evaluate import (
    ConstantCache,
    LetDef,
    VarRef,
    evaluate,
    evaluate_val,
    expected_over_next,
    varying_nodes,
)
from .instance import TabularProblem, TrajectoryTerm
from .values import DTYPE, EvalError, MdpValue, Names, PolicyRef, Val


def resolve_device(name: str | torch.device | None, source: SourceFile | None = None,
                   span: ir.Span | None = None) -> torch.device:
    """The torch device for `cpu`, `cuda` or `auto`; E804 (at ``span`` of ``source``, the
    file's `on cuda`, when that is where it was asked for) if CUDA is asked for and absent."""
    if isinstance(name, torch.device):
        name = str(name)
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, _, number = name.partition(":") if isinstance(name, str) else (None, "", "")
    if kind not in ("cpu", "cuda") or (number and not number.isdigit()):
        raise BrlError([Diagnostic("E804", f"unknown device {name!r}", span,
                                   "use cpu, cuda (or cuda:N) or auto")], source)
    if kind == "cuda" and not torch.cuda.is_available():
        raise BrlError([Diagnostic("E804", "device `cuda` was asked for, but torch sees no CUDA "
                                   "GPU on this machine", span, "use --device cpu or auto")],
                       source)
    return torch.device(name)


def _on_device(names: dict[str, object], device: torch.device) -> dict[str, object]:
    moved: dict[str, object] = {}
    mdps: dict[int, MdpValue] = {}
    for key, obj in names.items():
        if isinstance(obj, Val):
            moved[key] = Val(obj.t.to(device), obj.axes, obj.dims, obj.kind, obj.index_set)
        elif isinstance(obj, MdpValue):
            mdps.setdefault(id(obj), obj.to(device))
            moved[key] = mdps[id(obj)]
        else:
            moved[key] = obj
    return Names(moved)


def _device(checked: CheckedProgram, device: str | torch.device | None) -> torch.device:
    if isinstance(device, torch.device):
        return device
    solve = checked.solve
    file_device = solve.device if solve is not None else None
    span = solve.decl.device_span if not device and file_device is not None else None
    return resolve_device(device or file_device, checked.source, span)


def lower(checked: CheckedProgram, device: str | torch.device | None = None) -> TabularProblem:
    """The tabular instance of a checked program; ``device`` overrides the file's `on ...`."""
    if not isinstance(checked, CheckedProgram):
        raise TypeError(f"lower takes a CheckedProgram (from compile_file, compile_source or "
                        f"compile_program), not {type(checked).__name__}")
    if checked.deep is not None:
        return lower_deep(checked, _device(checked, device))
    if checked.var is None or checked.lower is None or checked.upper is None:
        missing = [w for w, v in (("a `var`", checked.var), ("a `lower` block", checked.lower),
                                  ("an `upper` objective", checked.upper)) if v is None]
        raise BrlError([Diagnostic(
            "E503", "this file is not a complete bilevel problem: it has no "
            + " and no ".join(m.split(" ", 1)[1] for m in missing), None,
            "a problem declares a `var`, a `lower` block and an `upper` objective",
        )], checked.source)
    dev = _device(checked, device)
    names = _on_device(checked.names, dev)
    lower_info = checked.lower
    follower = names[lower_info.decl.mdp]
    assert isinstance(follower, MdpValue)
    var = checked.var
    upper = checked.upper
    sign = -1.0 if upper.sense == "maximize" else 1.0

    warm_starts: dict = {}
    constants = ConstantCache(varying_nodes([lower_info.reward, upper.objective], names),
                              warm=warm_starts)

    x_shape = tuple(var.x0.shape)

    def scope(x: torch.Tensor, policy: torch.Tensor | None = None):
        if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
            x = torch.as_tensor(x, dtype=DTYPE, device=dev)  # a numpy array, a list, integers
        # broadcasting would silently read a wrong x (an empty x: parts that cannot use it)
        if x.numel() and tuple(x.shape) != x_shape:
            raise ValueError(f"x has shape {tuple(x.shape)}, but `{var.name}` is declared "
                             f"with shape {x_shape}")
        s = checked.scope(dev, names, x=x, policy=policy)
        s.policy_ref = PolicyRef(follower)
        s.constants = constants
        return s

    def reward(x: torch.Tensor) -> torch.Tensor:
        return _located(checked, lambda: lower_reward(lower_info, scope(x)))

    pi_shape = (follower.states.size, follower.actions.size)

    def objective(x: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
        if tuple(pi.shape) != pi_shape:  # broadcasting would silently read a wrong policy
            raise ValueError(f"pi has shape {tuple(pi.shape)}, but the follower's policy is "
                             f"(states, actions) = {pi_shape}")
        value = _located(checked, lambda: evaluate_val(upper.objective, scope(x, pi)))
        return sign * value.t.to(DTYPE)

    def bound(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(dev)

    assert isinstance(names[var.name], VarRef)
    terms = policy_free = None
    if upper.form == ir.TRAJECTORY:
        terms, policy_free = _trajectory_form(checked, upper, sign, scope, reward, names,
                                               follower)
    solve = checked.solve
    return TabularProblem(
        name=checked.name,
        transitions=follower.dynamics(),
        discount=follower.discount,
        initial=follower.initial,
        temperature=lower_info.temperature,
        reward=reward,
        objective=objective,
        x0=var.x0.to(dev).clone(),  # each problem its own: a caller may edit it in place
        var_name=var.name,
        sense=upper.sense,
        form=upper.form,
        features=frozenset(upper.features),
        lower_bound=bound(var.lower),
        upper_bound=bound(var.upper),
        solver=solve.solver if solve is not None else None,
        solver_options=dict(solve.options) if solve is not None else {},
        seed=checked.seed,
        grid=follower.grid,
        trajectory_terms=terms,
        policy_free=policy_free,
        warm_starts=warm_starts,
    )


def _trajectory_form(checked, upper, sign, scope, lower_reward_fn, names, follower):
    """Split a trajectory objective into `coefficient * E[term]` pieces and a policy-free rest.

    Only linear combinations with constant coefficients are split (`a - 2 * expected_return(...)
    + lam * norm2(x)`); any other use of a trajectory term leaves the problem without a
    trajectory form (None), and model-free solvers decline it.
    """
    found: list[tuple[float, ir.Call]] = []
    through_lets: dict[str, bool] = {}

    def uses_policy(node: ir.Expr) -> bool:
        """Whether `node` uses the policy, itself or through the lets it names."""
        if ir.objective_features(node):
            return True
        for name in ir.names_in(node):
            let = names.get(name)
            if isinstance(let, LetDef) and name not in through_lets:
                through_lets[name] = False  # (a let cannot use itself)
                through_lets[name] = uses_policy(let.decl.value)
            if through_lets.get(name):
                return True
        return False

    def visit(node: ir.Expr, coefficient: float) -> bool:
        if isinstance(node, ir.Call) and node.function in ir.TRAJECTORY_FUNCTIONALS:
            found.append((coefficient, node))
            return True
        let = names.get(node.id) if isinstance(node, ir.Name) else None
        if isinstance(let, LetDef) and not let.dims:  # `let PL = preference_loss(...)`
            return visit(let.decl.value, coefficient)
        if not uses_policy(node):
            return True
        if isinstance(node, ir.Unary) and node.op in "+-":
            return visit(node.operand, -coefficient if node.op == "-" else coefficient)
        if isinstance(node, ir.Binary) and node.op in ("+", "-"):
            return visit(node.left, coefficient) and visit(
                node.right, -coefficient if node.op == "-" else coefficient)
        if isinstance(node, ir.Binary) and node.op in ("*", "/"):
            const, inner = (node.left, node.right) if node.op == "*" else (node.right, node.left)
            if node.op == "*" and uses_policy(const):
                const, inner = inner, const
            if id(const) in varying_nodes([const], names):  # x or the policy: no coefficient
                return False
            c = float(evaluate_val(const, scope(torch.zeros(0))).t)
            if not math.isfinite(c) or (node.op == "/" and c == 0):
                return False  # an objective that is NaN or inf everywhere: no such form
            return visit(inner, coefficient * c if node.op == "*" else coefficient / c)
        return False

    if not visit(upper.objective, sign):
        return None, None
    terms = []
    for coefficient, call in found:
        terms.append(_term(coefficient, call, scope, lower_reward_fn, names))

    S, A = follower.states.size, follower.actions.size
    uniform = torch.full((S, A), 1.0 / A, dtype=DTYPE, device=follower.initial.device)

    def policy_free(x: torch.Tensor) -> torch.Tensor:
        s = scope(x, uniform)  # the policy only appears inside the trajectory terms
        s.exact_trajectories = False
        value = _located(checked, lambda: evaluate_val(upper.objective, s))
        return sign * value.t.to(DTYPE)

    return tuple(terms), policy_free


def _term(coefficient, call: ir.Call, scope, lower_reward_fn, names) -> TrajectoryTerm:
    kw = {k.name: k.value for k in call.keywords}
    probe = scope(torch.zeros(0))
    mdp = evaluate(call.args[0], probe)
    assert isinstance(mdp, MdpValue)

    def number(key: str, default: float) -> float:
        return float(evaluate_val(kw[key], probe).t) if key in kw else default

    def table(node: ir.Expr):
        def fn(x: torch.Tensor) -> torch.Tensor:
            v = evaluate_val(node, scope(x))
            t = v.t.to(DTYPE)
            return expected_over_next(mdp.transitions, t) if t.dim() == 3 else t
        return fn

    if call.function == "expected_return":
        reward_node = kw.get("reward", call.args[2] if len(call.args) > 2 else None)
        reward = table(reward_node) if reward_node is not None else (lambda x: mdp.reward)
        truth = None
    else:
        reward = table(kw["model"]) if "model" in kw else lower_reward_fn
        truth = table(kw["truth"])(torch.zeros(0)).detach()
    return TrajectoryTerm(
        kind=call.function,
        coefficient=coefficient,
        transitions=mdp.dynamics(),
        initial=mdp.initial,
        discount=mdp.discount,
        horizon=int(number("horizon", 1)),
        reward=reward,
        truth=truth,
        pairs=int(number("pairs", 64)),
        scale=number("scale", 1.0),
        noise=number("noise", 0.0),
    )


def _located(checked: CheckedProgram, thunk):
    """Run part of the model; an error at a new point (say a log of a negative number) is still
    reported against the user's source."""
    try:
        return thunk()
    except EvalError as err:
        raise BrlError([Diagnostic(err.code, err.message, err.span, err.hint, err.notes)],
                       checked.source) from None
