"""The CUDA path gives the CPU's numbers.  Skipped cleanly where torch sees no GPU (CI)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import bilevel_dsl as brl
from solvers import solve
from solvers.hypergrad import hypergradient

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

PROBLEMS = Path(__file__).resolve().parent.parent / "problems"


@pytest.mark.parametrize("name", ["maze_nav", "synthetic", "contract_design"])
def test_hypergradient_on_cuda_matches_cpu(name):
    checked = brl.compile_file(PROBLEMS / f"{name}.brl")
    cpu, cuda = brl.lower(checked, "cpu"), brl.lower(checked, "cuda")
    assert cuda.x0.device.type == "cuda"
    g_cpu = hypergradient(cpu, cpu.x0).grad
    g_cuda = hypergradient(cuda, cuda.x0).grad
    assert g_cuda.device.type == "cuda"
    torch.testing.assert_close(g_cuda.cpu(), g_cpu, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("solver", ["m_sobirl", "exact"])
def test_solvers_on_cuda_match_cpu(solver):
    checked = brl.compile_file(PROBLEMS / "maze_nav.brl")
    runs = [solve(brl.lower(checked, device), solver, {"outer": 30, "beta": 0.05})[1]
            for device in ("cpu", "cuda")]
    assert runs[1].x.device.type == "cuda"
    torch.testing.assert_close(runs[1].x.cpu(), runs[0].x, rtol=1e-7, atol=1e-9)


def test_sparse_transitions_on_cuda():
    text = """brl 1
    mdp M = random_mdp(states = 2000, actions = 4, successors = 5, discount = 0.9)
    param R[M.S, M.A] ~ uniform(0, 1)
    var x[M.S] = 0
    lower M { temperature = 0.5  reward[s, a, t] = x[t] - 0.01 * a }
    upper minimize 0.5 * norm2(x) - value(M, policy, R)
    """
    checked = brl.compile_source(text, "sparse.brl")
    cpu, cuda = brl.lower(checked, "cpu"), brl.lower(checked, "cuda")
    assert cuda.transitions.is_sparse
    assert float(hypergradient(cpu, cpu.x0).grad.norm()) > 1e-3  # a test that can fail
    torch.testing.assert_close(hypergradient(cuda, cuda.x0).grad.cpu(),
                               hypergradient(cpu, cpu.x0).grad, rtol=1e-6, atol=1e-9)
