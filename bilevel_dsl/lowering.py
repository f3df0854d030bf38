"""Stage 3: a checked program -> a `TabularProblem` on a device, which solvers consume.

Lowering is late and per device: constants move to the device once, and the reward and the
objective become closures that run the interpreter on the device's tensors.
"""

from __future__ import annotations

import torch

from .diagnostics import BrlError, Diagnostic
from .elaborate import CheckedProgram, lower_reward
from .evaluate import ConstantCache, VarRef, evaluate_val, varying_nodes
from .instance import TabularProblem
from .values import DTYPE, EvalError, MdpValue, PolicyRef, Val


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BrlError([Diagnostic("E804", "device `cuda` was asked for, but torch sees no CUDA "
                                   "GPU on this machine", None, "use --device cpu or auto")])
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
    return moved


def lower(checked: CheckedProgram, device: str | torch.device | None = None) -> TabularProblem:
    """The tabular instance of a checked program; ``device`` overrides the file's `on ...`."""
    if checked.var is None or checked.lower is None or checked.upper is None:
        missing = [w for w, v in (("a `var`", checked.var), ("a `lower` block", checked.lower),
                                  ("an `upper` objective", checked.upper)) if v is None]
        raise BrlError([Diagnostic(
            "E503", "this file is not a complete bilevel problem: it has no "
            + " and no ".join(m.split(" ", 1)[1] for m in missing), None,
            "a problem declares a `var`, a `lower` block and an `upper` objective",
        )], checked.source)
    if isinstance(device, torch.device):
        dev = device
    else:
        file_device = checked.solve.device if checked.solve is not None else None
        dev = resolve_device(device or file_device)
    names = _on_device(checked.names, dev)
    lower_info = checked.lower
    follower = names[lower_info.decl.mdp]
    assert isinstance(follower, MdpValue)
    var = checked.var
    upper = checked.upper
    sign = -1.0 if upper.sense == "maximize" else 1.0

    constants = ConstantCache(varying_nodes([lower_info.reward, upper.objective], names))

    def scope(x: torch.Tensor, policy: torch.Tensor | None = None):
        s = checked.scope(dev, names, x=x, policy=policy)
        s.policy_ref = PolicyRef(follower)
        s.constants = constants
        return s

    def reward(x: torch.Tensor) -> torch.Tensor:
        return _located(checked, lambda: lower_reward(lower_info, scope(x)))

    def objective(x: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
        value = _located(checked, lambda: evaluate_val(upper.objective, scope(x, pi)))
        return sign * value.t.to(DTYPE)

    def bound(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(dev)

    assert isinstance(names[var.name], VarRef)
    solve = checked.solve
    return TabularProblem(
        name=checked.name,
        transitions=follower.dynamics(),
        discount=follower.discount,
        initial=follower.initial,
        temperature=lower_info.temperature,
        reward=reward,
        objective=objective,
        x0=var.x0.to(dev),
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
    )


def _located(checked: CheckedProgram, thunk):
    """Run part of the model; an error at a new point (say a log of a negative number) is still
    reported against the user's source."""
    try:
        return thunk()
    except EvalError as err:
        raise BrlError([Diagnostic(err.code, err.message, err.span, err.hint, err.notes)],
                       checked.source) from None
