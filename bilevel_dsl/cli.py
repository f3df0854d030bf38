"""The `brl` command line: check, compile, solve, solvers, gradcheck.

User errors are printed as diagnostics (exit 1); nothing reaches the user as a Python traceback
unless BRL_DEBUG=1 is set.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import __version__, ir, json_schema, lower, read_source, to_json
from .diagnostics import BrlError, Diagnostic, render
from .elaborate import elaborate, out_of_memory
from .parser import parse_expression, parse_source

# 2 is argparse's, for a command line it cannot read; an internal error (a bug) is 70, BSD's
# EX_SOFTWARE, so that a script can tell it from both
EXIT_OK, EXIT_ERROR, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 70, 130


class UsageError(Exception):
    pass


def _key_value(text: str, flag: str) -> tuple[str, str]:
    if "=" not in text:
        raise UsageError(f"{flag} {text}: write {flag} name=value")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key.isidentifier():
        raise UsageError(f"{flag} {text}: `{key}` is not a name")
    return key, value.strip()


def _overrides(pairs: list[str] | None) -> dict[str, str]:
    return dict(_key_value(p, "-D") for p in pairs or [])


def solver_catalog(solver: str, options: dict[str, Any]) -> list[tuple[str, str, str | None,
                                                                       str | None]]:
    """Validate a `solve` statement against the solver registry (the language imports no
    solver; the command line connects the two)."""
    from solvers import REGISTRY, OptionError, UnknownSolverError
    from solvers.registry import OptionRangeError

    if solver == "auto":  # the solver is picked for the problem when it is solved
        return [("E802", "`auto` takes no options: which solver's they are is not known yet",
                 name, "name the solver to give it options, e.g. `solve m_sobirl(...)`")
                for name in options]
    try:
        spec = REGISTRY.get(solver)
    except UnknownSolverError as exc:
        # The registry's message is two lines; a diagnostic's message is one (the second is the
        # hint), or the source excerpt would be printed between them.
        message, _, rest = str(exc).partition("\n")
        return [("E801", message, None, rest.strip() or None)]
    problems = []
    known = {o.name for o in spec.options}
    for name, value in options.items():
        if name not in known:
            problems.append(("E802", f"solver `{spec.name}` has no option `{name}`", name,
                             REGISTRY.option_hint(spec, name) or "its options are "
                             + ", ".join(sorted(known))))
            continue
        try:
            REGISTRY.validate_options(spec, {name: value})
        except OptionRangeError as exc:
            problems.append(("E805", str(exc), name, exc.hint))
        except OptionError as exc:
            message, _, rest = str(exc).partition("\n")
            problems.append(("E803", message, name, rest.strip() or None))
    if not problems and spec.rules is not None:
        for involved, message in spec.rules(REGISTRY.validate_options(spec, options)):
            at = next((name for name in involved if name in options), None)
            problems.append(("E805", message, at, None))
    return problems


def _compile(path: str, args: argparse.Namespace, catalog: bool = True):
    timings: dict[str, float] = {}
    start = time.perf_counter()
    source = read_source(path)
    program = parse_source(source)
    timings["parse"] = time.perf_counter() - start
    start = time.perf_counter()
    overrides = {k: parse_expression(v, f"-D {k}") for k, v in _overrides(args.define).items()}
    checked = elaborate(program, source, Path(path).parent, overrides,
                        getattr(args, "seed", None), solver_catalog if catalog else None)
    timings["compile"] = time.perf_counter() - start
    for warning in checked.warnings:
        print(render(warning, source), file=sys.stderr)
    return checked, timings


# ---------------------------------------------------------------- commands


def cmd_check(args: argparse.Namespace) -> int:
    status = EXIT_OK
    for path in args.files:
        try:
            checked, timings = _compile(path, args)
            _check_file_solver(checked)
        except BrlError as err:
            print(err.render(), file=sys.stderr)
            status = EXIT_ERROR
            continue
        n = len(checked.program.statements)
        checks = f"{checked.checks} check{'' if checked.checks == 1 else 's'} passed"
        print(f"{path}: ok ({n} statement{'' if n == 1 else 's'}, {checks}, "
              f"{sum(timings.values()) * 1000:.0f} ms)")
    return status


def _check_file_solver(checked: Any) -> None:
    """The solver named by the file's `solve` statement must be able to solve the file (E806,
    at the statement, with the table of what is missing)."""
    import solvers

    solve = checked.solve
    if solve is None or solve.solver == "auto" or checked.upper is None or (
            checked.deep is None and (checked.var is None or checked.lower is None)):
        return  # nothing to solve yet: `brl solve` says what is missing (E503)
    try:
        solvers.resolve(lower(checked, device="cpu"), None)
    except solvers.SolverError as exc:
        raise _at_solve_statement(checked, exc) from None


def _at_solve_statement(checked: Any, exc: Exception) -> BrlError:
    """A solver's refusal of the file, placed at the `solve` statement that named it."""
    first, _, table = str(exc).partition("\n")
    return BrlError([Diagnostic("E806", first.rstrip(":"), checked.solve.decl.solver_span,
                                "name another solver here, or pass --solver NAME",
                                tuple(line for line in table.splitlines() if line.strip()))],
                    checked.source)


def cmd_compile(args: argparse.Namespace) -> int:
    if args.schema:
        if args.file:
            raise UsageError("brl compile: --schema prints the IR's schema, which does not "
                             "depend on a file: give --schema or a file, not both")
        _write(json.dumps(json_schema(), indent=2), args.output)
        return EXIT_OK
    if not args.file:
        raise UsageError("brl compile: give a .brl file (or --schema)")
    checked, _ = _compile(args.file, args)
    _write(to_json(checked.program), args.output)
    return EXIT_OK


def _write(text: str, output: str | None) -> None:
    if output is None or output == "-":
        print(text)
        return
    path = Path(output)
    if path.is_dir():
        raise UsageError(f"-o {output}: that is a folder; give a file name, e.g. "
                         f"{path / 'ir.json'}")
    if not path.parent.is_dir():
        raise UsageError(f"-o {output}: the folder {path.parent} does not exist")
    if path.is_file() and not _holds_ir(path):
        raise UsageError(f"-o {output}: that file exists and holds no IR (a run's result.json?); "
                         "give another name, or remove it first")
    if path.exists() and not path.is_file():  # /dev/null, a pipe: written to, never replaced
        try:
            with path.open("w", encoding="utf-8") as handle:
                handle.write(text + "\n")
        except OSError as exc:
            raise UsageError(f"-o {output}: cannot write it ({exc.strerror})") from None
        return
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"-o {output}: cannot write it ({exc.strerror})") from None
    print(f"wrote {path}", file=sys.stderr)


def _holds_ir(path: Path) -> bool:
    """Whether ``path`` is empty, an IR document or the IR's schema: what ``brl compile -o``
    may replace."""
    try:
        with path.open("rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return not head.strip() or b'"node": "Program"' in head or b'"$schema"' in head


def cmd_solvers(args: argparse.Namespace) -> int:
    from solvers import REGISTRY, describe

    if args.name:
        print(describe(REGISTRY.get(args.name)))
    else:
        print(REGISTRY.capability_matrix())
    return EXIT_OK


def _set_options(spec, pairs: list[str] | None) -> dict[str, Any]:
    from solvers import REGISTRY, OptionError, parse_option_value

    by_name = {o.name: o for o in spec.options}
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, value = _key_value(pair, "--set")
        if key not in by_name:
            hint = REGISTRY.option_hint(spec, key) or "its options are " + ", ".join(
                sorted(by_name))
            raise OptionError(f"--set {key}: solver `{spec.name}` has no option `{key}`; {hint}")
        try:
            options[key] = parse_option_value(by_name[key], value)
        except OptionError as exc:  # one line, saying which flag
            raise OptionError(f"--set {pair.strip()}: {exc}") from None
    return options


def cmd_solve(args: argparse.Namespace) -> int:
    import torch

    import solvers
    from solvers.output import default_out_dir

    for flag, given in (("--out", args.out), ("--resume", args.resume)):
        if given is not None and not given.strip():  # '' would have meant the default folder
            raise UsageError(f"{flag} needs a folder, got an empty name")
    if args.resume is not None:  # a resumed run writes where it was saved
        if args.force:
            raise UsageError(f"--resume {args.resume} continues the run in that folder, and "
                             "--force would replace it: drop one of them")
        if args.out is not None and Path(args.out) != Path(args.resume):
            raise UsageError(f"--resume {args.resume} continues the run in that folder, and "
                             f"--out {args.out} would be ignored; copy the folder first to "
                             "continue a copy (`cp -r OLD NEW`, then --resume NEW)")
        if not Path(args.resume).is_dir():
            raise UsageError(f"--resume {args.resume}: no such folder; give the --out folder "
                             "of the run to continue")
    # a resumed run continues with the solver, seed and options it was saved with; --set
    # changes those the checkpoint allows (outer, time_limit, ...) and the solver refuses others
    saved = _saved_run(args.resume, args.file)
    source_sha256 = _source_sha256(args.file)
    if saved is not None and saved.get("source_sha256") not in (None, source_sha256):
        _tell(f"note: {args.file} has changed since the run in {args.resume} was saved; it "
              "goes on with the file as it is now (a changed reward, objective or MDP makes "
              "what follows differ from what was saved)", sys.stderr)
    if saved is not None and not isinstance(saved.get("defines"), dict):
        _tell(f"note: the run in {args.resume} was saved by an older brl, which did not keep "
              "its -D values: give the same -D as its command did (its result.json names the "
              "command)", sys.stderr)
    seed_given = args.seed is not None
    if saved is not None and args.seed is None and isinstance(saved.get("seed"), int):
        args.seed = saved["seed"]
    if saved is not None and isinstance(saved.get("defines"), dict):
        given = _overrides(args.define)
        args.define = [f"{name}={text}" for name, text in saved["defines"].items()
                       if name not in given and isinstance(text, str)] + (args.define or [])
    checked, timings = _compile(args.file, args)
    declared = checked.program.first(ir.SeedDecl)
    if saved is not None and not seed_given and declared is not None \
            and declared.seed != saved.get("seed"):
        _tell(f"note: resuming with the saved run's seed {saved.get('seed')}; {args.file} "
              f"now says seed {declared.seed}", sys.stderr)
    start = time.perf_counter()
    problem = lower(checked, device=args.device)
    timings["compile"] += time.perf_counter() - start
    requested = args.solver
    if requested is None and saved is not None and isinstance(saved.get("solver"), str):
        # the saved run's solver (a --solver of its command, perhaps), unless the file has
        # changed to name another: that is refused below, with the --solver that resumes it
        named = checked.solve.solver if checked.solve is not None else "auto"
        changed = saved.get("source_sha256") not in (None, source_sha256)
        requested = named if changed and named != "auto" else saved["solver"]
    try:
        spec, _ = solvers.resolve(problem, requested)
    except solvers.SolverError as exc:
        if requested is None and checked.solve is not None and checked.solve.solver != "auto":
            raise _at_solve_statement(checked, exc) from None
        raise
    options = _set_options(spec, args.set)
    if saved is not None and isinstance(saved.get("options"), dict):
        options = _resumed_options(problem, spec, saved["options"], options, args.resume)
    spec, options = solvers.resolve(problem, spec.name, options)
    if saved is None:
        _note_dropped_options(problem, spec)
    torch.manual_seed(problem.seed)
    out_dir = Path(args.resume or args.out or default_out_dir(problem.name))
    made_here = not os.path.exists(out_dir)  # False where the name is too long, say
    _recover_replaced(out_dir)
    out_dir = _output_folder(out_dir, replace=args.force or bool(args.resume),
                             flag="--resume" if args.resume else "--out")
    with _claimed(out_dir, "--resume" if args.resume else "--out"):
        aside = _set_aside(out_dir) if args.force and not args.resume else None
        try:
            return _solve_into(out_dir, made_here, args, problem, spec, options, timings,
                               source_sha256)
        finally:
            if aside is not None:
                _drop_or_restore(out_dir, aside)


def _solve_into(out_dir: Path, made_here: bool, args: argparse.Namespace, problem: Any,
                spec: Any, options: dict[str, Any], timings: dict[str, float],
                source_sha256: str | None) -> int:
    """Run the solver and write its folder (which this process holds, see ``_claimed``)."""
    import solvers
    from solvers.output import summary_table, write_run
    from solvers.progress import ProgressMonitor

    deep = getattr(problem, "environment", "tabular") == "gymnasium"
    meta = {
        "solver": spec.name,
        "options": options,
        "timings": timings,
        "seed": problem.seed,
        "device": str(problem.device),
        "command": " ".join(["brl", *sys.argv[1:]]),
        "source": str(args.file),
        "out_dir": str(out_dir),
        "defines": _overrides(args.define),
        "source_sha256": source_sha256,
    }
    extra: dict[str, Any] = {}
    if deep:  # checkpoints go to the output folder as the run goes
        extra = {"out": out_dir, "resume": _checkpoint(args.resume),
                 "defines": meta["defines"], "source_sha256": meta["source_sha256"]}
    continuation, run_options = None, options
    if args.resume and not deep:  # a tabular run takes up again at its record's x
        continuation = _continuation(out_dir, problem, spec, options, meta["defines"])
        problem = continuation.problem(problem)
        run_options = continuation.options(options)
        _tell(f"note: resuming at iteration {continuation.k} of the run in {out_dir}, from its "
              "x; the solver's running estimates start afresh there", sys.stderr)
    start = time.perf_counter()
    keeper = None if deep else _keeper(out_dir, problem, meta, start, continuation)
    monitor = ProgressMonitor(int(options.get("outer", 1)), sign=problem.sign,
                              stream=open(os.devnull, "w") if args.quiet else sys.stderr,
                              keeper=keeper, keep_every=args.save_every,
                              offset=continuation.k if continuation is not None else 0)
    try:
        result = spec.run(problem, run_options, monitor, **extra)
        _show_end(monitor, result)
        if continuation is not None:
            result = continuation.merged(result)
    except KeyboardInterrupt:
        # stopped while setting up (a deep run's first queries and warm-up): nothing was
        # saved, so the folder made for the run goes too rather than stay behind empty
        if made_here and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
            print(f"note: stopped before the run had anything to save; {out_dir} removed",
                  file=sys.stderr)
        raise
    except Exception as exc:
        monitor.close()
        if not deep and monitor.last_kept is not None:
            _save_failed(out_dir, args.file, problem, meta | {"timings": {
                **timings, "solve": time.perf_counter() - start}}, monitor.last_kept(),
                continuation, exc)
        raise
    finally:
        monitor.close()
    timings["solve"] = time.perf_counter() - start
    with solvers.interrupts_deferred():  # a second Ctrl-C must not cut the record short
        if deep:
            from solvers.deep.output import deep_summary as summary
            from solvers.deep.output import write_deep_run as write
        else:
            summary, write = summary_table, write_run
        try:
            write(out_dir, problem, result, meta)
        except OSError as exc:  # a full disk or a vanished folder: the summary still shows x
            _tell(summary(problem, result, meta))
            kept = [p.name for p in sorted(out_dir.iterdir())] if out_dir.is_dir() else []
            _tell(f"error: cannot write the run to {out_dir}: {exc.strerror or exc}; "
                  + (f"what it holds ({', '.join(kept)}) may be incomplete"
                     if kept else "the summary above is all that is left of it")
                  + " (free space, or pass --out with another folder)", sys.stderr)
            return EXIT_ERROR
        _tell(summary(problem, result, meta))
    if result.extra.get("failure"):  # a run that could not go on, its work kept
        _tell(f"error: {result.extra['failure']}; the run stopped after iteration "
              f"{result.iterations}, which the output folder keeps", sys.stderr)
        return EXIT_ERROR
    if result.stopped_because == "interrupted" and (not deep or (out_dir / "checkpoint").is_dir()):
        _tell(f"note: the run is saved in {out_dir}; continue it with `brl solve {args.file} "
              f"--resume {out_dir}`", sys.stderr)
    if result.stopped_because == solvers.NOT_FINITE:
        when = (f"became NaN or infinite after iteration {result.iterations}; the results above "
                "are the last finite iterate's" if result.iterations or
                math.isfinite(result.objective) else
                "is NaN or infinite at the initial x already: no iterate was finite")
        _tell(f"error: the objective or the hyper-gradient {when}. "
              "A reward such as log(x) at x = 0 does this (bound the variable away from it), "
              "as do a step too large (--set beta=...) and a param set to inf or a huge value",
              sys.stderr)
        return EXIT_ERROR
    return _interrupted() if result.stopped_because == "interrupted" else EXIT_OK


def _save_failed(out_dir: Path, file: str, problem: Any, meta: dict[str, Any], done: Any,
                 continuation: Any, exc: Exception) -> None:
    """A tabular run that fails in mid-course (an index that the variable's values made
    fractional, memory that ran out) keeps the iterations it had finished: its folder, with
    ``stopped_because: failed`` and the failure, from which --resume goes on."""
    from solvers import interrupts_deferred
    from solvers.output import summary_table, write_run

    if isinstance(exc, BrlError):
        first = exc.diagnostics[0]
        where = f" (line {first.span.line}, column {first.span.column})" if first.span else ""
        failure = f"error[{first.code}]: {first.message}{where}"
    else:
        failure = f"{type(exc).__name__}: {exc}".splitlines()[0]
    result = dataclasses.replace(done, stopped_because="failed",
                                 extra={**done.extra, "failure": failure})
    if continuation is not None:
        result = continuation.merged(result)
    try:
        with interrupts_deferred():
            write_run(out_dir, problem, result, meta)
    except OSError as write_error:
        _tell(f"warning: cannot save the failed run's iterations in {out_dir}: "
              f"{write_error.strerror or write_error}", sys.stderr)
        return
    _tell(summary_table(problem, result, meta))
    _tell(f"note: the run failed after iteration {result.iterations}, which {out_dir} keeps "
          f"(continue from there with `brl solve {file} --resume {out_dir}`); the failure:",
          sys.stderr)


def _keeper(out_dir: Path, problem: Any, meta: dict[str, Any], start: float,
            continuation: Any = None) -> Callable[[Any], None]:
    """Save a tabular run's record as it goes (``result.json`` with ``stopped_because =
    unfinished``; deep runs keep checkpoints instead): a run killed outright, by kill -9 or the
    OOM killer, then leaves its last iterate and curve. A failed save is said once; the run
    goes on and tries again at the end."""
    from solvers import interrupts_deferred
    from solvers.output import result_record, write_json_atomic

    failed: list[str] = []

    def keep(result: Any) -> None:
        if continuation is not None:
            result = continuation.merged(result)
        timings = {**meta["timings"], "solve": time.perf_counter() - start}
        try:
            with interrupts_deferred():
                write_json_atomic(out_dir / "result.json",
                                  result_record(problem, result, meta | {"timings": timings}))
        except OSError as exc:
            if not failed:
                failed.append(str(exc))
                _tell(f"warning: cannot save the run as it goes in {out_dir}: "
                      f"{exc.strerror or exc}; it goes on", sys.stderr)
    return keep


def _show_end(monitor: Any, result: Any) -> None:
    """The progress line at the run's last iterate: a solver reports each iterate before its
    step, so the line would otherwise end one short (`999/1000`)."""
    norms = result.history.get("hypergrad_norm") or [math.nan]
    if result.history.get("iteration") and result.history["iteration"][-1] < result.iterations:
        norm = (result.extra.get("exact") or {}).get("hypergrad_norm", norms[-1])
        monitor.update(result.iterations, result.objective, norm)


def _note_dropped_options(problem: Any, spec: Any) -> None:
    """Say so when ``--solver`` leaves the options of the file's `solve` statement behind:
    they belong to the file's solver (docs/solvers.md)."""
    from solvers import REGISTRY

    named = getattr(problem, "solver", None)
    given = getattr(problem, "solver_options", None) or {}
    if not given or named in (None, "auto") or REGISTRY.get(named).name == spec.name:
        return
    listed = ", ".join(f"{name} = {value}" for name, value in given.items())
    print(f"note: the file's options for {named} ({listed}) do not apply to {spec.name}; "
          "pass those you want with --set", file=sys.stderr)


# Files a run writes into its output folder; --force replaces them so that nothing of the old
# run (a checkpoint above all, which --resume would bring back) survives beside the new one.
_RUN_OUTPUTS = ("result.json", "curve.png", "policy.png", "reward_net.pt")
_RUN_FOLDERS = ("checkpoint", "checkpoint.tmp", "checkpoint.old")
_REPLACED = ".brl-replaced"  # where --force keeps the old run until the new one saves


@contextlib.contextmanager
def _claimed(out_dir: Path, flag: str) -> Iterator[None]:
    """One run at a time per output folder: a lock on the folder itself (no file left in
    it), released when the run ends or its process dies. Two runs given the same --out both
    ended well, and one silently replaced the other's record."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    descriptor = os.open(out_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"{flag} {out_dir} is in use by another brl run; wait for it to "
                             "end, or choose another folder") from None
        for stale in out_dir.glob(".result.json.*.tmp"):  # a write that a kill cut short
            stale.unlink(missing_ok=True)
        yield
    finally:
        os.close(descriptor)


def _holds_run(out_dir: Path) -> bool:
    return any((out_dir / name).exists() for name in _RUN_OUTPUTS + _RUN_FOLDERS)


def _recover_replaced(out_dir: Path) -> None:
    """Put back a run that ``--force`` set aside when the replacing run was killed before it
    saved anything (the folder then holds ``.brl-replaced/`` and no run): it is the only copy,
    and the next run must find it, to refuse, replace or resume it. Where the replacing run did
    save, the set-aside run was replaced and goes."""
    from solvers.output import remove_path

    aside = out_dir / _REPLACED
    try:
        if not aside.is_dir():
            return
    except OSError:  # a name too long, say: _output_folder reports it
        return
    if _holds_run(out_dir):
        remove_path(aside)
        return
    _put_back(out_dir, aside)
    _tell(f"note: {out_dir} holds again the run that an earlier --force set aside (the run "
          "that was to replace it was stopped before it saved anything)", sys.stderr)


def _set_aside(out_dir: Path) -> Path | None:
    """Move the old run's files out of the new run's way (into ``.brl-replaced/``); None when
    there were none."""
    aside = out_dir / _REPLACED
    old = [name for name in _RUN_OUTPUTS + _RUN_FOLDERS if (out_dir / name).exists()]
    if not old:
        return None
    aside.mkdir()
    for name in old:
        (out_dir / name).rename(aside / name)
    return aside


def _drop_or_restore(out_dir: Path, aside: Path) -> None:
    """Remove the replaced run once the new one has saved an iteration of its own; else put
    it back, so that a new run which fails or is stopped at once does not cost the old one."""
    from solvers.output import remove_path

    if _holds_run(out_dir) and not _stopped_at_once(out_dir):
        remove_path(aside)
        return
    for name in _RUN_OUTPUTS + _RUN_FOLDERS:  # the new run's record of nothing
        remove_path(out_dir / name)
    _put_back(out_dir, aside)
    _tell(f"note: the new run saved nothing, so the run it was to replace is kept in {out_dir}",
          sys.stderr)


def _put_back(out_dir: Path, aside: Path) -> None:
    for path in aside.iterdir():
        path.rename(out_dir / path.name)
    aside.rmdir()


def _stopped_at_once(out_dir: Path) -> bool:
    """Whether the record in ``out_dir`` is of a run stopped before its first iteration (a
    tabular run writes one even then), with no checkpoint beside it."""
    try:
        record = json.loads((out_dir / "result.json").read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(record, dict) and record.get("iterations") == 0
            and record.get("stopped_because") == "interrupted"
            and not (out_dir / "checkpoint").exists())


def _output_folder(out_dir: Path, replace: bool, flag: str = "--out") -> Path:
    """Create the output folder before the run, so that a bad ``--out`` fails in a second, not
    after a long solve whose results would then be lost; refuse one that holds another run's
    record or checkpoint unless ``replace``."""
    try:
        if not replace and out_dir.is_dir() and any(
                (out_dir / name).exists() for name in ("result.json", "checkpoint")):
            raise UsageError(f"--out {out_dir} already holds a run; choose another folder, pass "
                             "--force to replace it, or --resume it")
        if out_dir.exists() and not out_dir.is_dir():
            raise UsageError(f"{flag} {out_dir}: that is a file, not a folder; pass {flag} with "
                             "a folder")
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".brl-write-test"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"cannot write the output folder {out_dir}: {exc.strerror or exc}; "
                         f"pass {flag} with a folder you can write"
                         f"{' (it is created if needed)' if flag == '--out' else ''}") from None
    return out_dir


def _saved_run(resume: str | None, path: str) -> dict[str, Any] | None:
    """The solver, seed, options and -D values of the run saved in a ``--resume`` folder (a
    deep run's checkpoint, else a tabular run's record), when it is a run of the problem in
    ``path``; None otherwise (the solver or ``Continuation.of`` then says what is missing, or
    which problem the run belongs to)."""
    if resume is None:
        return None
    from solvers.deep.sobirl_sac import find_checkpoint, saved_run
    from solvers.resume import read_record, record_identity

    checkpoint = find_checkpoint(Path(resume))
    if checkpoint is not None:
        saved = saved_run(checkpoint)
    else:  # a tabular run's record
        record = read_record(Path(resume))
        saved = record_identity(record) if record is not None else None
    try:
        name = parse_source(read_source(path)).name
    except BrlError:
        return None  # compiling the file reports it
    return saved if saved is not None and saved["problem"] == name else None


def _resumed_options(problem: Any, spec: Any, saved: dict[str, Any], given: dict[str, Any],
                     folder: str) -> dict[str, Any]:
    """The options of a resumed run: ``--set`` over the saved run's (but its `time_limit`,
    which was that invocation's); a note for each option of the file's `solve` statement that
    the saved value overrides."""
    from solvers import REGISTRY, OptionError, SolverError
    from solvers.deep.sobirl_sac import RESUME_MAY_CHANGE
    from solvers.resume import TABULAR_MAY_CHANGE

    known = {option.name for option in spec.options}
    kept = {name: value for name, value in saved.items()
            if name in known and name != "time_limit" and name not in given}
    for name, value in kept.items():
        try:
            REGISTRY.validate_options(spec, {name: value})
        except OptionError as exc:  # a record or checkpoint edited by hand, or garbled
            raise SolverError(f"--resume {folder}: the saved run's option {name} = "
                              f"{json.dumps(value)} is not valid ({str(exc).splitlines()[0]}), "
                              "so it is damaged and cannot be resumed; start afresh with "
                              "another --out (or --force)") from None
    deep = getattr(problem, "environment", "tabular") == "gymnasium"
    may_change = RESUME_MAY_CHANGE if deep else TABULAR_MAY_CHANGE
    if getattr(problem, "solver", None) == spec.name:
        for name, value in (getattr(problem, "solver_options", None) or {}).items():
            if name in kept and kept[name] != value:
                how = (f"--set {name}={value} to use it" if name in may_change else
                       "a resumed run keeps it; start afresh with another --out to use the "
                       "file's")
                print(f"note: resuming with the saved run's {name} = {kept[name]}; the file "
                      f"says {value} ({how})", file=sys.stderr)
    return {**kept, **given}


def _source_sha256(path: str) -> str | None:
    """The SHA-256 of the file's text, kept with a run so that ``--resume`` can say when the
    file has changed since; None where it cannot be read (compiling it says why)."""
    try:
        return hashlib.sha256(read_source(path).text.encode()).hexdigest()
    except (BrlError, OSError, UnicodeError):
        return None


def _continuation(out_dir: Path, problem: Any, spec: Any, options: dict[str, Any],
                  defines: dict[str, str]) -> Any:
    """The saved tabular run that ``--resume`` takes up, checked against this one."""
    from solvers.output import _jsonable
    from solvers.resume import Continuation

    identity = {"problem": problem.name, "seed": problem.seed, "solver": spec.name,
                "options": json.loads(json.dumps(_jsonable(options))), "defines": defines}
    return Continuation.of(out_dir, problem, identity, options["outer"])


def _checkpoint(resume: str | None) -> Path | None:
    """The checkpoint inside a ``--resume`` folder, or a clear error when there is none."""
    if resume is None:
        return None
    from solvers import SolverError
    from solvers.deep.sobirl_sac import CHECKPOINT, find_checkpoint

    path = find_checkpoint(Path(resume))
    if path is None:
        raise SolverError(f"--resume {resume}: no checkpoint there (expected "
                          f"{Path(resume) / CHECKPOINT}/); a run saves one every "
                          "`checkpoint_every` outer iterations and when it ends")
    return path


def cmd_gradcheck(args: argparse.Namespace) -> int:
    from solvers.gradcheck import gradcheck

    checked, _ = _compile(args.file, args)
    problem = lower(checked, device=args.device)
    if getattr(problem, "environment", "tabular") == "gymnasium":
        raise UsageError(f"brl gradcheck checks the exact hyper-gradient of tabular problems; "
                         f"{args.file} declares a gymnasium environment, whose reward network "
                         "is trained from samples (docs/deep.md)")
    rows = gradcheck(problem, n_random=args.points, eps=args.eps, seed=problem.seed,
                     n_directions=args.directions, progress=_GradcheckProgress(sys.stderr))
    print(f"{'point':<10} {'rel. error':>11} {'max abs err':>12} {'||grad||':>10} {'dirs':>5}")
    failed = by_atol = 0
    for row in rows:
        # At a stationary point the relative error of a ~0 gradient is noise: an absolute
        # error below --atol passes too.
        relative_ok = row.rel_error <= args.tol
        ok = relative_ok or row.max_abs_error <= args.atol
        failed += not ok
        by_atol += ok and not relative_ok
        note = "" if relative_ok else ("  ok: abs. error below --atol" if ok else "  FAIL")
        print(f"{row.label:<10} {row.rel_error:>11.2e} {row.max_abs_error:>12.2e} "
              f"{row.grad_norm:>10.3g} {row.n_directions:>5}{note}")
    # the worst relative error among the points it judges (a point that passed on the absolute
    # error has a meaningless one); NaN counts as the worst, which max() would pass over
    judged = [row.rel_error for row in rows
              if not (row.rel_error > args.tol and row.max_abs_error <= args.atol)]
    verdict = "ok" if not failed else f"FAILED at {failed} point{'s' if failed > 1 else ''}"
    if judged:
        worst = max(judged, key=lambda e: math.inf if math.isnan(e) else e)
        print(f"{verdict}: worst relative error {worst:.2e} (tolerance {args.tol:g}, or "
              f"absolute error below {args.atol:g})")
    else:
        print(f"{verdict}: largest absolute error "
              f"{max(row.max_abs_error for row in rows):.2e} (below --atol {args.atol:g})")
    if by_atol:
        print(f"  {by_atol} point{'s' if by_atol > 1 else ''} passed on the absolute error: the "
              "derivatives along its directions are about zero (the hyper-gradient there, or "
              "its projection on a few random directions in many dimensions), so their "
              "relative error says nothing")
    if failed:
        print("  " + _gradcheck_advice(rows, args))
    return EXIT_OK if not failed else EXIT_ERROR


class _GradcheckProgress:
    """Where gradcheck is, on stderr: on a big problem each direction takes seconds. A line
    rewritten in place on a terminal; elsewhere (a log) one line per point, when it is done."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.since = stream, time.perf_counter()  # the last point's end
        self.live = hasattr(stream, "isatty") and stream.isatty()

    def __call__(self, label: str, done: int, total: int) -> None:
        now = time.perf_counter()
        seconds = now - self.since
        if done == total:
            self.since = now
        if self.live:
            end = "\r\033[K" if done == total else ""
            self.stream.write(f"\r\033[Kgradcheck {label}: {done}/{total} directions, "
                              f"{seconds:.0f} s{end}")
        elif done == total:
            self.stream.write(f"gradcheck {label}: {total} directions, {seconds:.1f} s\n")
        self.stream.flush()


def _gradcheck_advice(rows: list, args: argparse.Namespace) -> str:
    """Why the worst failing point may fail, from how its finite differences moved when the
    step was halved."""
    failed = [r for r in rows if not (r.rel_error <= args.tol or r.max_abs_error <= args.atol)]
    broken = [r for r in failed if not (math.isfinite(r.rel_error)
                                        and math.isfinite(r.max_abs_error))]
    if broken:
        return (f"at {broken[0].label} the hyper-gradient or phi is not finite (NaN or "
                "infinite): a reward such as sqrt(x) or log(x) at the point's x = 0? Check "
                "away from it with --points, or bound the variable")
    worst = max(failed, key=lambda r: r.rel_error)
    ratio = worst.halving_ratio
    far_above_rounding = worst.step_error > 1e3 * worst.rounding
    if ratio > 1.5 and far_above_rounding:
        return (f"at {worst.label} the finite differences grew about {ratio:.1f}x when their "
                "step was halved, far above what rounding in phi could do: phi changes on a "
                "scale much smaller than the step (a low temperature with large rewards, near a "
                f"tie?); try a much smaller step, --eps {args.eps / 1000:g}")
    if ratio > 1.5:
        return (f"at {worst.label} the finite differences got worse when their step was halved: "
                f"rounding in phi swamps them (large rewards or objectives?); try a larger "
                f"step, --eps {args.eps * 100:g}")
    if ratio < 0.35:  # about 1/4: the h^2 term
        return (f"at {worst.label} the finite differences improved about 4x when their step "
                f"was halved: phi curves sharply there (a low temperature?); try a smaller "
                f"step, --eps {args.eps / 10:g}")
    if ratio < 0.75:  # about 1/2: an error linear in h, which a kink within h makes
        return (f"at {worst.label} the finite differences improved about 2x when their step "
                "was halved: phi bends sharply within the step (a kink of abs, norm, max or "
                "min near this point, or a temperature much smaller than the step); try "
                f"--eps {args.eps / 10:g}, or other points with --points")
    smaller = (f", and a much smaller step (--eps {args.eps / 1000:g}), in case phi changes on "
               "a scale far below this one (a low temperature?)") if far_above_rounding else ""
    return (f"at {worst.label} the finite differences did not move when their step was halved: "
            "either the hyper-gradient is wrong there or phi has a kink at that point (a max, "
            f"min or abs at a tie, or a bound); try other points with --points{smaller}")


# ---------------------------------------------------------------- parser


def _at_least(low: float, kind: type) -> Any:
    """An argparse type: a number of ``kind`` that is at least ``low``."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):  # not a number, NaN or infinite
            what = "an integer" if kind is int else "a finite number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return value
    return parse


def _positive(text: str) -> float:
    """An argparse type: a float above zero."""
    value = _at_least(-math.inf, float)(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def _seed(text: str) -> int:
    """A seed as the file's `seed` statement takes it: an integer in [0, 2^63)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"a seed is an integer from 0 to 2^63 - 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="brl",
        description="brl: a modelling language and solvers for bilevel reinforcement learning.",
    )
    parser.add_argument("--version", action="version", version=f"brl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def defines(p: argparse.ArgumentParser) -> None:
        p.add_argument("-D", dest="define", action="append", metavar="NAME=VALUE",
                       help="override a `param` of the file, or the start of its `var` "
                            "(type-checked), e.g. -D lam=0.1")

    p = sub.add_parser("check", help="parse and check .brl files",
                       description="Parse and check .brl files; print located diagnostics. "
                       "Exit 1 if any file has an error.")
    p.add_argument("files", nargs="+", metavar="FILE")
    defines(p)
    p.set_defaults(run=cmd_check, command_parser=p)

    p = sub.add_parser("compile", help="print the IR of a file as JSON",
                       description="Print the checked IR of a .brl file as JSON (docs/ir.md), "
                       "or the IR's JSON Schema with --schema.")
    p.add_argument("file", nargs="?", metavar="FILE")
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    p.add_argument("--schema", action="store_true", help="print the IR's JSON Schema")
    defines(p)
    p.set_defaults(run=cmd_compile, command_parser=p)

    p = sub.add_parser("solve", help="solve a bilevel problem",
                       description="Compile FILE and solve it; write result.json, curve.png "
                       "(and policy.png for grid worlds) to the output folder.")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--solver", default=None, metavar="NAME",
                   help="a solver name or `auto` (default: the file's `solve`, else auto)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda", "auto"),
                   help="where to compute (default: the file's `solve ... on`, else auto)")
    p.add_argument("--set", action="append", metavar="OPTION=VALUE",
                   help="override a solver option, e.g. --set outer=1000")
    p.add_argument("--out", metavar="DIR", help="output folder (default runs/<problem>-<time>)")
    p.add_argument("--force", action="store_true",
                   help="replace the run already in the --out folder")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the run in its output folder DIR: a deep run from its "
                   "checkpoint, a tabular run from the last x its record kept")
    p.add_argument("--seed", type=_seed, default=None, help="override the file's seed")
    p.add_argument("--save-every", type=_at_least(0.0, float), default=30.0, metavar="SECONDS",
                   help="a tabular run saves its record (result.json, `unfinished`) this often "
                   "while it runs, so that a killed run leaves its last iterate (default 30; 0 "
                   "rewrites the whole record at every iteration, slow on long runs); deep runs "
                   "save checkpoints (checkpoint_every)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    defines(p)
    p.set_defaults(run=cmd_solve, command_parser=p)

    p = sub.add_parser("solvers", help="list the solvers and what they can do",
                       description="Print the capability matrix, or one solver's options.")
    p.add_argument("name", nargs="?", metavar="NAME")
    p.set_defaults(run=cmd_solvers, command_parser=p)

    p = sub.add_parser("gradcheck", help="check hyper-gradients against finite differences",
                       description="Compare the hyper-gradient with central finite differences "
                       "of phi(x) = f(x, pi*_x) at the initial x and random points; exit 1 "
                       "above the tolerance.")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--points", type=_at_least(0, int), default=2,
                   help="random points besides x0")
    p.add_argument("--tol", type=_positive, default=1e-5, help="relative error tolerance")
    p.add_argument("--atol", type=_at_least(0.0, float), default=1e-8,
                   help="absolute error that passes whatever the relative error")
    p.add_argument("--eps", type=_positive, default=1e-5,
                   help="finite-difference step, relative to max(1, |x|); the differences at "
                   "eps and eps / 2 are extrapolated")
    p.add_argument("--directions", type=_at_least(1, int), default=10,
                   help="random unit directions per point when x has more than 50 entries "
                   "(default 10; each costs four solves of phi)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--seed", type=_seed, default=None, help="override the file's seed")
    defines(p)
    p.set_defaults(run=cmd_gradcheck, command_parser=p)
    return parser


_stopped_by: list[int] = []  # the stop signals received (SIGTERM, SIGHUP), for the exit status


def _terminated(signum: int, frame: Any) -> None:
    _stopped_by.append(signum)
    raise KeyboardInterrupt  # SIGTERM (kill, timeout, a scheduler) stops a run like Ctrl-C


def _interrupted() -> int:
    """The exit status of a stopped run: 128 + the signal, as a shell reports a process the
    signal ended (130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP), so that scripts and
    schedulers can tell who stopped it."""
    return 128 + _stopped_by[-1] if _stopped_by else EXIT_INTERRUPTED


# SIGTERM (kill, timeout, a scheduler) and SIGHUP (a closed terminal, a dropped ssh session)
# stop a run like Ctrl-C, which saves what it has
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP")
                     if hasattr(signal, name))


def main(argv: list[str] | None = None) -> int:
    shown = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        if threading.current_thread() is not threading.main_thread():
            return _main(argv)
        # a signal the caller ignores (`nohup` ignores SIGHUP) stays ignored
        previous = {sig: signal.signal(sig, _terminated) for sig in STOP_SIGNALS
                    if signal.getsignal(sig) is not signal.SIG_IGN}
        _stopped_by.clear()
        try:
            return _main(argv)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        warnings.showwarning = shown


def _tell(text: str, stream: Any = None) -> None:
    """Print, unless the reader has gone (a closed terminal, `| head`): what is said after a
    run is said after its record is written, and a dead stream must not turn it into an
    error."""
    try:
        print(text, file=stream if stream is not None else sys.stdout, flush=True)
    except OSError:
        pass


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """A library's warning (GMRES stopping short, a system with NaN in it) as one of the
    command line's own lines, without a path into brl's source."""
    _tell(f"warning: {message}", sys.stderr)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # in the command's own usage (`brl solve a b`), where they follow the command
        given = list(sys.argv[1:] if argv is None else argv)
        after = (given.index(unknown[0]) > given.index(args.command)
                 if unknown[0] in given and args.command in given else True)
        (getattr(args, "command_parser", parser) if after else parser).error(
            f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_ERROR
    try:
        return args.run(args)
    except BrlError as err:
        print(err.render(), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        _tell("interrupted", sys.stderr)
        return _interrupted()
    except BrokenPipeError:  # `brl solvers | head -1`: the reader has gone, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
        from solvers import SolverError

        if isinstance(exc, (SolverError, UsageError)):
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR
        if os.environ.get("BRL_DEBUG"):
            raise
        if isinstance(exc, (MemoryError, RuntimeError)) and out_of_memory(exc):
            wanted = re.search(r"allocate (\d+) bytes", str(exc))
            size = f" ({int(wanted[1]) / 2**30:.1f} GiB at once)" if wanted else ""
            print(f"error: the run needs more memory than this machine has{size}; make the "
                  "problem smaller; with a sampled follower (sobirl, stoc_sobirl, drlhf), "
                  "whose rollouts take memory for every state-action pair, try --set "
                  "q_rollouts=1 or --set follower=exact; on a gym problem, a smaller "
                  "reward_net (hidden = [...]), --set sac_width=... or --set buffer=...",
                  file=sys.stderr)
            return EXIT_ERROR
        print(f"internal error: {type(exc).__name__}: {exc}\n"
              "This is a bug in brl; rerun with BRL_DEBUG=1 for the traceback and report it.",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
