"""A fused soft Bellman step in C, measured against torch's (docs/benchmarks.md, section 14).

    python bench/fused_step.py [--states 1e5] [--threads N]

Target 2a asks an M-SoBiRL iteration at 10^5 states to cost at most 1.5x the N + 2 bare sparse
products with P. torch's step is MKL's CSR product followed by separate passes (``exp``, the sum
over actions, ``log``); this script measures what a kernel that folds those passes into the
product would gain. The kernel is not part of brl: it is compiled here with the system's gcc
(``-O3 -march=native -fopenmp``, glibc's vector ``exp``/``log``) into a temporary folder and
called through ctypes. P is stored "ELL" style for it, action-major: for each action and each of
the K successor slots, one column of indices and one of probabilities over all states (rows with
fewer than K successors padded with zero probabilities), so that the loop over states vectorises
with gathers. The problem is bench/scaling.py's (random_mdp, 4 actions, 5 successors, per-pair
reward). Not a test: it measures, and exits 2 without a C compiler.
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import common

KERNEL = r"""
#include <math.h>
#include <stdint.h>
#define BLOCK 256

/* out[s] = log(sum_a exp(base[a][s] + gamma sum_k val[a][k][s] u[idx[a][k][s]])) + shift */
void ell_bellman_step(int64_t S, int64_t A, int64_t K, const int32_t *restrict idx,
                      const double *restrict val, const double *restrict base,
                      const double *restrict u, double gamma, double shift,
                      double *restrict out) {
    #pragma omp parallel for schedule(static)
    for (int64_t s0 = 0; s0 < S; s0 += BLOCK) {
        int64_t n = S - s0 < BLOCK ? S - s0 : BLOCK;
        double total[BLOCK], q[BLOCK];
        for (int64_t i = 0; i < n; i++) total[i] = 0.0;
        for (int64_t a = 0; a < A; a++) {
            for (int64_t i = 0; i < n; i++) q[i] = 0.0;
            for (int64_t k = 0; k < K; k++) {
                const int32_t *ix = idx + (a * K + k) * S + s0;
                const double *p = val + (a * K + k) * S + s0;
                #pragma omp simd
                for (int64_t i = 0; i < n; i++) q[i] += p[i] * u[ix[i]];
            }
            const double *b = base + a * S + s0;
            #pragma omp simd
            for (int64_t i = 0; i < n; i++) total[i] += exp(b[i] + gamma * q[i]);
        }
        #pragma omp simd
        for (int64_t i = 0; i < n; i++) out[s0 + i] = log(total[i]) + shift;
    }
}

/* the bare product in the same layout: out[a][s] = sum_k val[a][k][s] u[idx[a][k][s]] */
void ell_product(int64_t S, int64_t A, int64_t K, const int32_t *restrict idx,
                 const double *restrict val, const double *restrict u, double *restrict out) {
    #pragma omp parallel for schedule(static)
    for (int64_t s0 = 0; s0 < S; s0 += BLOCK) {
        int64_t n = S - s0 < BLOCK ? S - s0 : BLOCK;
        for (int64_t a = 0; a < A; a++) {
            double *o = out + a * S + s0;
            for (int64_t i = 0; i < n; i++) o[i] = 0.0;
            for (int64_t k = 0; k < K; k++) {
                const int32_t *ix = idx + (a * K + k) * S + s0;
                const double *p = val + (a * K + k) * S + s0;
                #pragma omp simd
                for (int64_t i = 0; i < n; i++) o[i] += p[i] * u[ix[i]];
            }
        }
    }
}
"""


def build(folder: Path) -> ctypes.CDLL:
    source, library = folder / "fused.c", folder / "fused.so"
    source.write_text(KERNEL)
    subprocess.run(["gcc", "-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math",
                    "-fopenmp", "-shared", "-fPIC", str(source), "-o", str(library), "-lmvec",
                    "-lm"], check=True)
    return ctypes.CDLL(str(library))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--states", default="1e5", help="number of states (default 1e5)")
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per kernel")
    common.add_machine_options(parser)
    args = parser.parse_args()
    if shutil.which("gcc") is None:
        print("no gcc on this machine: nothing to measure", file=sys.stderr)
        sys.exit(2)
    common.set_threads(args.threads)

    import torch
    from scaling import source

    import bilevel_dsl as brl
    from bilevel_dsl.softmdp import _BellmanLoop

    states = int(float(args.states))
    problem = brl.lower(brl.compile_source(source(states, "policy", "pair"), "scaling.brl"),
                        device="cpu")
    P, S, A = problem.transitions, problem.n_states, problem.n_actions
    gamma, tau = problem.discount, problem.temperature
    with torch.no_grad():
        r = problem.reward(problem.x0)
    u = torch.rand(S, generator=torch.Generator().manual_seed(1), dtype=torch.float64) / tau
    loop = _BellmanLoop(P, r, u, gamma, tau, 10)
    if loop.shift is None or not P.is_sparse:
        sys.exit("this problem takes the per-state shift or dense P; the kernel covers neither")

    # ELL layout from the CSR rows s*A + a
    rows, cols, values = P.coo()
    lengths = torch.bincount(rows, minlength=S * A)
    K = int(lengths.max())
    slot = torch.arange(rows.numel()) - (torch.cumsum(lengths, 0) - lengths)[rows]
    where = ((rows % A) * K + slot) * S + rows // A
    idx = torch.zeros(A * K * S, dtype=torch.int32)
    val = torch.zeros(A * K * S, dtype=torch.float64)
    idx[where], val[where] = cols.to(torch.int32), values
    base = loop.base.view(S, A).T.contiguous()

    with tempfile.TemporaryDirectory() as folder:
        lib = build(Path(folder))
        pointer = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
        size = [ctypes.c_int64(n) for n in (S, A, K)]
        out, product = torch.empty(S, dtype=torch.float64), torch.empty(A * S, dtype=torch.float64)

        def fused_step() -> None:
            lib.ell_bellman_step(*size, pointer(idx), pointer(val), pointer(base), pointer(u),
                                 ctypes.c_double(gamma), ctypes.c_double(loop.shift),
                                 pointer(out))

        def ell_product() -> None:
            lib.ell_product(*size, pointer(idx), pointer(val), pointer(u), pointer(product))

        matrix = P.flat_matrix()
        timings = {
            "MKL CSR product (torch.mv), the floor's": lambda: torch.mv(matrix, u),
            "torch Bellman step (product, then exp, sum, log)": lambda: loop.steps(u, 1),
            "C product, ELL layout": ell_product,
            "C fused Bellman step, ELL layout": fused_step,
        }
        rows_out = []
        for name, call in timings.items():
            ms = common.median(common.time_call(call, args.repeats)) * 1e3
            rows_out.append([name, f"{ms:.3f}"])
        fused_step()
        step_error = float((out - loop.steps(u, 1)).abs().max())
        ell_product()
        product_error = float((product.view(A, S).T.reshape(-1) - torch.mv(matrix, u)).abs().max())

    common.print_machine()
    print(f"{S:,} states, {A} actions, {P.nnz:,} nonzeros (ELL: {K} slots), float64, "
          f"median of {args.repeats} calls")
    print()
    print(common.table(["kernel", "ms per call"], rows_out))
    print()
    print(f"largest difference from torch: step {step_error:.1e}, product {product_error:.1e}")
    common.print_load_at_end()


if __name__ == "__main__":
    main()
