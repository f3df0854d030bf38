"""The one soft-MDP kernel shared by the language's lowering and every solver.

Transitions, soft Bellman operators and linear systems in ``(I - gamma P_pi)`` live here and
nowhere else, so a fix or a speed-up reaches every solver at once. Everything runs on the device
of its inputs with torch alone, except the sparse factorisation of ``I - gamma P_pi`` (SuperLU,
through scipy, on the host), and never assumes that rows of ``P`` sum to one: the lowering
removes the probability mass that flows into terminal states.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
import scipy.sparse.linalg
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import native

# Transitions.auto stores P sparse when at most this fraction of its entries is nonzero and it
# has more than _SPARSE_MIN_ENTRIES entries, or whenever the dense table would exceed
# _DENSE_MAX_BYTES. Below that size the dense matrix-vector product is as fast and simpler
# (docs/benchmarks.md section 18: a 5-successor random MDP ties at 256 states and 4 actions,
# and at 1,000 states dense storage made m_sobirl 15x slower).
SPARSE_DENSITY = 0.1
_SPARSE_MIN_ENTRIES = 1 << 18
_DENSE_MAX_BYTES = 1 << 30

# solve_policy_system(method="auto") factorises a dense S x S matrix up to this many states
# for dense P (200 MB and a few seconds at 5,000, next to P's own S*A*S entries; an LU costs
# about S / (50 A) products with P, fewer than GMRES takes).
DIRECT_MAX_STATES = 5000
# For sparse P it factorises the sparse matrix (SuperLU) where that pays (Transitions.lu_work):
# up to _SPARSE_LU_ALWAYS states, and above that where the state graph has a narrow envelope (a
# bandwidth at most _SPARSE_LU_MAX_BAND_FRACTION of the states and at most
# _SPARSE_LU_MAX_ENVELOPE multiply-adds for an elimination inside it: SuperLU's own ordering
# can need twice that off grids, so the trial takes seconds at most) and a trial factorisation
# needs at most _SPARSE_LU_MAX_WORK. Grid worlds pass (a 100 x 110 maze: 3.6e6, its envelope
# 1.6e8), and there GMRES is slow: gamma 0.99 and a nearly deterministic policy mix slowly
# (0.2-0.5 s a solve against 0.02 s for the factorisation and solve). Random MDPs do not:
# their chains are expanders, whose factors fill in (80 million entries and 80 s at 10^4
# states), but on which GMRES converges within a few dozen products.
_SPARSE_LU_ALWAYS = 200
_SPARSE_LU_MAX_BAND_FRACTION = 0.25
_SPARSE_LU_MAX_ENVELOPE = 1e10
_SPARSE_LU_MAX_WORK = 5e9

_GMRES_RESTART = 30
# Arnoldi's Gram-Schmidt projects a second time only where the first left less than this
# fraction of the vector's norm (Daniel, Gragg, Kaufman and Stewart's test): only then is the
# second pass over the basis needed for orthogonality.
_REORTHOGONALISE = 0.7

# Exponents of shifted rows (at most 0) are raised to this before exp: on CPU, exp is 5-20 times
# slower for arguments below about -708, whose results are subnormal or zero, and at low
# temperatures most entries land there. exp(-700) ~ 1e-304 is nothing next to the row maximum's
# exp(0) = 1, so sums, logs and normalised policies come out the same.
_EXP_FLOOR = -700.0


class _CsrProduct(torch.autograd.Function):
    """``M v`` for a constant CSR matrix; the backward is a product with the stored ``M^T``.

    torch would otherwise transpose the CSR matrix on every backward pass.
    """

    @staticmethod
    def forward(ctx, matrix: Tensor, matrix_t: Tensor, v: Tensor) -> Tensor:  # type: ignore[override]
        ctx.matrix, ctx.matrix_t = matrix, matrix_t
        return matrix @ v

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, None, Tensor]:  # type: ignore[override]
        return None, None, _CsrProduct.apply(ctx.matrix_t, ctx.matrix, grad.contiguous())


def _build_csr(rows: Tensor, cols: Tensor, values: Tensor, n_rows: int, n_cols: int) -> Tensor:
    """CSR matrix from COO triplets with duplicates summed and explicit zeros dropped.

    Indices are int32 whenever they fit: torch's CPU CSR product is about twice as fast then.
    Temporaries are freed (or reused in place) as soon as possible and the merge of duplicates
    is skipped when there are none (the generators never make any): at 2 * 10^7 entries this
    halves both the time and the extra memory of a build. On the CPU scipy's counting sort
    builds it (two to three times faster than torch's sort: 2.2 s against 4.6 s for 3.2 *
    10^7 entries).
    """
    index_dtype = torch.int32 if max(n_rows, n_cols, rows.numel()) < 2**31 - 1 else torch.int64
    if values.device.type == "cpu":
        matrix = scipy.sparse.coo_matrix(
            (values.detach().numpy(), (rows.numpy(), cols.numpy())), shape=(n_rows, n_cols)
        ).tocsr()  # duplicates summed
        matrix.eliminate_zeros()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(
                torch.from_numpy(matrix.indptr).to(index_dtype),
                torch.from_numpy(matrix.indices).to(index_dtype),
                torch.from_numpy(matrix.data),
                (n_rows, n_cols),
                check_invariants=False,
            )
    key, order = torch.sort(rows * n_cols + cols)
    values = values[order]
    del order
    if key.numel() > 1 and bool((key[1:] == key[:-1]).any()):
        key, inverse = torch.unique_consecutive(key, return_inverse=True)
        summed = torch.zeros(key.numel(), dtype=values.dtype, device=values.device)
        values = summed.index_add_(0, inverse, values)
        del inverse, summed
    keep = values != 0
    if not bool(keep.all()):
        key, values = key[keep], values[keep]
    del keep
    row = torch.div(key, n_cols, rounding_mode="floor")
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=values.device)
    torch.cumsum(torch.bincount(row, minlength=n_rows), 0, out=crow[1:])
    col = key.sub_(row.mul_(n_cols))  # key and row are not needed any more
    del row
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            crow.to(index_dtype),
            col.to(index_dtype),
            values,
            (n_rows, n_cols),
            check_invariants=False,
        )


def _rows_by_action(csr: Tensor, n_states: int, n_actions: int) -> Tensor:
    """The CSR matrix with row ``s*A + a`` moved to ``a*S + s`` (no sort: rows are copied)."""
    crow = csr.crow_indices().long()
    n_rows = crow.numel() - 1
    old_row = torch.arange(n_rows, device=crow.device).view(n_states, n_actions).T.reshape(-1)
    length = crow.diff()[old_row]
    new_crow = torch.zeros_like(crow)
    torch.cumsum(length, 0, out=new_crow[1:])
    # element k of new row i comes from old position crow[old_row[i]] + k
    source = torch.repeat_interleave(crow[:-1][old_row] - new_crow[:-1], length)
    source += torch.arange(source.numel(), device=crow.device)
    index_dtype = csr.col_indices().dtype
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(new_crow.to(index_dtype), csr.col_indices()[source],
                                       csr.values()[source], csr.shape, check_invariants=False)


class Transitions:
    """P of a tabular MDP: a dense ``(S, A, S)`` tensor, or CSR ``(S*A, S)`` plus its transpose.

    Row ``s*A + a`` holds ``P(.|s, a)``. The transpose is stored too so that ``P^T`` products
    (adjoints, occupancies, backward passes) are as fast as forward ones, and sparse storage
    may add a copy with rows ``a*S + s`` for the soft Bellman loop (``flat_matrix``).
    """

    def __init__(
        self,
        n_states: int,
        n_actions: int,
        dense: Tensor | None = None,
        csr: Tensor | None = None,
        csr_t: Tensor | None = None,
    ) -> None:
        if (dense is None) == (csr is None) or (csr is None) != (csr_t is None):
            raise ValueError("give either a dense tensor, or a CSR matrix and its transpose")
        self.n_states = n_states
        self.n_actions = n_actions
        self._dense = dense
        self._flat = None if dense is None else dense.view(n_states * n_actions, n_states)
        self._csr = csr
        self._csr_t = csr_t
        self._csr_by_action: Tensor | None = None  # built on first use, see flat_matrix
        self._row_sums: Tensor | None = None  # see row_sums
        self._row_sum_range: tuple[float, float] | None = None  # see row_sum_range
        self._envelope: tuple[int, float] | None = None  # see envelope
        self._lu_work: float | None = None  # see lu_work
        self._host_pattern: tuple[np.ndarray, np.ndarray] | None = None  # see policy_matrix_csc
        self._fused: native.Ell | bool | None = None  # see fused_layout

    # construction -------------------------------------------------------------------------

    @staticmethod
    def from_dense(P: Tensor) -> Transitions:
        """Dense storage of an ``(S, A, S)`` tensor."""
        if P.dim() != 3 or P.shape[0] != P.shape[2]:
            raise ValueError(f"P must have shape (S, A, S), got {tuple(P.shape)}")
        n_states, n_actions, _ = P.shape
        return Transitions(n_states, n_actions, dense=P.contiguous())

    @staticmethod
    def from_coo(
        rows: Tensor, cols: Tensor, values: Tensor, n_states: int, n_actions: int
    ) -> Transitions:
        """Sparse storage from triplets; ``rows`` index ``s*A + a``, duplicates are summed."""
        rows, cols = rows.reshape(-1).long(), cols.reshape(-1).long()
        values = values.reshape(-1)
        if not rows.numel() == cols.numel() == values.numel():
            raise ValueError("rows, cols and values must have the same length")
        n_rows = n_states * n_actions
        if rows.numel() and (
            int(rows.min()) < 0 or int(rows.max()) >= n_rows
            or int(cols.min()) < 0 or int(cols.max()) >= n_states
        ):
            raise ValueError("a transition index is out of range")
        csr = _build_csr(rows, cols, values, n_rows, n_states)
        csr_t = _build_csr(cols, rows, values, n_states, n_rows)
        return Transitions(n_states, n_actions, csr=csr, csr_t=csr_t)

    @staticmethod
    def auto(
        P: Tensor | tuple[Tensor, Tensor, Tensor],
        n_states: int | None = None,
        n_actions: int | None = None,
    ) -> Transitions:
        """Dense or sparse storage, whichever should be faster.

        ``P`` is a dense ``(S, A, S)`` tensor, or ``(rows, cols, values)`` with ``n_states`` and
        ``n_actions``. Sparse is chosen when the density is below ``SPARSE_DENSITY`` and the table
        has more than 2^18 entries, or when the dense table would take more than 1 GiB.
        """
        if isinstance(P, Tensor):
            n_states, n_actions, _ = P.shape
            nnz = int(torch.count_nonzero(P))
        else:
            if n_states is None or n_actions is None:
                raise ValueError("COO input needs n_states and n_actions")
            nnz = P[2].numel()
        entries = n_states * n_actions * n_states
        dtype = P.dtype if isinstance(P, Tensor) else P[2].dtype
        too_big = entries * dtype.itemsize > _DENSE_MAX_BYTES
        sparse = too_big or (entries > _SPARSE_MIN_ENTRIES and nnz < SPARSE_DENSITY * entries)
        if isinstance(P, Tensor):
            if not sparse:
                return Transitions.from_dense(P)
            index = P.reshape(n_states * n_actions, n_states).nonzero()
            rows, cols = index[:, 0], index[:, 1]
            return Transitions.from_coo(rows, cols, P.reshape(-1, n_states)[rows, cols],
                                        n_states, n_actions)
        rows, cols, values = P
        if sparse:
            return Transitions.from_coo(rows, cols, values, n_states, n_actions)
        dense = torch.zeros(n_states * n_actions * n_states, dtype=dtype, device=values.device)
        dense.index_add_(0, rows.long() * n_states + cols.long(), values)
        return Transitions.from_dense(dense.view(n_states, n_actions, n_states))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
           ) -> Transitions:
        """A copy on another device (and/or with another floating dtype); itself, with what it
        has cached, where neither changes."""
        if ((device is None or torch.device(device) == self.device)
                and (dtype is None or dtype == self.dtype)):
            return self
        if self._dense is not None:
            return Transitions(self.n_states, self.n_actions,
                               dense=self._dense.to(device=device, dtype=dtype))
        return Transitions(self.n_states, self.n_actions,
                           csr=self._csr.to(device=device, dtype=dtype),
                           csr_t=self._csr_t.to(device=device, dtype=dtype))

    # description --------------------------------------------------------------------------

    @property
    def is_sparse(self) -> bool:
        return self._csr is not None

    @property
    def device(self) -> torch.device:
        return (self._dense if self._dense is not None else self._csr).device

    @property
    def dtype(self) -> torch.dtype:
        return (self._dense if self._dense is not None else self._csr).dtype

    @property
    def nnz(self) -> int:
        if self._csr is not None:
            return self._csr.values().numel()
        return int(torch.count_nonzero(self._dense))

    @property
    def row_sum_range(self) -> tuple[float, float]:
        """The smallest and largest row sums when every entry is non-negative, else
        ``(-inf, inf)`` (computed once): what bounds ``P v`` by the range of ``v`` for the
        Bellman loop's constant shift."""
        if self._row_sum_range is None:
            values = self._flat if self._csr is None else self._csr.values()
            if values.numel() and bool((values < 0).any()):
                self._row_sum_range = (-math.inf, math.inf)
            else:
                sums = self.row_sums()
                self._row_sum_range = tuple(torch.stack([sums.min(), sums.max()]).tolist())
        return self._row_sum_range

    def nbytes(self) -> int:
        """Memory held by the stored matrices, in bytes."""
        if self._dense is not None:
            return self._dense.numel() * self._dense.element_size()
        return sum(
            t.numel() * t.element_size()
            for m in (self._csr, self._csr_t, self._csr_by_action) if m is not None
            for t in (m.crow_indices(), m.col_indices(), m.values())
        ) + (self._fused.nbytes if isinstance(self._fused, native.Ell) else 0)

    def __repr__(self) -> str:
        kind = f"sparse, nnz={self.nnz}" if self.is_sparse else "dense"
        return (f"Transitions(S={self.n_states}, A={self.n_actions}, {kind}, "
                f"dtype={self.dtype}, device={self.device})")

    # products -----------------------------------------------------------------------------

    def expect(self, v: Tensor) -> Tensor:
        """``(S, *k) -> (S, A, *k)``: ``sum_t P[s,a,t] v[t, ...]``, differentiable in ``v``."""
        flat = v if v.dim() == 1 else v.reshape(self.n_states, -1)
        if self._flat is not None:
            out = self._flat @ flat
        else:
            out = _CsrProduct.apply(self._csr, self._csr_t, flat.contiguous())
        return out.view(self.n_states, self.n_actions, *v.shape[1:])

    def pull(self, y: Tensor) -> Tensor:
        """``(S, A, *k) -> (S, *k)``: ``sum_{s,a} y[s,a,...] P[s,a,t]``, differentiable in ``y``."""
        flat = y.reshape(self.n_states * self.n_actions, *([-1] if y.dim() > 2 else []))
        if self._flat is not None:
            out = self._flat.mT @ flat
        else:
            out = _CsrProduct.apply(self._csr_t, self._csr, flat.contiguous())
        return out.view(self.n_states, *y.shape[2:])

    def flat_matrix(self, by_action: bool = False) -> Tensor:
        """``P`` as one ``(S*A, S)`` matrix for ``torch.mv``/``addmv``: rows ``s*A + a``, or with
        ``by_action`` (sparse storage only) rows ``a*S + s``, from a third CSR copy of ``P`` built
        on first use (see ``_BellmanLoop``). Products with it are not differentiable."""
        if self._flat is not None:
            return self._flat
        if by_action:
            if self._csr_by_action is None:
                self._csr_by_action = _rows_by_action(self._csr, self.n_states, self.n_actions)
            return self._csr_by_action
        return self._csr

    def fused_layout(self) -> native.Ell | None:
        """``P`` for the fused loops of ``native.c`` (built once), or ``None`` where they cannot
        take it: dense storage (small problems, where torch's dispatch is not what costs), not
        float64 on the CPU, 64-bit indices, rows of very unequal length, or no compiled
        library (``native.why()``)."""
        if self._fused is None:
            ell = None
            if (self.is_sparse and native.usable(self._csr.values())
                    and self._csr_t.col_indices().dtype == torch.int32
                    and native.library() is not None):
                ell = native.Ell.from_csr(self._csr, self.n_states, self.n_actions)
            self._fused = ell if ell is not None else False
        # None too once the library is gone (BRL_NATIVE=0 set later, or a copy unpickled where
        # nothing compiles)
        return self._fused if self._fused and native.library() is not None else None

    def __getstate__(self) -> dict:
        """Pickled without the caches of this machine's decisions (the fused layout)."""
        state = self.__dict__.copy()
        state["_fused"] = None
        return state

    def dense(self) -> Tensor:
        """The ``(S, A, S)`` table (materialised for sparse storage)."""
        if self._dense is not None:
            return self._dense
        return self._csr.to_dense().view(self.n_states, self.n_actions, self.n_states)

    def coo(self) -> tuple[Tensor, Tensor, Tensor]:
        """Nonzero triplets ``(rows = s*A + a, cols, values)``."""
        if self._dense is not None:
            index = self._flat.nonzero()
            rows, cols = index[:, 0], index[:, 1]
            return rows, cols, self._flat[rows, cols]
        crow = self._csr.crow_indices().long()
        rows = torch.repeat_interleave(
            torch.arange(crow.numel() - 1, device=crow.device), crow.diff()
        )
        return rows, self._csr.col_indices().long(), self._csr.values()

    def row_sums(self) -> Tensor:
        """``(S, A)`` total probability of each row (below one where an episode may end);
        computed once, as rewards use it at every evaluation."""
        if self._row_sums is None:
            self._row_sums = (self._dense.sum(-1) if self._dense is not None else
                              self.expect(torch.ones(self.n_states, dtype=self.dtype,
                                                     device=self.device)))
        return self._row_sums

    def policy_matrix(self, pi: Tensor) -> Tensor:
        """Dense ``(S, S)`` matrix ``P_pi``, for direct solves on small state spaces."""
        if self._dense is not None:
            return torch.bmm(pi.unsqueeze(1), self._dense).squeeze(1)
        rows, cols, values = self.coo()
        out = torch.zeros(self.n_states * self.n_states, dtype=pi.dtype, device=pi.device)
        state = torch.div(rows, self.n_actions, rounding_mode="floor")
        out.index_add_(0, state * self.n_states + cols, values * pi.reshape(-1)[rows])
        return out.view(self.n_states, self.n_states)

    def policy_matrix_csc(self, pi: Tensor) -> scipy.sparse.csc_matrix:
        """``P_pi`` as a scipy CSC matrix on the host (sparse storage only): what SuperLU
        factorises. Each entry's state and successor are kept on the host after the first call."""
        crow = self._csr.crow_indices().long()
        if self._host_pattern is None:
            per_state = crow.diff().view(self.n_states, self.n_actions).sum(-1).cpu().numpy()
            self._host_pattern = (np.repeat(np.arange(self.n_states), per_state),
                                  self._csr.col_indices().cpu().numpy())
        state, cols = self._host_pattern
        weights = torch.repeat_interleave(pi.reshape(-1), crow.diff()) * self._csr.values()
        return scipy.sparse.csc_matrix((weights.detach().cpu().numpy(), (state, cols)),
                                       shape=(self.n_states, self.n_states))

    def envelope(self) -> tuple[int, float]:
        """The bandwidth of the state graph (``s -> t`` where some ``P[s, a, t] > 0``, made
        symmetric) in reverse Cuthill-McKee order, and ``sum_s width_s^2`` over its rows: the
        multiply-adds of an LU of ``I - gamma P_pi`` that keeps within that envelope, for any
        policy. Hubs (states linked to more than ``4 sqrt(S)`` others, such as a start
        state that every state can be reset to) are ordered last, where counting their width
        would make a grid look like an expander: ``k`` of them add ``k`` to the band (a dense
        row and column each) and about ``k S (2 band + k)`` multiply-adds, so that a few cost
        little and many send the matrix to GMRES. Computed once (a fifth of a second at 10^5
        states and 2 * 10^6 entries)."""
        if self._envelope is None:
            S = self.n_states
            if self._dense is not None or S == 0:
                self._envelope = (S - 1, float(S) ** 3 / 3)
                return self._envelope
            graph = self.policy_matrix_csc(torch.ones(S, self.n_actions, dtype=self.dtype,
                                                      device=self.device)).tocsr()
            graph = (graph + graph.T).tocsr()
            degree = np.diff(graph.indptr)
            hubs = np.flatnonzero(degree > max(32.0, 4.0 * math.sqrt(S)))
            if hubs.size:
                keep = np.ones(S, dtype=bool)
                keep[hubs] = False
                graph = graph[keep][:, keep].tocsr()
            n = graph.shape[0]
            order = (scipy.sparse.csgraph.reverse_cuthill_mckee(graph, symmetric_mode=True)
                     if n else np.arange(0))
            position = np.empty(n, dtype=np.int64)
            position[order] = np.arange(n)
            # each row's leftmost neighbour in the new order (itself if it has none to the left)
            leftmost = position.copy()
            nonempty = np.flatnonzero(np.diff(graph.indptr))
            if nonempty.size:
                leftmost[nonempty] = np.minimum(
                    position[nonempty],
                    np.minimum.reduceat(position[graph.indices], graph.indptr[nonempty]))
            width = (position - leftmost).astype(np.float64)
            band = int(width.max(initial=0))
            k = float(hubs.size)
            # each hub row and column is dense: an elimination step inside the band also
            # updates the k hub rows and columns; the k x k block is factorised last
            work = float(np.square(width).sum()) + k * S * (2.0 * (band + 1) + k) + k**3 / 3
            self._envelope = (band + hubs.size, work)
        return self._envelope

    def lu_work(self) -> float:
        """Multiply-adds of an LU factorisation of ``I - gamma P_pi``, or ``inf`` where its
        factors would fill in (``direct_solves`` then runs GMRES): ``S^3 / 3`` for dense
        storage; for sparse storage, counted on one trial factorisation (uniform policy, gamma
        0.99) where the ``envelope`` bounds its cost (SuperLU's ordering needs 10 to 40 times
        less than the envelope on grids). Computed once."""
        if self._lu_work is None:
            S = self.n_states
            band, work = self.envelope()
            if self._dense is not None or S == 0:
                self._lu_work = work
            elif S > _SPARSE_LU_ALWAYS and (band > _SPARSE_LU_MAX_BAND_FRACTION * S
                                             or work > _SPARSE_LU_MAX_ENVELOPE):
                self._lu_work = math.inf
            else:
                uniform = torch.full((S, self.n_actions), 1.0 / self.n_actions, dtype=self.dtype,
                                     device=self.device)
                A = scipy.sparse.identity(S, format="csc") - 0.99 * self.policy_matrix_csc(uniform)
                factors = scipy.sparse.linalg.splu(A.tocsc())
                # eliminating column j multiplies each entry below the pivot in L by each entry
                # right of it in U
                # (in float64: scipy's int32 counts overflowed in their dot product, and a
                # negative count let Newton's method factorise matrices that fill in)
                below = np.diff(factors.L.tocsc().indptr).astype(np.float64) - 1
                right = np.diff(factors.U.tocsr().indptr).astype(np.float64) - 1
                self._lu_work = float(np.dot(below, right)) + factors.L.nnz + factors.U.nnz
                if S > _SPARSE_LU_ALWAYS and self._lu_work > _SPARSE_LU_MAX_WORK:
                    self._lu_work = math.inf
        return self._lu_work


# reductions over actions ------------------------------------------------------------------

_ONES: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}


def sum_actions(table: Tensor) -> Tensor:
    """``(S, A) -> (S,)`` row sums, as one matrix-vector product with a vector of ones.

    torch's reduction over rows of a few values does not vectorise: at 10^5 states and 4
    actions ``sum(-1)`` takes three times as long as the product (and is slower on tiny
    tables too). Differentiable like any product.
    """
    key = (table.shape[-1], table.dtype, table.device)
    ones = _ONES.get(key)
    if ones is None:
        with torch.inference_mode(False):  # usable by autograd whatever mode fills the cache
            ones = _ONES[key] = torch.ones(key[0], dtype=table.dtype, device=table.device)
    return table @ ones


# soft Bellman operators --------------------------------------------------------------------


def soft_q(P: Transitions, r: Tensor, V: Tensor, gamma: float) -> Tensor:
    """``Q[s,a] = r[s,a] + gamma sum_t P[s,a,t] V[t]``."""
    return r + gamma * P.expect(V)


def soft_bellman(P: Transitions, r: Tensor, V: Tensor, gamma: float, tau: float) -> Tensor:
    """``(T V)(s) = tau logsumexp_a(Q[s,a] / tau)``, stable for tiny ``tau`` and huge rewards."""
    return tau * torch.logsumexp(soft_q(P, r, V, gamma) / tau, dim=-1)


def soft_policy(Q: Tensor, tau: float) -> Tensor:
    """``pi[s,a] = softmax_a(Q[s,a] / tau)``, shifted by the (constant) row maximum.

    Written out rather than ``torch.softmax``: on CPU that kernel opens a parallel region even
    for a handful of rows, which costs milliseconds per call on a busy machine.
    """
    z = Q / tau
    e = torch.exp((z - z.detach().amax(-1, keepdim=True)).clamp(min=_EXP_FLOOR))
    return e / e.sum(-1, keepdim=True)


def _constant_shift(P: Transitions, base_range: tuple[float, float],
                    u_range: tuple[float, float], gamma: float, window: float,
                    steps: int | None) -> float | None:
    """A constant ``C`` with every exponent ``q - C`` of the next ``steps`` steps (and of the
    ``Q`` after them; ``None``: of every later step) in ``[-window, 0]``, or ``None`` when no
    constant is safe.

    With ``P >= 0`` and row sums in ``[c_lo, c_hi]``, ``P u`` lies in ``[m(lo), M(hi)]`` for
    ``u`` in ``[lo, hi]``, where ``m(lo) = c_hi lo`` if ``lo < 0`` else ``c_lo lo`` and ``M(hi)
    = c_hi hi`` if ``hi > 0`` else ``c_lo hi``. A step maps ``[lo, hi]`` into ``[b_lo + gamma
    m(lo), b_hi + gamma M(hi) + log A]``: increasing maps, so ``lo`` and ``hi`` move
    monotonically from the warm start's range towards their fixed points (when ``gamma c_hi <
    1``), and the exponents ``q = base + gamma P u`` lie in ``[b_lo + gamma m(lo_min), b_hi +
    gamma M(hi_max)]`` over the steps. Over all later steps, for stochastic ``P``, that interval
    is about ``((max r - min r) / tau + log A) / (1 - gamma)`` wide plus the warm start's
    distance from the fixed point; over a few warm-started steps it is about the spread of ``r /
    tau + gamma V`` within them.
    """
    c_lo, c_hi = P.row_sum_range
    values = (*base_range, *u_range, c_lo, c_hi)
    if not all(math.isfinite(v) for v in values):
        return None
    b_lo, b_hi = base_range
    log_a = math.log(P.n_actions)

    def m(lo: float) -> float:
        return lo * (c_hi if lo < 0 else c_lo)

    def M(hi: float) -> float:
        return hi * (c_hi if hi > 0 else c_lo)

    lo_min, hi_max = u_range
    if steps is None or (steps > 64 and gamma * c_hi < 1.0):
        # the fixed points of both maps bound every later step
        if not gamma * c_hi < 1.0:
            return None
        lo_min = min(lo_min, b_lo / (1.0 - gamma * (c_lo if b_lo >= 0 else c_hi)))
        a = b_hi + log_a
        hi_max = max(hi_max, a / (1.0 - gamma * (c_hi if a > 0 else c_lo)))
    else:
        lo, hi = u_range
        for _ in range(steps):
            lo, hi = b_lo + gamma * m(lo), b_hi + gamma * M(hi) + log_a
            lo_min, hi_max = min(lo_min, lo), max(hi_max, hi)
    top = b_hi + gamma * M(hi_max)
    bottom = b_lo + gamma * m(lo_min)
    return top if top - bottom <= window else None


def _exp_window(dtype: torch.dtype) -> float:
    """How far below 0 an exponent may go with ``exp`` still normal (subnormal results are
    5-20 times slower on CPU, and the sum of a row must not vanish): about 700 in float64,
    79 in float32."""
    return -math.log(torch.finfo(dtype).tiny) - 8.0


class _BellmanLoop:
    """The soft Bellman operator over one reward table in units of ``tau`` (``u = V / tau``),
    without autograd.

    Where ``_constant_shift`` finds a safe constant ``C``, ``base = r / tau - C`` and a step is
    one fused product, one ``exp`` and one sum over actions in ``P``'s own ``(S, A)`` layout: no
    ``exp`` can overflow or turn subnormal (5-20 times slower on CPU) in the loop's dtype.
    Otherwise each state's logsumexp is shifted by its own maximum and clamped at
    ``_EXP_FLOOR``, and sparse ``P`` is taken with rows ``a*S + s``: the per-state maximum then
    reduces over ``A`` contiguous rows of ``S`` values, which vectorises, not over rows of ``A``
    values, which does not. Where ``P.fused_layout()`` has ``P`` for ``native.c``, the steps
    run there instead, all in one call, with the same shift (or maximum) and floor.
    """

    def __init__(self, P: Transitions, r: Tensor, u: Tensor, gamma: float, tau: float,
                 steps: int | None) -> None:
        """``steps``: how many steps the loop will take before its last ``Q`` (``None``: any
        number, as value iteration does)."""
        self.P, self.gamma, self.tau = P, gamma, tau
        flat = r.detach().reshape(-1)
        r_lo, r_hi = torch.aminmax(flat)
        u_lo, u_hi = torch.aminmax(u)
        r_lo, r_hi, u_lo, u_hi = torch.stack([r_lo, r_hi, u_lo, u_hi]).tolist()  # one sync
        self.reward_scale = max(abs(r_lo), abs(r_hi)) / tau  # max |r| / tau
        self.shift = _constant_shift(P, (r_lo / tau, r_hi / tau), (u_lo, u_hi), gamma,
                                     _exp_window(flat.dtype), steps)
        self.fused = P.fused_layout() if native.usable(flat, u) else None
        # torch's loop on sparse P without a constant shift, and the fused loops always, read
        # the rewards as (A, S): laid out so, divided and shifted in one pass
        self.by_action = self.shift is None and P.is_sparse
        if self.by_action or self.fused is not None:
            table = flat.view(P.n_states, P.n_actions)
            base = torch.empty(P.n_actions, P.n_states, dtype=flat.dtype, device=flat.device)
            if self.shift is None:
                torch.div(table.T, tau, out=base)
            else:
                torch.add(torch.full((), -self.shift, dtype=flat.dtype, device=flat.device),
                          table.T, alpha=1.0 / tau, out=base)
            self.base = base if self.fused is not None else base.view(-1)
        elif self.shift is not None:  # r / tau - C in one pass
            self.base = torch.add(torch.full((), -self.shift, dtype=flat.dtype,
                                             device=flat.device), flat, alpha=1.0 / tau)
        else:
            self.base = flat / tau
        self.actions = 0 if self.by_action else 1  # the axis of actions in torch's tables
        # torch's loop's products (the fused loops keep P in their own layout)
        self.matrix = None if self.fused is not None else P.flat_matrix(self.by_action)

    def _tables(self, flat: Tensor) -> Tensor:
        """A flat vector in the loop's layout as ``(A, S)`` or ``(S, A)``."""
        P = self.P
        return flat.view(P.n_actions, P.n_states) if self.by_action else flat.view(P.n_states,
                                                                                   P.n_actions)

    def _q(self, u: Tensor, expected: Tensor | None = None) -> Tensor:
        """``q = base + gamma P u``, flat in the loop's layout; from ``expected = P.expect(tau
        u)``, ``(S, A)``, when known, which saves the product."""
        if expected is None:
            return torch.addmv(self.base, self.matrix, u, alpha=self.gamma)
        flat = (expected.T if self.by_action else expected).reshape(-1)
        return torch.add(self.base, flat, alpha=self.gamma / self.tau)

    def _exp(self, q: Tensor) -> tuple[Tensor, Tensor | None]:
        """``exp(q - m)`` in place, as ``(A, S)`` or ``(S, A)``, and ``m``: ``shift`` or each
        state's maximum of ``q``."""
        q = self._tables(q)
        if self.shift is not None:
            return q.exp_(), None
        m = q.amax(self.actions)
        # in place on the fresh q: no S*A-sized allocation per step
        return q.sub_(m.unsqueeze(self.actions)).clamp_(min=_EXP_FLOOR).exp_(), m

    def _sum(self, e: Tensor) -> Tensor:
        return e.sum(0) if self.by_action else sum_actions(e)

    def steps(self, u: Tensor, n: int, expected: Tensor | None = None) -> Tensor:
        """``T^n`` applied to ``u``; ``expected``: ``P.expect(tau u)`` for the first step."""
        if self.fused is not None and n > 0:
            return native.bellman_steps(self.fused, self.base, self.gamma, self.shift,
                                        _EXP_FLOOR, u, n, expected, self.gamma / self.tau)
        for _ in range(n):
            e, m = self._exp(self._q(u, expected))
            expected = None
            u = self._sum(e).log_()
            u = u.add_(self.shift) if m is None else u.add_(m)
        return u

    def policy(self, V: Tensor) -> tuple[Tensor, Tensor]:
        """``softmax_a(q)`` at ``u = V / tau``, ``(S, A)`` (shift-invariant, so the loop's ``exp``
        will do), and ``P.expect(V)``, ``(S, A)``: the next loop's first product."""
        if self.fused is not None:
            return native.policy(self.fused, self.base, self.gamma / self.tau, _EXP_FLOOR, V)
        product = torch.mv(self.matrix, V)
        e, _ = self._exp(torch.add(self.base, product, alpha=self.gamma / self.tau))
        expected = self._tables(product).T if self.by_action else self._tables(product)
        if not self.by_action:
            return e.div_(self._sum(e).unsqueeze(1)), expected
        pi = torch.empty(self.P.n_states, self.P.n_actions, dtype=e.dtype, device=e.device)
        torch.div(e, e.sum(0, keepdim=True), out=pi.T)  # the normalisation writes (S, A)
        return pi, expected


def soft_bellman_steps(P: Transitions, r: Tensor, V: Tensor, gamma: float, tau: float, n: int
                       ) -> Tensor:
    """``T^n V`` without autograd: the warm-started inner loop of single-loop solvers."""
    with torch.no_grad():
        u = V.detach() / tau
        return tau * _BellmanLoop(P, r, u, gamma, tau, n).steps(u, n)


def soft_bellman_update(P: Transitions, r: Tensor, V: Tensor, gamma: float, tau: float, n: int,
                        expected: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``V' = T^n V``, the policy ``softmax((r + gamma P V') / tau)`` and ``P.expect(V')``,
    without autograd: the numbers of ``soft_bellman_steps`` then ``soft_policy(soft_q(...))``,
    up to rounding.

    ``expected``: ``P.expect(V)``, when the caller has it (the last call's third result, if
    ``V`` is that call's ``V'``): a warm-started loop then skips its first product, whatever the
    reward, so ``n`` steps and the policy cost ``n`` products, not ``n + 1``.
    """
    with torch.no_grad():
        u = V.detach() / tau
        loop = _BellmanLoop(P, r, u, gamma, tau, n)
        V_next = loop.steps(u, n, expected).mul_(tau)
        pi, expected_next = loop.policy(V_next)
        return V_next, pi, expected_next


def soft_value_iteration(
    P: Transitions,
    r: Tensor,
    gamma: float,
    tau: float,
    V0: Tensor | None = None,
    tol: float = 1e-10,
    max_iter: int = 1_000_000,
) -> tuple[Tensor, int]:
    """Fixed point ``V*`` of the soft Bellman operator, and the number of iterations taken.

    Stops when the contraction bound ``gamma / (1 - gamma) ||V_{n+1} - V_n||_inf`` guarantees
    ``||V - V*||_inf <= tol``, or earlier once rounding dominates (the sup-norm change stops
    shrinking while below 1024 ulps of ``|V| + |r|``): no further accuracy is reachable then.
    With ``gamma = 1`` (episodic, sub-stochastic P) the plain change is compared with ``tol``.
    Not differentiable: use ``soft_bellman`` for gradients through a few steps.
    """
    with torch.no_grad():
        u = torch.zeros(P.n_states, dtype=r.dtype, device=r.device) if V0 is None \
            else V0.detach().to(r.dtype) / tau
        loop = _BellmanLoop(P, r, u, gamma, tau, None)  # its shift holds for every step
        factor = gamma / (1.0 - gamma) if gamma < 1.0 else 1.0
        floor = 1024 * torch.finfo(r.dtype).eps
        # rounding of the shifted logsumexp scales with |shift| too
        r_max = loop.reward_scale + abs(loop.shift or 0.0)
        previous = math.inf
        iterations = 0
        while iterations < max_iter:
            new = loop.steps(u, 1)
            iterations += 1
            change, size = torch.stack([(new - u).abs().max(), new.abs().max()]).tolist()
            u = new
            if factor * change * tau <= tol or not math.isfinite(change):
                break  # converged, or NaN/inf in the reward or P: no iteration will help
            if change <= floor * (size + r_max) and change >= previous:
                break
            previous = change
        return u * tau, iterations


def soft_policy_iteration(
    P: Transitions,
    r: Tensor,
    gamma: float,
    tau: float,
    V0: Tensor | None = None,
    tol: float = 1e-12,
    max_iter: int = 100,
) -> tuple[Tensor, int]:
    """``V*`` by Newton's method on the soft Bellman equation, and the number of steps taken.

    Each step evaluates the soft-greedy policy of ``V`` exactly (one linear solve in ``(I -
    gamma P_pi)``), so the error falls quadratically near ``V*`` whatever ``gamma``: from a
    nearby warm start a few steps reach rounding level, where value iteration needs about
    ``log(error / tol) / (1 - gamma)`` sweeps (20,000 at gamma 0.999). Far from ``V*`` the
    steps are policy iteration's, whose changes need not shrink; without ``V0``, value
    iteration first brings ``V`` within ``1e-6`` (relative), which also spares the first
    solves the slowly mixing policies of a cold start. Stops once a step changes ``V`` by at
    most ``tol`` in the sup norm, or when changes below ``sqrt(eps) |V|`` stop shrinking
    (rounding: the next step of a quadratic method would have reached it).
    """
    with torch.no_grad():
        if V0 is None:
            V, _ = soft_value_iteration(P, r, gamma, tau, tol=1e-6 * (1.0 + float(r.abs().max()))
                                        / max(1.0 - gamma, 1e-3))
        else:
            V = V0.detach().to(r.dtype)
        near = math.sqrt(torch.finfo(r.dtype).eps)
        previous, steps = math.inf, 0
        while steps < max_iter:
            pi = soft_policy(soft_q(P, r, V, gamma), tau)
            new = policy_evaluation(P, r, pi, gamma, tau)
            steps += 1
            change, size = torch.stack([(new - V).abs().max(), new.abs().max()]).tolist()
            V = new
            if change <= tol or not math.isfinite(change):
                break
            if change <= near * (1.0 + size) and change >= previous:
                break
            previous = change
        return V, steps


# linear systems in (I - gamma P_pi) ---------------------------------------------------------


def policy_matvec(P: Transitions, pi: Tensor, v: Tensor) -> Tensor:
    """``P_pi v``: ``sum_{a,t} pi[s,a] P[s,a,t] v[t]``."""
    return sum_actions(pi * P.expect(v))


def policy_rmatvec(P: Transitions, pi: Tensor, w: Tensor) -> Tensor:
    """``P_pi^T w``: ``sum_{s,a} w[s] pi[s,a] P[s,a,t]``."""
    return P.pull(pi * w.unsqueeze(-1))


def pull_steps(P: Transitions, g: Tensor, pi: Tensor, z: Tensor, n: int, sign: float,
               alpha: float, d: Tensor | None = None, c: Tensor | None = None) -> Tensor:
    """``n`` steps ``z <- c + alpha P^T (g + sign * pi * (z + d)[s])`` (``d``, ``c``: zero when
    ``None``), without autograd: the amortised adjoint of the single-loop solvers, one product
    with ``P^T`` a step; in ``native.c``, in one call, where ``P.fused_layout()`` allows."""
    S, A = P.n_states, P.n_actions
    exact = [(g, (S, A)), (pi, (S, A)), (z, (S,)), (d, (S,)), (c, (S,))]
    layout = P.fused_layout()
    if (n > 0 and layout is not None
            and all(t is None or tuple(t.shape) == shape for t, shape in exact)
            and native.usable(*[t for t, _ in exact if t is not None])):
        return native.adjoint_steps(layout, P._csr_t, g, pi, d, c, sign, alpha, z, n)
    with torch.no_grad():
        for _ in range(n):
            y = torch.addcmul(g, pi, (z if d is None else z + d).unsqueeze(-1), value=sign)
            z = P.pull(y).mul_(alpha)
            if c is not None:
                z = z.add_(c)
    return z


def _gmres(matvec: Callable[[Tensor], Tensor], b: Tensor, tol: float, max_iter: int,
           stall: float | None = None, complement: bool = False) -> tuple[Tensor, bool]:
    """Restarted GMRES in torch (runs where ``b`` lives); stops at ``||b - A x|| <= tol ||b||``.

    ``A`` is ``matvec``, or with ``complement`` ``I - matvec``: Arnoldi then runs on ``matvec``
    itself, whose Krylov spaces are the same, and ``A``'s Hessenberg matrix is ``I - H``. For
    ``I - gamma P_pi`` that matters: ``A v`` is mostly ``v``, so Gram-Schmidt on ``A v`` would
    cancel most of it and need a second pass over the basis, which on ``gamma P_pi v`` it rarely
    does.

    Returns ``x`` and whether it converged. With ``stall`` it gives up early (not converged, no
    warning) when a whole restart cycle shrinks the residual by a factor worse than ``stall``:
    restarted GMRES can stagnate on the strongly non-normal ``(I - gamma P_pi)^T`` of a slowly
    mixing chain (a near-deterministic policy in a large maze), where it would otherwise spin
    until ``max_iter``.
    Gram-Schmidt is done with matrix products (fast on GPUs), twice where cancellation calls for
    it (``_REORTHOGONALISE``); the small Hessenberg least-squares problem is solved on the host
    with Givens rotations.
    """
    b_norm = float(torch.linalg.vector_norm(b))
    x = torch.zeros_like(b)
    if b_norm == 0.0:
        return x, True
    if not math.isfinite(b_norm):
        return _not_finite(b), True
    m = min(_GMRES_RESTART, b.numel())
    basis = b.new_empty(m + 1, b.numel())
    residual, beta, done = b, b_norm, 0
    while True:
        basis[0] = residual / beta
        hessenberg = [[0.0] * m for _ in range(m + 1)]
        cos, sin, rhs = [], [], [beta] + [0.0] * m
        steps = 0
        for j in range(m):
            w = matvec(basis[j])
            h = basis[: j + 1] @ w
            w_new = torch.addmv(w, basis[: j + 1].mT, h, alpha=-1.0)
            before, w_norm = torch.stack([torch.linalg.vector_norm(w),
                                          torch.linalg.vector_norm(w_new)]).tolist()
            w = w_new
            if w_norm < _REORTHOGONALISE * before:  # cancellation: project once more
                h2 = basis[: j + 1] @ w
                w = torch.addmv(w, basis[: j + 1].mT, h2, alpha=-1.0)
                h = h + h2
                w_norm = float(torch.linalg.vector_norm(w))
            column = h.tolist() + [w_norm]
            breakdown = w_norm == 0.0  # the Krylov space is invariant: x is exact
            if complement:  # the column of I - H
                column = [-c for c in column]
                column[j] += 1.0
            if not breakdown:
                torch.div(w, w_norm, out=basis[j + 1])
            for i in range(j):  # earlier rotations
                column[i], column[i + 1] = (cos[i] * column[i] + sin[i] * column[i + 1],
                                            -sin[i] * column[i] + cos[i] * column[i + 1])
            radius = math.hypot(column[j], column[j + 1])
            cos.append(column[j] / radius)
            sin.append(column[j + 1] / radius)
            column[j], column[j + 1] = radius, 0.0
            rhs[j], rhs[j + 1] = cos[j] * rhs[j], -sin[j] * rhs[j]
            for i in range(j + 1):
                hessenberg[i][j] = column[i]
            steps, done = j + 1, done + 1
            if abs(rhs[j + 1]) <= tol * b_norm or breakdown or done >= max_iter:
                break
        y = [0.0] * steps
        for i in reversed(range(steps)):
            y[i] = (rhs[i] - sum(hessenberg[i][k] * y[k] for k in range(i + 1, steps))) \
                / hessenberg[i][i]
        x = x + basis[:steps].mT @ torch.tensor(y, dtype=b.dtype, device=b.device)
        residual = b - (x - matvec(x) if complement else matvec(x))
        previous, beta = beta, float(torch.linalg.vector_norm(residual))
        if beta <= tol * b_norm:
            return x, True
        if not math.isfinite(beta):  # NaN or inf in the operator: no iteration will help
            return _not_finite(x), True
        if done >= max_iter:
            warnings.warn(f"GMRES stopped after {done} iterations at relative residual "
                          f"{beta / b_norm:.2e} (tolerance {tol:.0e})", stacklevel=3)
            return x, False
        if stall is not None and steps == m and beta > stall * previous:
            return x, False


def _fixed_point(apply: Callable[[Tensor], Tensor], b: Tensor, gamma: float, tol: float,
                 norm_ord: float, max_iter: int, v0: Tensor | None = None) -> Tensor:
    """Iterate ``v <- b + gamma M v`` (M = P_pi or P_pi^T) until the contraction bound < tol."""
    factor = gamma / (1.0 - gamma) if gamma < 1.0 else 1.0
    v = b if v0 is None else v0
    for _ in range(max_iter):
        new = b + gamma * apply(v)
        change, size = torch.stack([torch.linalg.vector_norm(new - v, norm_ord),
                                    torch.linalg.vector_norm(new, norm_ord)]).tolist()
        v = new
        if factor * change <= tol * size:
            return v
        if not math.isfinite(change):
            return _not_finite(v)
    warnings.warn(f"fixed-point solve stopped after {max_iter} iterations", stacklevel=3)
    return v


def _not_finite(v: Tensor) -> Tensor:
    """Give up on a system with NaN or inf in it (say, a policy that diverged) at once."""
    warnings.warn("a linear system in (I - gamma P_pi) has non-finite entries: its solution is "
                  "not finite", stacklevel=4)
    return v


def direct_solves(P: Transitions) -> bool:
    """Whether ``solve_policy_system(method="auto")`` factorises (else it runs GMRES)."""
    if not P.is_sparse:
        return P.n_states <= DIRECT_MAX_STATES
    return P.lu_work() < math.inf


def newton_pays(P: Transitions, gamma: float) -> bool:
    """Whether solving the soft Bellman equation by Newton's method (a few factorised solves)
    is cheaper than value iteration (about ``23 / (1 - gamma)`` sweeps of ``nnz`` to reach
    1e-10): at gamma 0.999 on a small grid by 100x, while a dense 5,000-state problem at gamma
    0.5 is better served by its few dozen sweeps."""
    if not direct_solves(P):
        return False
    nnz = P.nnz if P.is_sparse else P.n_states * P.n_actions * P.n_states
    sweeps = 23.0 / max(1.0 - gamma, 1e-6)
    return 4 * (P.lu_work() + nnz) < sweeps * nnz


class _Factorisation:
    """``I - gamma P_pi`` factorised once, for solves in either orientation (the backward pass
    of a policy solve reuses its forward pass's factors): LU with partial pivoting in torch for
    dense ``P``, SuperLU on the host for sparse ``P``."""

    def __init__(self, P: Transitions, pi: Tensor, gamma: float) -> None:
        self._dtype = pi.dtype
        self._dense: tuple[Tensor, Tensor] | None = None
        self._sparse: scipy.sparse.linalg.SuperLU | None = None
        if not bool(torch.isfinite(pi).all()) or P.n_states == 0:
            return  # a diverged policy: solve() gives NaN (the solvers report non-finite runs)
        if P.is_sparse:
            P_pi = P.policy_matrix_csc(pi)
            A = scipy.sparse.identity(P.n_states, dtype=P_pi.dtype, format="csc") - gamma * P_pi
            try:
                self._sparse = scipy.sparse.linalg.splu(A.tocsc())
            except RuntimeError as error:  # gamma = 1 and a class of states that never ends
                raise ValueError(f"I - gamma P_pi is singular ({error})") from None
        else:
            A = torch.eye(P.n_states, dtype=pi.dtype, device=pi.device) \
                - gamma * P.policy_matrix(pi.detach())
            self._dense = torch.linalg.lu_factor(A)

    def solve(self, b: Tensor, transpose: bool) -> Tensor:
        if self._dense is not None:
            LU, pivots = self._dense
            return torch.linalg.lu_solve(LU, pivots, b.unsqueeze(-1), adjoint=transpose
                                         ).squeeze(-1)
        if self._sparse is not None:
            x = self._sparse.solve(b.detach().cpu().numpy(), trans="T" if transpose else "N")
            return torch.from_numpy(x).to(device=b.device, dtype=torch.promote_types(
                b.dtype, self._dtype))
        return torch.full_like(b, math.nan)


def _solve(P: Transitions, pi: Tensor, b: Tensor, gamma: float, transpose: bool, method: str,
           tol: float, factors: _Factorisation | None = None, guess: Tensor | None = None
           ) -> Tensor:
    """Solve ``(I - gamma P_pi) v = b`` (or the transposed system) without autograd; with
    ``method="direct"``, by ``factors`` when given. The iterative methods start from
    ``guess`` where given (the solution for the last policy: a few iterations away)."""
    method = _method(P, method)
    if method == "direct":
        return (factors or _Factorisation(P, pi, gamma)).solve(b, transpose)
    if transpose:
        def apply(w: Tensor) -> Tensor:
            return policy_rmatvec(P, pi, w)
    else:
        def apply(v: Tensor) -> Tensor:
            return policy_matvec(P, pi, v)
    norm_ord = 1.0 if transpose else math.inf  # the norm in which gamma P_pi^(T) contracts
    start, rhs, rhs_tol = torch.zeros_like(b), b, tol
    if guess is not None and guess.shape == b.shape:
        # From a guess, the correction is solved for, to the same residual as from zero; only
        # where the guess is finite and nearer than zero (not for b = 0, where its residual
        # could only shrink to underflow, nor for an infinite b, which no guess fits)
        residual = b - (guess - gamma * apply(guess))
        b_norm, rhs_norm = torch.stack([torch.linalg.vector_norm(b),
                                        torch.linalg.vector_norm(residual)]).tolist()
        if math.isfinite(b_norm) and math.isfinite(rhs_norm) and rhs_norm < b_norm:
            if rhs_norm <= tol * b_norm:
                return guess
            start, rhs, rhs_tol = guess, residual, tol * b_norm / rhs_norm
    if method == "krylov":
        # GMRES is kept while each restart cycle beats the rate that as many fixed-point steps
        # are guaranteed (gamma per step); if it stalls, the fixed point finishes from its x.
        x, converged = _gmres(lambda v: gamma * apply(v), rhs, rhs_tol,
                              max_iter=max(1000, 10 * b.numel()),
                              stall=gamma ** _GMRES_RESTART if gamma < 1.0 else None,
                              complement=True)
        x = x + start
        if converged or gamma >= 1.0:
            return x
        return _fixed_point(apply, b, gamma, tol, norm_ord, 1_000_000, v0=x)
    return _fixed_point(apply, b, gamma, tol, norm_ord, 1_000_000,
                        v0=start if rhs is not b else None)


def _method(P: Transitions, method: str) -> str:
    if method == "auto":
        return "direct" if direct_solves(P) else "krylov"
    if method not in ("direct", "krylov", "fixed_point"):
        raise ValueError(f"unknown method {method!r}: use auto, direct, krylov or fixed_point")
    return method


@dataclass
class WarmStart:
    """The last solution and adjoint of one system that is solved again for each new policy
    (the objective's `value(M, policy)` at every outer iteration): where the solves iterate,
    they start from these, a few iterations away, rather than from zero."""

    solution: Tensor | None = None
    adjoint: Tensor | None = None


class _PolicySolve(torch.autograd.Function):
    """``v = (I - gamma P_pi)^{-1} b`` (or ``^{-T}``), differentiable in ``pi`` and ``b``.

    The backward pass is one solve with the other orientation (with the forward pass's factors
    when it factorised): for ``v = A^{-1} b`` and adjoint ``z = A^{-T} dL/dv``, ``dL/db = z``
    and ``dL/dpi[s,a] = gamma z[s] (P v)[s,a]``; for the transposed system the roles of
    solution and adjoint swap.
    """

    @staticmethod
    def forward(ctx, pi: Tensor, b: Tensor, P: Transitions, gamma: float,  # type: ignore[override]
                transpose: bool, method: str, tol: float, warm: WarmStart | None) -> Tensor:
        method = _method(P, method)
        factors = _Factorisation(P, pi, gamma) if method == "direct" else None
        v = _solve(P, pi, b, gamma, transpose, method, tol, factors,
                   warm.solution if warm is not None else None)
        if warm is not None and factors is None:
            warm.solution = v.detach()
        ctx.save_for_backward(pi, v)
        ctx.args = (P, gamma, transpose, method, tol, factors, warm)
        return v

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple:  # type: ignore[override]
        pi, v = ctx.saved_tensors
        P, gamma, transpose, method, tol, factors, warm = ctx.args
        z = _solve(P, pi, grad, gamma, not transpose, method, tol, factors,
                   warm.adjoint if warm is not None else None)
        if warm is not None and factors is None:
            warm.adjoint = z.detach()
        grad_pi = None
        if ctx.needs_input_grad[0]:
            left, right = (v, z) if transpose else (z, v)
            grad_pi = gamma * left.unsqueeze(-1) * P.expect(right)
        return grad_pi, z, None, None, None, None, None, None


def solve_policy_system(
    P: Transitions,
    pi: Tensor,
    b: Tensor,
    gamma: float,
    transpose: bool = False,
    method: str = "auto",
    tol: float = 1e-12,
    warm: WarmStart | None = None,
) -> Tensor:
    """Solve ``(I - gamma P_pi) v = b``, or ``(I - gamma P_pi)^T v = b`` with ``transpose``.

    Methods: ``direct`` (LU of ``I - gamma P_pi``: dense for dense P, SuperLU for sparse P),
    ``krylov`` (restarted GMRES, relative residual ``tol``; finished by the fixed point if a
    restart cycle does worse than ``gamma^30``, which happens on slowly mixing chains),
    ``fixed_point`` (``v <- b + gamma P_pi v``, a contraction), and ``auto``: direct up to
    ``DIRECT_MAX_STATES`` states for dense P, and for sparse P where the state graph's envelope
    is narrow (``direct_solves``), else krylov. Differentiable in ``pi`` and ``b`` at the cost
    of one more solve in the backward pass (with the same factors when direct). With
    ``warm``, the iterative methods start both solves from the last ones' answers, and keep
    these answers there.
    """
    return _PolicySolve.apply(pi, b, P, gamma, transpose, method, tol, warm)


def _xlogx(p: Tensor) -> Tensor:
    """``p log p`` with value and gradient finite at ``p = 0`` (softmax can underflow there)."""
    return p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))


def policy_evaluation(
    P: Transitions, r: Tensor, pi: Tensor, gamma: float, tau: float = 0.0, method: str = "auto",
    warm: WarmStart | None = None,
) -> Tensor:
    """``V^pi`` for reward ``r`` with entropy bonus ``tau``; differentiable in ``r`` and ``pi``."""
    reward = sum_actions(pi * r)
    if tau:
        reward = reward - tau * sum_actions(_xlogx(pi))
    return solve_policy_system(P, pi, reward, gamma, method=method, warm=warm)


def occupancy(
    P: Transitions, pi: Tensor, rho: Tensor, gamma: float, method: str = "auto",
    warm: WarmStart | None = None,
) -> Tensor:
    """Discounted occupancy ``d[s,a] = sum_t gamma^t Pr(s_t = s, a_t = a)``, unnormalised.

    ``sum(d * r) = rho . V^pi``; differentiable in ``pi`` and ``rho``.
    """
    state = solve_policy_system(P, pi, rho, gamma, transpose=True, method=method, warm=warm)
    return pi * state.unsqueeze(-1)
