"""The soft-MDP kernel's fused CPU loops (``native.c``), compiled on first use.

A soft Bellman step in torch is eight passes over ``S*A`` values and an adjoint step three,
each a separate kernel with its own dispatch; ``native.c`` makes one pass per step and runs a
whole loop in one call (1.3 to 2.3 times faster per run of steps, docs/benchmarks.md section
16). It is compiled with the machine's C compiler into a cache folder the first time it is
needed (about a second, once per machine and source version) and loaded with ctypes. Where
there is no compiler, or the build or the load fails, ``library()`` returns ``None`` and the
kernel keeps torch's loops, which give the same numbers up to rounding. ``BRL_NATIVE=0`` turns
it off.

Only this package's own C file is ever compiled; nothing a ``.brl`` file says reaches the
compiler.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("native.c")
# -march=native: the file's name carries the CPU's flags, so a cache shared between machines
# never hands one machine's build to another. -fno-math-errno lets gcc call the vector exp and
# log (errno is never read); it changes no value, unlike -ffast-math.
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared"]
_WIDE = ["-mprefer-vector-width=512"]  # where the CPU has AVX-512 (10-20% faster steps)
_LIBS = ["-lmvec", "-lm"]

_lock = threading.Lock()
_state: dict[str, object] = {}  # "library": the loaded CDLL or None, "why": a reason for None


def enabled() -> bool:
    return os.environ.get("BRL_NATIVE", "1") != "0"


def _cache_dir() -> Path:
    if os.environ.get("BRL_CACHE_DIR"):
        return Path(os.environ["BRL_CACHE_DIR"])
    root = os.environ.get("XDG_CACHE_HOME", "")
    # a relative XDG_CACHE_HOME is invalid (the XDG specification): ignored
    return Path(root) / "brl" if os.path.isabs(root) else Path.home() / ".cache" / "brl"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            return next((line for line in info if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _compiler() -> list[str]:
    """The compiler's command: ``$CC`` as the shell would split it (``ccache gcc``), else
    ``cc`` or ``gcc``; a ``$CC`` that is not found is an error, not a quiet change of
    compiler."""
    if os.environ.get("CC", "").strip():
        command = shlex.split(os.environ["CC"])
        if shutil.which(command[0]) is None:
            raise RuntimeError(f"CC={os.environ['CC']!r}: {command[0]} is not found")
        return command
    found = shutil.which("cc") or shutil.which("gcc")
    if found is None:
        raise RuntimeError("no C compiler (cc or gcc) on the PATH")
    return [found]


_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


def _owned(path: Path) -> bool:
    """Whether ``path`` belongs to this user and nobody else may write to it: a library that
    another user could have put or changed there is never loaded."""
    info = path.stat()
    return info.st_uid == os.getuid() and not info.st_mode & _WRITABLE_BY_OTHERS


def _private_folder() -> Path:
    """The cache folder, made (or made again) writable by this user alone; refused when it
    belongs to another user. (A umask of 002 would otherwise leave it group-writable.)"""
    folder = _cache_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid():
        raise RuntimeError(f"{folder} belongs to another user")
    if info.st_mode & _WRITABLE_BY_OTHERS:
        folder.chmod(stat.S_IMODE(info.st_mode) & ~_WRITABLE_BY_OTHERS)
    return folder


def _build(compiler: list[str], rebuild: bool) -> Path:
    source = SOURCE.read_bytes()
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True,
                             errors="replace", timeout=60).stdout
    cpu = _cpu_flags()
    flags = _FLAGS + (_WIDE if " avx512f " in f" {cpu} " else [])
    key = hashlib.sha256(b"\0".join([source, " ".join(flags + _LIBS).encode(), version.encode(),
                                     cpu.encode(), platform.machine().encode()])).hexdigest()[:16]
    folder = _private_folder()
    target = folder / f"native-{key}.so"
    if target.exists() and not rebuild and _owned(target):
        return target  # else built anew: a file someone else could have written is replaced
    with tempfile.TemporaryDirectory(dir=folder) as work:
        built = Path(work) / target.name
        result = subprocess.run([*compiler, *flags, str(SOURCE), "-o", str(built), *_LIBS],
                                capture_output=True, text=True, errors="replace", timeout=300)
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines()
            raise RuntimeError(lines[-1] if lines else f"{' '.join(compiler)} exited with "
                               f"{result.returncode}")
        built.chmod(0o755)  # whatever the umask: never writable by others
        os.replace(built, target)  # atomic: a concurrent build writes the same bytes
    return target


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, ptr, dbl, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double, ctypes.c_int
    lib.brl_bellman_steps.restype = i32
    lib.brl_bellman_steps.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, dbl, i32, dbl, dbl, ptr,
                                      dbl, i64, ptr, ptr, ptr, i32]
    lib.brl_product.restype = None
    lib.brl_product.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, i32]
    lib.brl_policy.restype = i32
    lib.brl_policy.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, dbl, dbl, ptr, ptr, ptr, i32]
    lib.brl_adjoint_steps_scatter.restype = None
    lib.brl_adjoint_steps_scatter.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr,
                                              dbl, dbl, i64, ptr, ptr, ptr, ptr, i32]
    lib.brl_adjoint_steps.restype = None
    lib.brl_adjoint_steps.argtypes = [i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, dbl, dbl, i64,
                                      ptr, ptr, ptr, ptr, i32]
    return lib


def _load() -> ctypes.CDLL:
    compiler = _compiler()
    try:
        return _declare(ctypes.CDLL(str(_build(compiler, rebuild=False))))
    except (OSError, AttributeError):  # a damaged or foreign file in the cache: build anew
        return _declare(ctypes.CDLL(str(_build(compiler, rebuild=True))))


def library() -> ctypes.CDLL | None:
    """The compiled library, or ``None`` (``why()`` says why); built or loaded once."""
    if not enabled():
        return None
    with _lock:
        if "library" not in _state:
            try:
                _state["library"] = _load()
            except Exception as error:  # any failure at all leaves torch's loops
                _state["library"], _state["why"] = None, f"{type(error).__name__}: {error}"
        return _state["library"]  # type: ignore[return-value]


def why() -> str:
    """Why ``library()`` is ``None`` ("" when it is not)."""
    if not enabled():
        return "turned off by BRL_NATIVE=0"
    library()
    return str(_state.get("why", ""))


def usable(*tensors: Tensor) -> bool:
    """Whether the fused loops can take these tensors: float64, on the CPU."""
    return all(t.device.type == "cpu" and t.dtype == torch.float64 for t in tensors)


def _checked(t: Tensor | None, shape: tuple[int, ...], name: str) -> Tensor | None:
    """``t`` contiguous, after checking what C cannot: a wrong shape or dtype there would read
    past a buffer, where torch raises or broadcasts."""
    if t is None:
        return None
    if t.dtype != torch.float64 or t.device.type != "cpu" or tuple(t.shape) != shape:
        raise ValueError(f"the fused loops need {name} as float64 of shape {shape} on the CPU, "
                         f"got {t.dtype} of shape {tuple(t.shape)} on {t.device}")
    return t.contiguous()


def _address(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class Ell:
    """``P`` in the layout of ``native.c``: per action and successor slot, one column of
    successor indices and one of probabilities over all states (see ``from_csr``)."""

    def __init__(self, idx: Tensor, val: Tensor, count: Tensor, slots: int) -> None:
        self.idx, self.val, self.count, self.slots = idx, val, count, slots
        self.n_actions, self.n_states = count.shape

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.idx, self.val, self.count))

    @staticmethod
    def from_csr(csr: Tensor, n_states: int, n_actions: int, max_ratio: float = 2.0
                 ) -> Ell | None:
        """From ``P``'s CSR matrix (rows ``s*A + a``); ``None`` where padding every row to the
        longest would store more than ``max_ratio`` times the nonzeros (a few long rows)."""
        crow = csr.crow_indices().long()
        count = crow.diff()
        slots = int(count.max()) if count.numel() else 0
        nnz = csr.values().numel()
        if slots == 0 or slots * count.numel() > max_ratio * nnz + 64:  # (+64: tiny P)
            return None
        S, A = n_states, n_actions
        row = torch.repeat_interleave(torch.arange(count.numel()), count)
        slot = torch.arange(nnz) - crow[:-1][row]
        # entry k of row s*A + a goes to (a*K + k)*S + s
        target = (row % A * slots + slot) * S + row // A
        idx = torch.zeros(A * slots * S, dtype=torch.int32)
        val = torch.zeros(A * slots * S, dtype=torch.float64)
        idx[target] = csr.col_indices().to(torch.int32)
        val[target] = csr.values().to(torch.float64)
        count = count.view(S, A).T.contiguous().to(torch.int32)
        return Ell(idx, val, count, slots)


def bellman_steps(ell: Ell, base: Tensor, gamma: float, shift: float | None,
                  exp_floor: float, u: Tensor, n: int, first: Tensor | None = None,
                  first_scale: float = 0.0) -> Tensor:
    """``n`` soft Bellman steps on ``u = V / tau`` (``brl_bellman_steps``); ``base`` is
    ``(A, S)``, ``r / tau`` less ``shift`` when a constant shift is given; ``first``: ``P.expect``
    of the first step's input, ``(S, A)``, with the factor that makes it ``gamma P u``."""
    lib = library()
    S, A = ell.n_states, ell.n_actions
    base, u = _checked(base, (A, S), "base"), _checked(u, (S,), "u")
    first = _checked(first, (S, A), "first")
    out, tmp = torch.empty(S, dtype=torch.float64), torch.empty(S, dtype=torch.float64)
    status = lib.brl_bellman_steps(
        S, A, ell.slots, ell.idx.data_ptr(), ell.val.data_ptr(), ell.count.data_ptr(),
        base.data_ptr(), gamma, shift is not None, 0.0 if shift is None else shift, exp_floor,
        _address(first), first_scale, n, u.data_ptr(), out.data_ptr(), tmp.data_ptr(),
        torch.get_num_threads())
    if status != 0:
        raise MemoryError("the fused soft Bellman loop could not allocate its buffers")
    return out


def product(ell: Ell, v: Tensor) -> Tensor:
    """``P v`` as ``(A, S)`` (``brl_product``): the fused loops' product alone, for timing."""
    lib = library()
    S, A = ell.n_states, ell.n_actions
    v = _checked(v, (S,), "v")
    out = torch.empty(A, S, dtype=torch.float64)
    lib.brl_product(S, A, ell.slots, ell.idx.data_ptr(), ell.val.data_ptr(),
                    ell.count.data_ptr(), v.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return out


def policy(ell: Ell, base: Tensor, scale: float, exp_floor: float, V: Tensor
           ) -> tuple[Tensor, Tensor]:
    """``softmax_a(base + scale * P V)`` and ``P V``, both ``(S, A)`` (``brl_policy``); ``base``
    is ``(A, S)``."""
    lib = library()
    S, A = ell.n_states, ell.n_actions
    base, V = _checked(base, (A, S), "base"), _checked(V, (S,), "V")
    expected = torch.empty(S, A, dtype=torch.float64)
    pi = torch.empty(S, A, dtype=torch.float64)
    status = lib.brl_policy(S, A, ell.slots, ell.idx.data_ptr(), ell.val.data_ptr(),
                            ell.count.data_ptr(), base.data_ptr(), scale, exp_floor,
                            V.data_ptr(), expected.data_ptr(), pi.data_ptr(),
                            torch.get_num_threads())
    if status != 0:
        raise MemoryError("the fused policy could not allocate its buffers")
    return pi, expected


# adjoint steps scatter along P's rows once the S*A vector that the gathering version reads
# at random (through P^T) outgrows a core's cache (at 10^5 states and 4 actions: 1.6 against
# 2.6 ms a step; at 10^4, where it fits, gathering is as fast for one step and 1.7x faster for
# 30), unless the threads' private copies of the result would take too much memory
_SCATTER_MIN_PAIRS = 1 << 18
_SCATTER_MAX_BYTES = 1 << 28


def adjoint_steps(ell: Ell, csr_t: Tensor, g: Tensor, pi: Tensor, d: Tensor | None,
                  c: Tensor | None, sign: float, alpha: float, z: Tensor, n: int) -> Tensor:
    """``n`` steps ``z <- c + alpha P^T (g + sign * pi * (z + d)[s])``: ``brl_adjoint_steps``
    through ``csr_t`` (``P^T`` as ``Transitions`` stores it, int32 column indices) or
    ``brl_adjoint_steps_scatter`` through ``ell``."""
    lib = library()
    S, A = ell.n_states, ell.n_actions
    threads = torch.get_num_threads()
    # every tensor whose address goes to C is held in a local until the call returns
    g, pi, z = _checked(g, (S, A), "g"), _checked(pi, (S, A), "pi"), _checked(z, (S,), "z")
    d, c = _checked(d, (S,), "d"), _checked(c, (S,), "c")
    out, tmp = torch.empty(S, dtype=torch.float64), torch.empty(S, dtype=torch.float64)
    if S * A >= _SCATTER_MIN_PAIRS and threads * S * 8 <= _SCATTER_MAX_BYTES:
        acc = torch.empty(threads * S, dtype=torch.float64)
        lib.brl_adjoint_steps_scatter(
            S, A, ell.slots, ell.idx.data_ptr(), ell.val.data_ptr(), ell.count.data_ptr(),
            g.data_ptr(), pi.data_ptr(), _address(d), _address(c), sign, alpha, n, z.data_ptr(),
            out.data_ptr(), tmp.data_ptr(), acc.data_ptr(), threads)
        return out
    rows, cols, vals = csr_t.crow_indices().long(), csr_t.col_indices(), csr_t.values()
    if cols.dtype != torch.int32:
        raise ValueError("the fused adjoint loop needs int32 column indices")
    y = torch.empty(S * A, dtype=torch.float64)
    lib.brl_adjoint_steps(S, A, rows.data_ptr(), cols.data_ptr(), vals.data_ptr(), g.data_ptr(),
                          pi.data_ptr(), _address(d), _address(c), sign, alpha, n, z.data_ptr(),
                          out.data_ptr(), tmp.data_ptr(), y.data_ptr(), threads)
    return out
