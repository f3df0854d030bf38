"""brl: a declarative modelling language for bilevel reinforcement learning.

The embedding API (docs/ir.md):

    program = parse_file("problems/maze_nav.brl")      # IR (frozen dataclasses with spans)
    checked = compile_file("problems/maze_nav.brl")    # IR + semantic checks + values
    text = to_json(checked.program); same = from_json(text)
    problem = lower(checked, device="cpu")              # TabularProblem for the solvers

Every user error raises `BrlError`, whose `.diagnostics` carry codes, messages and spans.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import ir
from .diagnostics import BrlError, Diagnostic, SourceFile
from .elaborate import CheckedProgram, SolverCatalog, elaborate
from .instance import TabularProblem
from .lowering import lower
from .parser import decode, parse_expression, parse_source
from .serialize import IRFormatError, from_json, json_schema, to_json

__version__ = "0.1.0"

MAX_FILE_BYTES = 64 << 20


def read_source(path: str | Path) -> SourceFile:
    p = Path(path)
    too_large = BrlError([Diagnostic("E003", f"file is larger than {MAX_FILE_BYTES >> 20} MiB",
                                     None)], SourceFile(str(path), ""))
    try:
        if p.stat().st_size > MAX_FILE_BYTES:
            raise too_large
        with p.open("rb") as f:  # at most the limit and one byte: a device or a pipe has no
            data = f.read(MAX_FILE_BYTES + 1)  # size to check beforehand (/dev/zero)
        if len(data) > MAX_FILE_BYTES:
            raise too_large
    except IsADirectoryError:
        raise BrlError([Diagnostic("E002", "is a directory, not a .brl file", None)],
                       SourceFile(str(path), "")) from None
    except OSError as exc:
        raise BrlError([Diagnostic("E002", f"cannot read file: {exc.strerror}", None)],
                       SourceFile(str(path), "")) from None
    return decode(data, str(path))


def parse_file(path: str | Path) -> ir.Program:
    return parse_source(read_source(path))


def compile_source(
    text: str,
    name: str = "<string>",
    *,
    base_dir: str | Path | None = None,
    overrides: dict[str, object] | None = None,
    seed: int | None = None,
    solver_catalog: SolverCatalog | None = None,
) -> CheckedProgram:
    """Parse and check brl source text.  ``overrides`` maps param names to value expressions
    (as `-D name=value` does); ``solver_catalog`` validates the `solve` statement's options."""
    source = SourceFile(name, text)
    return _checked(parse_source(source), source, base_dir, overrides, seed, solver_catalog)


def compile_program(
    program: ir.Program,
    text: str = "",
    *,
    base_dir: str | Path | None = None,
    overrides: dict[str, object] | None = None,
    seed: int | None = None,
    solver_catalog: SolverCatalog | None = None,
) -> CheckedProgram:
    """Check an IR program (say one read with `from_json` and edited); ``text``, the source
    its spans point into, if any, lets diagnostics quote it."""
    if not isinstance(program, ir.Program):
        raise TypeError(f"compile_program takes an ir.Program, not {type(program).__name__}")
    return _checked(program, SourceFile(program.source, text), base_dir, overrides, seed,
                    solver_catalog)


def _checked(program: ir.Program, source: SourceFile, base_dir: str | Path | None,
             overrides: dict[str, object] | None, seed: int | None,
             solver_catalog: SolverCatalog | None) -> CheckedProgram:
    parsed = {key: parse_expression(_override_text(key, value), f"-D {key}")
              for key, value in (overrides or {}).items()}
    return elaborate(program, source, Path(base_dir) if base_dir is not None else None, parsed,
                     seed, solver_catalog)


def _override_text(key: str, value: object) -> str:
    """An override as brl text: text as given; a number (Python's, numpy's or a 0-d tensor)
    or an array of them (nested lists, a numpy array, a tensor) as a brl literal, so that
    ``for lam in np.linspace(...)`` and data already in numpy need no formatting by hand."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return repr(int(value) if isinstance(value, int) else float(value))  # any size
    if not isinstance(value, bool):
        try:
            array = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)
        except (TypeError, ValueError, RuntimeError):
            array = None
        if array is not None and array.dtype.kind in "iuf" and array.size:
            return _literal(array)
    raise TypeError(f"overrides[{key!r}]: give the value as brl text, such as '0.5' or "
                    f"'[0, 1]', as a number, or as an array of numbers, not "
                    f"{type(value).__name__}")


def _literal(array: np.ndarray) -> str:
    if array.ndim == 0:
        return str(int(array)) if array.dtype.kind in "iu" else repr(float(array))
    return "[" + ", ".join(_literal(item) for item in array) + "]"


def compile_file(path: str | Path, **kwargs) -> CheckedProgram:
    source = read_source(path)
    return compile_source(source.text, source.name, base_dir=Path(path).parent, **kwargs)


__all__ = [
    "BrlError",
    "CheckedProgram",
    "Diagnostic",
    "IRFormatError",
    "SourceFile",
    "TabularProblem",
    "compile_file",
    "compile_program",
    "compile_source",
    "from_json",
    "ir",
    "json_schema",
    "lower",
    "parse_file",
    "parse_source",
    "read_source",
    "to_json",
]
