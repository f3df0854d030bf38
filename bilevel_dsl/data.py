"""Loading data files named by a .brl file, safely.

Rules (docs/language.md, "Data files"): the path is relative to the folder of the .brl file and
must stay inside it (no absolute paths, no `..` escape, symbolic links resolved first); only
`.npy` (read with allow_pickle=False) and `.csv` (numbers only) are read; at most 1 GiB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .ir import Span
from .values import EvalError

MAX_BYTES = 1 << 30
SUFFIXES = (".npy", ".csv")


def load_array(name: str, base_dir: Path | None, span: Span) -> np.ndarray:
    if base_dir is None:
        raise EvalError("E603", "data files can only be loaded from a .brl file on disk", span,
                        "compile the file with `brl` or `compile_file` instead of a string")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise EvalError("E603", f"`{name}` is outside the folder of this .brl file", span,
                        "data files must lie next to the .brl file or below it")
    if relative.suffix.lower() not in SUFFIXES:
        raise EvalError("E603", f"cannot load `{name}`: only .npy and .csv files are read", span)
    root = base_dir.resolve()
    path = (root / relative).resolve()
    if root not in path.parents:
        raise EvalError("E603", f"`{name}` resolves outside the folder of this .brl file", span)
    if not path.is_file():
        raise EvalError("E601", f"data file `{name}` not found", span,
                        f"looked for {path}")
    if path.stat().st_size > MAX_BYTES:
        raise EvalError("E602", f"data file `{name}` is larger than 1 GiB", span)
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            array = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=1, comments="#")
    except (ValueError, OSError) as exc:
        raise EvalError("E602", f"cannot read `{name}`: {exc}", span) from None
    if not np.issubdtype(array.dtype, np.number) and array.dtype != np.bool_:
        raise EvalError("E602", f"`{name}` does not hold numbers (dtype {array.dtype})", span)
    array = array.astype(np.float64)
    if not np.all(np.isfinite(array)):
        raise EvalError("E602", f"`{name}` contains NaN or infinite values", span)
    return array
