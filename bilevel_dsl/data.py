"""Loading data files named by a .brl file, safely.

Rules (docs/language.md, "Data files"): the path is relative to the folder of the .brl file and
must stay inside it (no absolute paths, no `..` escape, symbolic links resolved first); only
`.npy` (read with allow_pickle=False) and `.csv` (numbers only) are read; at most 1 GiB.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .ir import Span
from .values import EvalError

MAX_BYTES = 1 << 30
SUFFIXES = (".npy", ".csv")


def load_array(name: str, base_dir: Path | None, span: Span) -> np.ndarray:
    if base_dir is None:
        raise EvalError("E603", "`load` needs a folder to read from, and this text was "
                        "compiled without one", span,
                        "compile the file with `brl` or `compile_file`, or give `compile_source` "
                        "the folder to read from (`base_dir=...`)")
    relative = Path(name)
    if relative.is_absolute():
        raise EvalError("E603", f"`{name}` is an absolute path", span,
                        "data paths are relative to the folder of the .brl file")
    if ".." in relative.parts:
        raise EvalError("E603", f"`{name}` goes up a folder (`..`), which data paths may not",
                        span, "data files must lie next to the .brl file or below it")
    if relative.suffix.lower() not in SUFFIXES:
        raise EvalError("E602", f"cannot load `{name}`: only .npy and .csv files are read", span)
    root = base_dir.resolve()
    try:
        path = (root / relative).resolve()
    except (RuntimeError, OSError):  # a loop of symbolic links
        raise EvalError("E601", f"`{name}` cannot be resolved: its symbolic links form a loop",
                        span) from None
    if root not in path.parents:
        raise EvalError("E603", f"`{name}` resolves outside the folder of this .brl file", span,
                        "a symbolic link may not lead out of the folder")
    if path.is_dir():
        raise EvalError("E601", f"`{name}` is a folder, not a data file", span)
    if path.exists() and not path.is_file():
        raise EvalError("E601", f"`{name}` is not a regular file (a pipe or a device?)", span)
    if not path.is_file():
        raise EvalError("E601", f"data file `{name}` not found", span,
                        f"looked for {path}")
    if path.stat().st_size > MAX_BYTES:
        raise EvalError("E602", f"data file `{name}` is larger than 1 GiB", span)
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, allow_pickle=False)
            if not isinstance(array, np.ndarray):  # an .npz archive under a .npy name
                array.close()
                raise EvalError("E602", f"`{name}` is an .npz archive, not a .npy array", span,
                                "save one array with numpy.save")
        else:
            with warnings.catch_warnings():  # an empty file is reported below, not warned
                warnings.simplefilter("ignore", UserWarning)
                array = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=1,
                                   comments="#")
    except MemoryError:  # a small file whose header claims a huge array
        raise EvalError("E602", f"cannot read `{name}`: its array is too large", span) from None
    except (ValueError, OSError) as exc:
        if "pickle" in str(exc):  # numpy's message suggests unpickling; brl never does
            raise EvalError("E602", f"cannot read `{name}`: it is not a numeric .npy array "
                            "(it holds Python objects, or is not a .npy file)", span,
                            "brl never unpickles data; save a numeric array with numpy.save"
                            ) from None
        problem = _csv_problem(path) if path.suffix.lower() == ".csv" else None
        raise EvalError("E602", f"cannot read `{name}`: {problem or exc}", span,
                        "a .csv file holds numbers separated by commas, the same number on "
                        "every line (`#` starts a comment)" if problem else None) from None
    if (not np.issubdtype(array.dtype, np.number) and array.dtype != np.bool_) or \
            np.iscomplexobj(array):
        raise EvalError("E602", f"`{name}` does not hold real numbers (dtype {array.dtype})",
                        span)
    if array.size == 0:
        raise EvalError("E602", f"`{name}` holds no numbers", span)
    array = array.astype(np.float64)
    if not np.all(np.isfinite(array)):
        raise EvalError("E602", f"`{name}` contains NaN or infinite values", span)
    return array


def _csv_problem(path: Path) -> str | None:
    """Where a CSV file stops being a table of numbers, counting lines from 1 as an editor
    does (numpy's own message counts rows from 0 and suggests its own options)."""
    width = None
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for number, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        fields = [field.strip() for field in text.split(",")]
        for column, field in enumerate(fields, start=1):
            try:
                float(field)
            except ValueError:
                return f"line {number}, value {column} (`{field[:20]}`) is not a number"
        if width is None:
            width = len(fields)
        elif len(fields) != width:
            return (f"line {number} has {len(fields)} value{'s' if len(fields) != 1 else ''}, "
                    f"the first line {width}")
    return None
