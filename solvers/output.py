"""The record a run leaves behind: ``result.json``, ``curve.png``, a policy picture, a summary.

``meta`` is what the caller knows and the result does not: ``solver`` (name), ``options``
(typed), ``seed`` (defaults to ``problem.seed``), ``timings`` (``{"parse", "compile", "solve"}``
in seconds), ``command`` (the command line) and, for the summary, ``out_dir``.
Objectives are reported in the user's sense (``problem.sign * f``). matplotlib is imported
only inside the plotting functions so that importing ``solvers`` stays cheap.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .result import SolveResult

if TYPE_CHECKING:
    from bilevel_dsl.instance import GridLayout, TabularProblem

RESULT_FORMAT_VERSION = 1
_SAMPLES_COMPARED = 10  # sampled objectives: the mean of the first and last this many recorded
_X_SHOWN = 6  # entries of x printed in the summary before it is abbreviated
_CELL_INCHES = 0.6  # size of a grid cell in the policy picture, shrunk for large grids
# read once, at import: os.umask can only be read by setting it, which would briefly change it
# for every thread
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_EXTRA_ENTRIES = 10_000  # larger tensors in SolveResult.extra are not written to result.json
_DETAIL_CELLS = 2500  # above this many cells, arrows and cell lines are unreadable and slow


def default_out_dir(problem_name: str, root: Path = Path("runs")) -> Path:
    """``runs/<problem>-<YYYYmmdd-HHMMSS>/``, with a suffix if two runs start in one second."""
    base = root / f"{problem_name}-{datetime.now():%Y%m%d-%H%M%S}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def write_run(
    out_dir: Path, problem: TabularProblem, result: SolveResult, meta: dict[str, Any]
) -> list[Path]:
    """Write the run's record into ``out_dir`` (created if needed); return the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [write_json_atomic(out_dir / "result.json", result_record(problem, result, meta))]
    written.append(plot_curves(out_dir / "curve.png", problem, result))
    if problem.grid is not None:
        written.append(plot_policy(out_dir / "policy.png", problem, result))
    return written


def result_record(
    problem: TabularProblem, result: SolveResult, meta: dict[str, Any]
) -> dict[str, Any]:
    """The content of ``result.json``; non-finite numbers become ``null`` to keep it valid JSON."""
    history = {key: list(values) for key, values in result.history.items()}
    history["objective"] = [problem.sign * f for f in result.history.get("objective", [])]
    record = {
        "format": "brl-result",
        "format_version": RESULT_FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "problem": problem.name,
        "sense": problem.sense,
        "solver": {"name": meta.get("solver"), "options": meta.get("options", {})},
        "seed": meta.get("seed", problem.seed),
        "defines": meta.get("defines", {}),
        "source_sha256": meta.get("source_sha256"),
        "device": str(problem.device),
        "variable": {"name": problem.var_name, "shape": list(result.x.shape)},
        "x": result.x.detach().cpu().tolist(),
        # the follower's policy at x, pi[s][a] (named, not written, above 10,000 entries)
        "policy": _omit_if_large(result.policy.detach().cpu()),
        "objective": problem.sign * result.objective,
        "iterations": result.iterations,
        "resumed_at": result.extra.get("resumed_at", []),
        "stopped_because": result.stopped_because,
        "history": history,
        "timings": meta.get("timings", {}),
        "versions": versions(),
        "command": meta.get("command"),
        "extra": {
            key: _omit_if_large(value) for key, value in result.extra.items()
            if key != "resumed_at"
        },
    }
    if "exact" in result.extra:  # a check at the final x (verify): phi in the user's sense
        record["extra"]["exact"] = {**result.extra["exact"],
                                    "objective": problem.sign * result.extra["exact"]["objective"]}
        record["extra"]["running_objective"] = problem.sign * result.extra["running_objective"]
    if "exact_at_x0" in result.extra:
        record["extra"]["exact_at_x0"] = problem.sign * result.extra["exact_at_x0"]
    return _jsonable(record)


def versions() -> dict[str, str]:
    """Versions that matter for reproducing a run."""
    try:
        brl = metadata.version("brl")
    except metadata.PackageNotFoundError:  # running from a source checkout
        brl = "unknown"
    return {
        "brl": brl,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }


def summary_table(problem: TabularProblem, result: SolveResult, meta: dict[str, Any]) -> str:
    """The end-of-run summary printed to the terminal."""
    norms = result.history.get("hypergrad_norm", [])
    stationarity = result.history.get("stationarity", [])
    options = ", ".join(f"{k}={v}" for k, v in meta.get("options", {}).items())
    timings = meta.get("timings", {})
    rows = [
        ("problem", f"{problem.name} ({problem.sense})"),
        ("solver", f"{meta.get('solver', '?')}" + (f" ({options})" if options else "")),
        ("device", str(problem.device)),
        ("iterations", f"{result.iterations}{_resumed(result)}"),
        ("stopped because", result.stopped_because),
        ("objective", f"{problem.sign * result.objective:.6g}{_objective_note(result, meta)}"
                      if math.isfinite(result.objective) else "- (no estimate yet)"),
        ("||h|| final", f"{norms[-1]:.3g}" + (" (the last sampled estimate)"
                                               if "objective_is" in result.extra else "")
         if norms else "-"),
        # at an optimum on a bound ||h|| stays large; the projected step is what goes to 0
        *([("stationarity", f"{stationarity[-1]:.3g} (the projected step's "
                            "||x - project(x - beta h)|| / beta)")]
          if problem.bounded and stationarity else []),
        *_exact_rows(problem, result.extra.get("exact")),
        (problem.var_name, _abbreviate(result.x)),
    ]
    objectives = result.history.get("objective", [])
    advice = "try a smaller beta (--set beta=...)"
    if meta.get("solver") == "m_sobirl":
        advice = _m_sobirl_advice(problem.discount, meta.get("options", {}).get("inner", 10))
    elif meta.get("solver") == "exact" and meta.get("options", {}).get("line_search") != "armijo":
        advice += ", or a line search (--set line_search=armijo)"
    # from a cold start the first objective is at the uniform policy, not phi(x0): unlike
    cold = meta.get("options", {}).get("start") == "cold"
    if not cold and (worse := _ended_worse(problem, result, objectives)) is not None:
        rows.append(("warning", f"the objective ended worse than it started ({worse}): "
                                f"{advice}"))
    elif meta.get("solver") in ("m_sobirl", "exact") and (  # the model-free h is noisy
            unsettled := _unsettled(stationarity or norms, result.history.get("iteration"),
                                    objectives)):
        rows.append(("warning", f"the run did not settle: {unsettled}; {advice}"))
    elif meta.get("solver") in ("m_sobirl", "exact") and result.stopped_because == \
            "max_iterations" and (going := _still_going(stationarity or norms, objectives)):
        rows.append(("warning", f"the run ended still improving: {going}; run longer (--set "
                                "outer=...) or take larger steps (--set beta=...)"))
    final = (stationarity or norms or [0.0])[-1]
    if result.stopped_because == "no_descent" and final > _KINK_STATIONARITY * max(
            1.0, abs(result.objective)):
        rows.append(("warning", f"no step along -grad decreased the objective, yet the "
                                f"stationarity is {final:.3g}: x sits on a kink of the "
                                "objective (abs, norm1, max, min), which gradient steps cannot "
                                "cross and past which the optimum may lie, or, where the "
                                "objective is smooth, on a slope so steep (a low temperature, "
                                "a discount near 1) that the steps which would descend are "
                                "lost to rounding: x is then as good as float64 resolves"))
    if meta.get("solver") == "m_sobirl" and (  # its running estimates stand for exact ones
            lag := _lagging(stationarity or norms, result.extra.get("exact"))) is not None:
        rows.append(("warning", f"the exact stationarity at the final x is {lag}: the follower "
                                f"or the adjoint still lag x; run longer, or {advice}"))
    if (plain := _momentum_unused(result.extra.get("momentum"))) is not None:
        rows.append(("warning", plain))
    # model-free solvers count what they asked of the oracle (when the objective asks it) and
    # the simulator
    asks = "preference_loss" in problem.features
    rows += [(label, f"{result.extra[key]:,}") for key, label in
             (("queries", "preference queries"), ("transitions", "simulator transitions"))
             if isinstance(result.extra.get(key), int) and (asks or key != "queries")]
    rows.append(("times", ", ".join(f"{k} {v:.3g} s" for k, v in timings.items()) or "-"))
    if meta.get("out_dir") is not None:
        rows.append(("output", str(meta["out_dir"])))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)


def _resumed(result: SolveResult) -> str:
    """Where ``--resume`` took the run up, if it did: the iterations at which it did."""
    at = result.extra.get("resumed_at")
    return f" (resumed at iteration {', '.join(map(str, at))})" if at else ""


def plot_curves(path: Path, problem: TabularProblem, result: SolveResult) -> Path:
    """Objective (user's sense) and hyper-gradient norm (log scale) against iteration."""
    from matplotlib.ticker import MaxNLocator

    objective = [problem.sign * f for f in result.history.get("objective", [])]
    norms = np.asarray(result.history.get("hypergrad_norm", []), dtype=float)
    fig = _figure(6.4, 5.6)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(_iterations(result, len(objective)), objective, color="tab:blue")
    top.set_ylabel(f"objective ({problem.sense})")
    top.set_title(problem.name)
    bottom.plot(_iterations(result, len(norms)), np.where(norms > 0, norms, np.nan),
                color="tab:red", label="||hyper-gradient||")
    stationarity = np.asarray(result.history.get("stationarity", []), dtype=float)
    shown = norms
    if problem.bounded and len(stationarity):  # at an optimum on a bound ||h|| stays large
        bottom.plot(_iterations(result, len(stationarity)),
                    np.where(stationarity > 0, stationarity, np.nan), color="tab:green",
                    label="stationarity (projected step / beta)")
        bottom.legend(loc="best", fontsize="small")
        shown = np.concatenate([norms, stationarity])
    if np.any(shown > 0):
        bottom.set_yscale("log")
        _plain_log_labels(bottom.yaxis)
    bottom.set_ylabel("||hyper-gradient||" if shown is norms else "norm")
    bottom.set_xlabel("iteration")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
    _margins(fig, left=0.95, right=0.2, top=0.4, bottom=0.6)
    fig.savefig(path, dpi=120)
    return path


def plot_policy(path: Path, problem: TabularProblem, result: SolveResult) -> Path:
    """The grid with walls, the greedy action per cell, start, true goal and the learned x.

    ``x`` of shape (2,) is read as a goal position (row, col); ``x`` with one entry per state,
    or per (state, action) pair averaged over the policy, is drawn as a heat map under the
    arrows. Large grids get the picture without arrows.
    """
    grid = problem.grid
    if grid is None:
        raise ValueError(f"problem {problem.name!r} is not a grid world")
    x = result.x.detach().cpu().to(torch.float64)
    cells = np.asarray(grid.cells, dtype=np.int64).reshape(-1, 2)
    inches = min(_CELL_INCHES, 12.0 / max(grid.rows, grid.cols))
    fig = _figure(max(4.0, inches * grid.cols + 1.5), max(3.0, inches * grid.rows + 1.0))
    ax = fig.subplots()

    per_state, label = _per_state(x, result.policy, problem)
    if per_state is not None:
        heat = np.full((grid.rows, grid.cols), np.nan)
        heat[cells[:, 0], cells[:, 1]] = per_state.numpy()
        fig.colorbar(ax.imshow(heat, cmap="viridis"), ax=ax, label=label, shrink=0.8)
    else:
        ax.imshow(np.zeros((grid.rows, grid.cols)), cmap="Greys", vmin=0, vmax=1)
    if grid.walls:
        walls = np.full((grid.rows, grid.cols), np.nan)
        at = np.asarray(grid.walls, dtype=np.int64).reshape(-1, 2)
        walls[at[:, 0], at[:, 1]] = 1.0
        ax.imshow(walls, cmap="Greys", vmin=0, vmax=1.2)

    detailed = grid.rows * grid.cols <= _DETAIL_CELLS
    if detailed:
        # a terminal goal has no moves (its row of P is empty); one with terminal_goal = 0 has
        terminal = bool(problem.transitions.row_sums()[grid.goal].abs().sum() == 0)
        _draw_greedy_actions(ax, grid, result.policy, cells, terminal)
        ax.set_xticks(range(grid.cols))
        ax.set_yticks(range(grid.rows))
        ax.set_xticks(np.arange(-0.5, grid.cols), minor=True)
        ax.set_yticks(np.arange(-0.5, grid.rows), minor=True)
        ax.grid(which="minor", color="lightgrey", linewidth=0.5)
        ax.tick_params(which="minor", length=0)

    start_row, start_col = grid.cells[grid.start]
    goal_row, goal_col = grid.cells[grid.goal]
    ax.plot(start_col, start_row, "o", markerfacecolor="none", markeredgecolor="tab:green",
            markeredgewidth=2.5, markersize=18, label="start")
    ax.plot(goal_col, goal_row, "*", color="gold", markeredgecolor="black", markersize=16,
            label="goal")
    if x.shape == (2,):
        ax.plot(float(x[1]), float(x[0]), "X", color="tab:red", markeredgecolor="black",
                markersize=12, label=f"learned {problem.var_name}")

    ax.set_xlim(-0.5, grid.cols - 0.5)
    ax.set_ylim(grid.rows - 0.5, -0.5)
    ax.set_title(f"{problem.name}: " + ("greedy policy" if detailed else problem.var_name))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3, fontsize="small",
              frameon=False)
    _margins(fig, left=0.6, right=0.35, top=0.4, bottom=0.75)
    fig.savefig(path, dpi=120)
    return path


def _per_state(x: torch.Tensor, policy: torch.Tensor, problem: TabularProblem
               ) -> tuple[torch.Tensor | None, str]:
    """One number per state for the heat map, and its label: ``x`` itself, or for a shaping
    bonus ``x[s, a]`` its average under the policy."""
    S, A = problem.n_states, problem.n_actions
    if x.shape != (2,) and x.numel() == S:
        return x.flatten(), problem.var_name
    if x.numel() == S * A and A > 1:
        pi = policy.detach().cpu().to(torch.float64)
        return (pi * x.reshape(S, A)).sum(-1), f"{problem.var_name}[s, a] averaged over the policy"
    return None, ""


def _draw_greedy_actions(
    ax: Any, grid: GridLayout, policy: torch.Tensor, cells: np.ndarray, terminal_goal: bool
) -> None:
    """An arrow along each state's most likely move (one per move where several tie); a dot
    where it stays; nothing at a terminal goal. White with a black edge: visible on any heat
    map."""
    pi = policy.detach().cpu().to(torch.float64)
    tied = (pi >= pi.amax(dim=-1, keepdim=True) * (1 - 1e-9)).numpy()  # (S, A)
    if terminal_goal:
        tied[grid.goal] = False
    all_moves = np.asarray(grid.action_moves, dtype=np.float64)  # (A, 2): d_row, d_col
    for a, move in enumerate(all_moves):
        at = cells[tied[:, a]]
        length = float(np.hypot(*move))
        if length == 0:
            ax.plot(at[:, 1], at[:, 0], "k.", markersize=4)
            continue
        step = move * (0.7 / length)  # every arrow spans 70% of a cell, whatever the move's size
        ax.quiver(at[:, 1], at[:, 0], np.full(len(at), step[1]), np.full(len(at), step[0]),
                  angles="xy", scale_units="xy", scale=1, pivot="middle", color="white",
                  edgecolor="black", linewidth=0.6)


def _iterations(result: SolveResult, n: int) -> list[int] | range:
    """The iteration of each of ``n`` history entries; solvers that log every few iterations
    say which in ``history["iteration"]``."""
    logged = result.history.get("iteration", [])
    return [int(k) for k in logged] if len(logged) == n else range(n)


def _margins(fig: Any, left: float, right: float, top: float, bottom: float) -> None:
    """Fixed margins in inches, where `tight_layout` measured every label: it drew the figure
    once more, which was half of a picture's cost."""
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height,
                        bottom=bottom / height)


def _plain_log_labels(axis: Any) -> None:
    """Labels such as 0.6 and 1e-05 on a log axis: the default's 6 x 10^-1 is typeset as
    mathematics, a third of a picture's cost. Which ticks get a label is the default's
    choice."""
    from matplotlib.ticker import LogFormatter

    class Plain(LogFormatter):
        def __call__(self, x: float, pos: int | None = None) -> str:
            return f"{x:g}" if super().__call__(x, pos) else ""

    axis.set_major_formatter(Plain())
    axis.set_minor_formatter(Plain(labelOnlyBase=False))


def _figure(width: float, height: float) -> Any:
    """A figure drawn by Agg, without pyplot: no display needed and no global backend changed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def remove_path(path: Path) -> None:
    """Remove a file, a link (not what it points to) or a folder with its contents; nothing if
    ``path`` is not there. What replacing or tidying a run's outputs needs."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def write_json_atomic(path: Path, record: dict[str, Any]) -> Path:
    """Write then rename, so a crash never leaves a half-written ``result.json``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(_dumps(record) + "\n")
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would differ from the other files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _omit_if_large(value: Any) -> Any:
    """Solver state such as a value vector can have millions of entries: name it, don't dump it."""
    if isinstance(value, torch.Tensor) and value.numel() > _EXTRA_ENTRIES:
        return f"tensor of shape {tuple(value.shape)}, omitted"
    return value


def _dumps(value: Any, level: int = 0) -> str:
    """Indented JSON, except that lists without objects in them (curves, x) stay on one line."""
    pad = "  " * (level + 1)
    if isinstance(value, dict) and value:
        items = [f"{pad}{json.dumps(key)}: {_dumps(v, level + 1)}" for key, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + "  " * level + "}"
    if isinstance(value, list) and any(isinstance(item, dict) for item in value):
        items = [pad + _dumps(item, level + 1) for item in value]
        return "[\n" + ",\n".join(items) + "\n" + "  " * level + "]"
    return json.dumps(value, allow_nan=False)


def _jsonable(value: Any) -> Any:
    """Plain JSON values: tensors and arrays as nested lists, non-finite floats as ``None``."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().tolist()
    elif isinstance(value, np.ndarray | np.generic):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _unsettled(stationarity: list[float], iterations: list[int] | None,
               objectives: list[float] = ()) -> str | None:
    """What says that a run ended far from the best point it passed (its last stationarity 10x
    above the smallest it reached), or never came near one (its objective still zigzagging at
    the end, the stationarity not far below its start): a step too large swings across the
    optimum, and the objective can still end below its start."""
    finite = [v for v in stationarity if math.isfinite(v)]
    if len(finite) < 10 or not math.isfinite(stationarity[-1]):
        return None
    best = min(finite)
    if stationarity[-1] < 1e-6:
        return None
    k = stationarity.index(best)
    if stationarity[-1] <= 10 * best or (  # still improving since then: a flat start, not a swing
            len(objectives) == len(stationarity) and objectives[-1] < objectives[k]):
        return _zigzag(objectives, stationarity)
    at = iterations[k] if iterations and len(iterations) == len(stationarity) else k
    return (f"its stationarity ended at {stationarity[-1]:.3g}, {stationarity[-1] / best:.0f}x "
            f"the smallest it reached ({best:.3g} at iteration {at})")


def _still_going(stationarity: list[float], objectives: list[float]) -> str | None:
    """What says that a run ran out of iterations on its way: its objective fell at each of the
    last ten records, at a tenth or more of its average rate since the start (a run converging
    geometrically slows far below that), with the stationarity above rounding level: a step
    too small, which no other warning catches. (A large first gradient once hid this, when the
    test was the stationarity against its start.) A run whose objective rose within the last
    ten records is not on its way: see ``_zigzag``."""
    n = _SAMPLES_COMPARED
    if len(stationarity) < n or len(objectives) != len(stationarity):
        return None
    last, tail = stationarity[-1], objectives[-n:]
    rate = (tail[0] - tail[-1]) / (n - 1)
    average = (objectives[0] - objectives[-1]) / (len(objectives) - 1)
    if not (math.isfinite(last) and last > 1e-6 and rate >= 0.1 * average > 0
            and all(b <= a for a, b in zip(tail, tail[1:]))):
        return None
    return (f"the objective improved at each of its last {n} records, by {rate:.3g} a record "
            f"({rate / average:.0%} of its average since the start), and the stationarity "
            f"ended at {last:.3g}")


def _zigzag(objectives: list[float], stationarity: list[float]) -> str | None:
    """The objective swinging over the last quarter of the run (at least 20 recorded
    iterations), with the stationarity still above 1e-3 of its start: its steps alternating in
    sign (a step too large, across the optimum), or its rises a quarter or more of all its
    movement there (a longer cycle: up for a few steps, down for a few)."""
    tail = objectives[-max(len(objectives) // 4, 20):]
    if len(tail) < 20 or len(objectives) < 40 or stationarity[-1] < 1e-3 * stationarity[0]:
        return None
    steps = [b - a for a, b in zip(tail, tail[1:])]
    flips = sum((a > 0) != (b > 0) for a, b in zip(steps, steps[1:]) if a and b)
    ended = (f"its stationarity ended at {stationarity[-1]:.3g}, "
             f"{stationarity[-1] / stationarity[0]:.2g}x its start")
    if flips >= 0.4 * (len(steps) - 1):
        return (f"its objective zigzags ({flips} reversals in the last {len(tail)} iterations) "
                f"and {ended}")
    rises, movement = sum(d for d in steps if d > 0), sum(abs(d) for d in steps)
    rounding = 1e-9 * max(1.0, max(abs(f) for f in tail))  # a converged f moving by ulps
    if rises > rounding and rises >= 0.25 * movement:
        return (f"its objective cycles (it rose by {rises:.3g} and fell by "
                f"{movement - rises:.3g} over the last {len(tail)} records) and {ended}")
    return None


def _m_sobirl_advice(discount: float, inner: int) -> str:
    """What to try when an m_sobirl run went wrong. Exact gradients with safe steps come first:
    on a small problem they cost little and always work. More follower steps per iteration
    matter near discount 1, where N Bellman steps remove only a fraction 1 - gamma^N of the
    follower's error (10% at 0.99 with the default 10): its lag then misleads x."""
    advice = ("try --solver exact --set line_search=armijo (exact hyper-gradients, steps that "
              "always descend), or a smaller beta (--set beta=...)")
    removed = 1.0 - discount**inner if 0.0 < discount < 1.0 else 1.0
    if removed < 0.5:
        needed = math.ceil(math.log(0.1) / math.log(discount))  # steps that remove 90%
        return (f"{advice} with more follower and adjoint steps per iteration (--set "
                f"inner={needed} --set adjoint_steps=10): at discount {discount:g} its "
                f"{inner} Bellman steps per iteration remove {removed:.0%} of the follower's "
                "error")
    return f"{advice} with more adjoint steps (--set adjoint_steps=10)"


def _momentum_unused(momentum: dict[str, float] | None) -> str | None:
    """stoc_sobirl's adaptive weight held at 1 (the replayed differences as noisy as a fresh
    estimate): the run took sobirl's steps, its replays changing nothing."""
    if not momentum or momentum["replayed_iterations"] < 10:
        return None
    replayed, at_one = momentum["replayed_iterations"], momentum["iterations_at_weight_1"]
    if at_one < 0.9 * replayed:
        return None
    return (f"the momentum was off: eta_k = 1 in {at_one} of the {replayed} iterations that "
            "replayed their sample (the replayed differences were as noisy as fresh "
            "estimates), so the steps were sobirl's, with replays that changed nothing; "
            "--solver sobirl takes the same steps without them, smaller steps (--set beta=...) "
            "quiet the replays, --set adaptive=false keeps the paper's schedule regardless")


def _objective_note(result: SolveResult, meta: dict[str, Any]) -> str:
    """What the final objective is, where it is not ``phi(x)``."""
    if "objective_is" in result.extra:  # the model-free solvers say
        return f" ({result.extra['objective_is']})"
    if meta.get("solver") == "m_sobirl":
        if "exact" in result.extra:
            return " (phi(x): the follower solved exactly at the final x)"
        return " (at the solver's running policy, not yet phi(x) exactly)"
    return ""


# exact's line search stops (no_descent) at rounding level at a smooth stationary point: a
# stationarity above this (relative to max(1, |objective|)) there means a kink
_KINK_STATIONARITY = 1e-6


def _ended_worse(problem: TabularProblem, result: SolveResult, objectives: list[float]
                 ) -> str | None:
    """How the objective ended worse than it started, if it did, comparing like with like: the
    final objective with the first iterate's; for the model-free solvers, ``phi`` at x0 and at
    the final x where they checked both (option verify), else their sampled objectives (noisy,
    and not ``phi``: the first is taken at a follower still far from ``pi*_x0``), the mean of
    the last ten recorded samples with that of the first ten (no verdict with fewer than 20).
    A preference loss over pairs queried during the run gets no verdict: each sample is a loss
    on other pairs, drawn from a policy that got better (rlhf_grid.brl's loss rises while its
    true return reaches the optimum's)."""
    if "exact_at_x0" in result.extra:  # the model-free solvers' check: phi itself, both ends
        start, end = result.extra["exact_at_x0"], result.objective
        if end <= start + 1e-9 * (1 + abs(start)):
            return None
        return (f"phi(x) {problem.sign * end:.6g} at the final x against "
                f"{problem.sign * start:.6g} at x0, both with the follower solved exactly")
    if "objective_is" in result.extra:
        if len(objectives) < 2 * _SAMPLES_COMPARED or result.extra.get("queries"):
            return None
        first = sum(objectives[:_SAMPLES_COMPARED]) / _SAMPLES_COMPARED
        last = sum(objectives[-_SAMPLES_COMPARED:]) / _SAMPLES_COMPARED
        if last <= first + 1e-9 * (1 + abs(first)):
            return None
        return (f"the last {_SAMPLES_COMPARED} recorded samples average "
                f"{problem.sign * last:.6g}, the first {_SAMPLES_COMPARED} "
                f"{problem.sign * first:.6g}")
    if not objectives or result.objective <= objectives[0] + 1e-9 * (1 + abs(objectives[0])):
        return None
    return f"{problem.sign * objectives[0]:.6g} at the first iterate"


def _exact_rows(problem: TabularProblem, exact: dict[str, float] | None) -> list[tuple]:
    """A check at the final x (option verify), beside the solver's running estimates."""
    if exact is None:
        return []
    text = (f"||grad phi|| {exact['hypergrad_norm']:.3g}"
            + (f", stationarity {exact['stationarity']:.3g}" if problem.bounded else ""))
    return [("exact at x", text + " (follower and adjoint solved)")]


def _lagging(running: list[float], exact: dict[str, float] | None) -> str | None:
    """The exact stationarity beside the last running one, when it is over 10x larger."""
    if exact is None or not running or not math.isfinite(running[-1]):
        return None
    truth, last = exact["stationarity"], running[-1]
    if not math.isfinite(truth) or truth < 1e-6 or truth <= 10 * last:
        return None
    if last > 0:
        return f"{truth:.3g}, {truth / last:.0f}x the running estimate ({last:.3g})"
    return f"{truth:.3g}, where the running estimate was 0"


def _abbreviate(x: torch.Tensor) -> str:
    """``x`` in one line: all of it when short, else its first and last entries and its shape."""
    flat = x.detach().cpu().flatten().tolist()
    if x.dim() == 0:  # a scalar variable
        return f"{flat[0]:.6g}"
    if len(flat) <= _X_SHOWN:
        shape = f" (shape {tuple(x.shape)})" if x.dim() > 1 else ""  # flattened: say so
        return "[" + ", ".join(f"{v:.4g}" for v in flat) + "]" + shape
    half = _X_SHOWN // 2
    shown = [f"{v:.4g}" for v in flat[:half]] + ["..."] + [f"{v:.4g}" for v in flat[-half:]]
    return f"[{', '.join(shown)}] (shape {tuple(x.shape)})"
