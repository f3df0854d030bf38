"""What a deep run leaves behind: ``result.json``, ``curve.png`` and ``reward_net.pt``.

The reward network's weights go to ``reward_net.pt`` (tensors only, loadable with
``torch.load(..., weights_only=True)``), not into the JSON. ``curve.png`` shows what an RL
researcher looks at first: the follower's true return against environment steps (training
episodes, and the deterministic policy on separate evaluation environments), the preference
loss, and the reward model's accuracy on held-out pairs.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..output import RESULT_FORMAT_VERSION, _jsonable, _resumed, versions, write_json_atomic
from ..result import SolveResult
from .problem import DeepProblem


def write_deep_run(out_dir: Path, problem: DeepProblem, result: SolveResult,
                   meta: dict[str, Any]) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [write_json_atomic(out_dir / "result.json", deep_record(problem, result, meta))]
    net = result.extra.get("reward_net")
    if net is not None:
        torch.save(net, out_dir / "reward_net.pt")
        written.append(out_dir / "reward_net.pt")
    written.append(plot_deep_curves(out_dir / "curve.png", problem, result))
    return written


def deep_record(problem: DeepProblem, result: SolveResult, meta: dict[str, Any]
                ) -> dict[str, Any]:
    history = result.history
    evals = history.get("eval_return", [])
    return _jsonable({
        "format": "brl-result",
        "format_version": RESULT_FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "problem": problem.name,
        "environment": problem.env.env_id,
        "sense": "minimize",
        "solver": {"name": meta.get("solver"), "options": meta.get("options", {})},
        "seed": meta.get("seed", problem.seed),
        "defines": meta.get("defines", {}),
        "source_sha256": meta.get("source_sha256"),
        "device": str(problem.device),
        "variable": {"name": problem.var_name, "kind": problem.reward_net.kind,
                     "parameters": int(result.x.numel()), "file": "reward_net.pt"},
        "objective": result.objective,
        "final_eval_return": evals[-1] if evals else None,
        "env_steps": result.extra.get("env_steps"),
        "queries": result.extra.get("queries"),
        "iterations": result.iterations,
        "resumed_at": result.extra.get("resumed_at", []),
        "stopped_because": result.stopped_because,
        "history": history,
        "timings": meta.get("timings", {}),
        "versions": versions(),
        "command": meta.get("command"),
    })


def _accuracy(history: dict[str, list]) -> str:
    """The last held-out accuracy, with the pairs it is over: early on, one to three."""
    accuracy = history.get("preference_accuracy", [])
    decided, held = history.get("preference_accuracy_pairs"), history.get("heldout_pairs")
    if not (decided and held):  # a run recorded before the counts were
        return f"{accuracy[-1]:.3f}" if accuracy and math.isfinite(accuracy[-1]) else "-"
    ties = f"; {held[-1] - decided[-1]} tied pairs left out" if held[-1] > decided[-1] else ""
    if not (accuracy and math.isfinite(accuracy[-1])):
        return f"- (no held-out pair with a preferred side{ties})" if held[-1] else "-"
    return f"{accuracy[-1]:.3f} (over {decided[-1]} pairs{ties})"


def deep_summary(problem: DeepProblem, result: SolveResult, meta: dict[str, Any]) -> str:
    history = result.history
    evals, train = history.get("eval_return", []), history.get("train_return", [])
    rows = [
        ("problem", f"{problem.name} ({problem.env.env_id})"),
        ("solver", str(meta.get("solver", "?"))),
        ("device", str(problem.device)),
        ("iterations", f"{result.iterations}{_resumed(result)}"),
        ("stopped because", result.stopped_because),
        ("env steps", f"{result.extra.get('env_steps', 0):,}"),
    ]
    if meta.get("solver") != "sac_true":  # SAC on the true reward asks no preferences
        rows += [
            ("preference queries", f"{result.extra.get('queries', 0):,}"),
            ("preference loss", f"{result.objective:.4g}" if math.isfinite(result.objective)
             else "-"),
            ("held-out accuracy", _accuracy(history)),
        ]
    rows += [
        ("true return (train)", f"{train[-1]:.1f}" if train and math.isfinite(train[-1])
         else "-"),
        ("true return (eval)", f"{evals[-1]:.1f}" if evals else "-"),
        ("times", ", ".join(f"{k} {v:.3g} s" for k, v in meta.get("timings", {}).items())),
    ]
    if meta.get("out_dir") is not None:
        rows.append(("output", str(meta["out_dir"])))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)


def plot_deep_curves(path: Path, problem: DeepProblem, result: SolveResult) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    history = result.history
    fig = Figure(figsize=(7, 7), layout="constrained")
    top, middle, bottom = fig.subplots(3, 1)
    top.plot(history.get("env_steps", []), history.get("train_return", []), ".-",
             label="training episodes", alpha=0.7)
    if history.get("eval_return"):
        top.plot(history["eval_step"], history["eval_return"], "o-", label="evaluation")
    top.set_ylabel("true return")
    top.set_xlabel("environment steps")
    top.legend(loc="best")
    top.set_title(f"{problem.name}: {problem.env.env_id}")
    middle.plot(history.get("iteration", []), history.get("objective", []), ".-")
    middle.set_ylabel("preference loss")
    bottom.plot(history.get("iteration", []), history.get("preference_accuracy", []), ".-")
    bottom.set_ylabel("held-out accuracy")
    bottom.set_xlabel("outer iteration")
    for ax in (top, middle, bottom):
        ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=100)
    return path
