"""Continuing a saved run: whose run a saved record or checkpoint is, and a tabular run taken up
again at the last iterate its record kept.

A deep run resumes from its checkpoint exactly (``solvers.deep.sobirl_sac``). A tabular run
keeps no solver state, only its record (``result.json``, written as it goes and at the end),
so ``--resume`` restarts the solver at the record's ``x``: the history and the iteration count
go on, but the solver's running estimates (m_sobirl's values and adjoint, a model-free
follower's policy) start afresh there, solved at ``x`` where the solver can (m_sobirl resumes
with ``start = solved``), and a sampling solver draws from streams seeded for the
continuation. The numbers after the restart therefore differ from an uninterrupted run's by
those estimates' lag.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .registry import SolverError
from .result import SolveResult

RECORD = "result.json"
# options a resumed tabular run may change: they say how long to go on and what to record or
# check, not what is computed
TABULAR_MAY_CHANGE = frozenset({"outer", "time_limit", "tol", "log_every", "verify",
                                "query_budget"})
# cumulative counts in a history and a result's extra: a continuation's own start from zero
_CUMULATIVE = ("time", "queries", "transitions")


def check_identity(where: str, saved: dict[str, Any], identity: dict[str, Any],
                   may_change: frozenset[str]) -> None:
    """Refuse to mix two runs: a SolverError naming every difference in problem, seed, solver,
    the deep environment, follower (discount, temperature) and reward network, ``-D`` values
    and options (but those in
    ``may_change``) between the run saved in ``where`` (``the checkpoint in DIR``, say) and
    this one."""
    if saved["problem"] != identity["problem"]:  # then nothing else is worth comparing
        raise SolverError(f"{where} belongs to problem `{saved['problem']}`; this file is "
                          f"problem `{identity['problem']}`. Resume it with the file of that "
                          "problem, or start afresh with another --out")
    before, now, remedy = [], [], []
    for name, flag in (("seed", "--seed"), ("solver", "--solver")):
        if saved[name] != identity[name]:
            before.append(f"{name} {saved[name]}")
            now.append(f"{name} {identity[name]}")
            remedy.append(f"{flag} {saved[name]}")
    for part in ("environment", "follower", "reward_net"):  # as the file declares them
        was, now_is = saved.get(part), identity.get(part)
        if isinstance(was, dict) and isinstance(now_is, dict):
            for name in sorted(was.keys() & now_is.keys()):
                if was[name] != now_is[name]:
                    before.append(f"{part} {name} = {json.dumps(was[name])}")
                    now.append(f"{part} {name} = {json.dumps(now_is[name])}")
                    remedy.append(f"the file's {part} as it was ({name} = "
                                  f"{json.dumps(was[name])})")
    saved_defines = saved.get("defines")
    if isinstance(saved_defines, dict) and saved_defines != identity["defines"]:
        before.append(f"-D {_defines(saved_defines)}")
        now.append(f"-D {_defines(identity['defines'])}")
        remedy.append(" ".join(f"-D {name}={text}" for name, text in saved_defines.items())
                      or "no -D")
    if saved["solver"] == identity["solver"]:  # other solvers take other options
        options = identity["options"]
        for name in sorted(saved["options"].keys() & options.keys() - may_change):
            value = saved["options"][name]
            if value != options[name]:
                before.append(f"{name} = {value}")
                now.append(f"{name} = {options[name]}")
                remedy.append(f"--set {name}={value}")
    if before:
        raise SolverError(f"{where} was saved with {', '.join(before)}; this run has "
                          f"{', '.join(now)}. Resume with {' '.join(remedy)}, or start afresh "
                          "with another --out")


def _defines(defines: dict[str, str]) -> str:
    return ", ".join(f"{name}={text}" for name, text in defines.items()) or "(none)"


def is_identity(run: Any) -> bool:
    """Whether ``run`` reads as a saved run's identity (problem, seed, solver, options)."""
    return isinstance(run, dict) and isinstance(run.get("problem"), str) and \
        whole(run.get("seed")) and isinstance(run.get("solver"), str) and \
        isinstance(run.get("options"), dict)


def whole(value: Any) -> bool:
    """A JSON integer that is not negative."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_record(folder: Path) -> dict[str, Any] | None:
    """A tabular run's record in ``folder`` as JSON, or None where there is none or it is not
    a tabular record; never raises (``Continuation.of`` says what is wrong with it)."""
    try:
        record = json.loads((Path(folder) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == "brl-result" else None


def record_identity(record: dict[str, Any]) -> dict[str, Any] | None:
    """The identity of the run a record belongs to, in the form a checkpoint keeps it."""
    solver = record.get("solver")
    run = {"problem": record.get("problem"), "seed": record.get("seed"),
           "solver": solver.get("name") if isinstance(solver, dict) else None,
           "options": solver.get("options") if isinstance(solver, dict) else None,
           "defines": record.get("defines"), "source_sha256": record.get("source_sha256")}
    return run if is_identity(run) else None


@dataclass(frozen=True)
class Continuation:
    """A tabular run taken up at iteration ``k`` of its record: ``x`` there and the history
    before it (the continuation's first iteration evaluates ``x`` again)."""

    x: torch.Tensor
    k: int
    history: dict[str, list[float]]
    resumed_at: tuple[int, ...]  # the iterations at which the saved run was resumed before
    spent: dict[str, float]  # of _CUMULATIVE, what the saved run had counted on reaching x

    @classmethod
    def of(cls, folder: Path, problem: Any, identity: dict[str, Any], outer: int
           ) -> Continuation:
        """The saved run in ``folder``, checked against this one; a clear SolverError when it
        is missing, damaged, another run's, or already at ``outer`` iterations."""
        path = Path(folder) / RECORD
        if not path.is_file():
            raise SolverError(f"--resume {folder}: no record there (expected {path}); a "
                              "tabular run writes it as it goes and when it ends")
        record = read_record(folder)
        if record is None:
            raise _damaged(path, "it is not a brl run record")
        saved = record_identity(record)
        if saved is None:
            raise _damaged(path, "its problem, seed, solver or options are garbled")
        check_identity(f"the run in {folder}", saved, identity, TABULAR_MAY_CHANGE)
        k = record.get("iterations")
        if not whole(k):
            raise _damaged(path, f"`iterations` is {json.dumps(k)}, not a count")
        x0 = problem.x0
        try:
            x = torch.tensor(record.get("x"), dtype=x0.dtype, device=x0.device)
        except (TypeError, ValueError, RuntimeError):
            raise _damaged(path, "`x` is not an array of numbers") from None
        if not bool(torch.isfinite(x).all()):
            raise _damaged(path, "`x` has entries that are not finite")
        if x.shape != x0.shape:
            raise SolverError(f"the run in {folder} has `{problem.var_name}` of shape "
                              f"{list(x.shape)}, and the file now declares it with shape "
                              f"{list(x0.shape)}; resume with the file as it was, or start "
                              "afresh with another --out")
        history = record.get("history")
        if not (isinstance(history, dict) and all(
                isinstance(v, list) and all(e is None or number(e) for e in v)
                for v in history.values())):
            raise _damaged(path, "its `history` is missing or garbled")
        if k >= outer:
            raise SolverError(f"the run in {folder} is at iteration {k}, and this run's outer "
                              f"= {outer}; resume with --set outer=N for an N above {k}")
        sign = problem.sign  # the record holds the user's sense, the solver the minimised one
        history = {name: [math.nan if e is None else (sign * e if name == "objective" else e)
                          for e in values] for name, values in history.items()}
        earlier = record.get("resumed_at")
        earlier = tuple(earlier) if isinstance(earlier, list) and all(map(whole, earlier)) else ()
        kept = _before(history, k)
        extra = record.get("extra") if isinstance(record.get("extra"), dict) else {}
        spent = {name: extra[name] if number(extra.get(name)) else kept[name][-1]
                 for name in _CUMULATIVE if number(extra.get(name)) or kept.get(name)}
        return cls(x, k, kept, earlier, spent)

    def problem(self, problem: Any) -> Any:
        """The problem the continuation solves: from ``x``, and with random streams of its own
        (seeded by the run's seed and ``k``: the same resumption draws the same numbers, but
        not those the run drew from its start again)."""
        return replace(problem, x0=self.x, seed=(problem.seed * 1_000_003 + self.k) % 2**63)

    def options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The options the solver runs the continuation with: the iterations and queries left,
        and the follower solved at ``x`` where the solver can start so (m_sobirl)."""
        left = options | {"outer": options["outer"] - self.k} | (
            {"start": "solved"} if "start" in options else {})
        budget, spent = options.get("query_budget") or 0, int(self.spent.get("queries", 0))
        if budget:
            if spent >= budget:
                raise SolverError(f"the saved run has asked {spent:,} preference queries, its "
                                  f"query_budget = {budget:,}; resume with --set "
                                  f"query_budget=N for an N above {spent}")
            left["query_budget"] = budget - spent
        return left

    def merged(self, result: SolveResult) -> SolveResult:
        """The continuation's result as the whole run's: iterations and history go on from the
        saved ones, and the time and counts (history and totals) from what the saved run had
        spent on reaching ``x``."""
        history = {}
        for name, values in result.history.items():
            if name == "iteration":
                values = [self.k + i for i in values]
            elif name in self.spent:
                values = [self.spent[name] + v for v in values]
            history[name] = self.history.get(name, []) + list(values)
        extra = result.extra | {"resumed_at": [*self.resumed_at, self.k]} | {
            name: type(result.extra[name])(self.spent[name] + result.extra[name])
            for name in self.spent if number(result.extra.get(name))}
        return replace(result, history=history, iterations=self.k + result.iterations,
                       extra=extra)


def _before(history: dict[str, list[float]], k: int) -> dict[str, list[float]]:
    """The entries of iterations before ``k``: by the ``iteration`` record where there is one
    (``log_every``), else the first ``k`` (one entry per iteration from 0)."""
    if "iteration" in history:
        keep = [i for i, it in enumerate(history["iteration"]) if it < k]
        return {name: [values[i] for i in keep if i < len(values)]
                for name, values in history.items()}
    return {name: values[:k] for name, values in history.items()}


def _damaged(path: Path, why: str) -> SolverError:
    return SolverError(f"{path} is damaged or incomplete ({why}), so the run cannot be resumed; "
                       "start afresh with another --out (or --force)")
