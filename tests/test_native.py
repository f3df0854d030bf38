"""The fused loops of native.c give torch's numbers, and brl runs on torch alone without them."""

from __future__ import annotations

import shutil

import pytest
import torch

from bilevel_dsl import native
from bilevel_dsl.softmdp import Transitions, _BellmanLoop, pull_steps, soft_bellman_update

DT = torch.float64

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                    reason="no C compiler: brl runs on torch's loops alone")


def sparse_P(S: int, A: int, seed: int, successors: tuple[int, int] = (1, 6),
             terminal: float = 0.0) -> Transitions:
    """Random sparse P with rows of unequal length; a fraction ``terminal`` of the rows is empty
    (all the mass flows into a terminal state)."""
    g = torch.Generator().manual_seed(seed)
    rows, cols, vals = [], [], []
    for row in range(S * A):
        if float(torch.rand((), generator=g, dtype=DT)) < terminal:
            continue
        n = int(torch.randint(successors[0], successors[1] + 1, (), generator=g))
        cols.append(torch.randperm(S, generator=g)[:n])
        rows.append(torch.full((n,), row))
        w = torch.rand(n, generator=g, dtype=DT) + 0.1
        vals.append(w / w.sum() * 0.999)
    return Transitions.from_coo(torch.cat(rows), torch.cat(cols), torch.cat(vals), S, A)


def torch_twin(P: Transitions, monkeypatch: pytest.MonkeyPatch) -> Transitions:
    """The same P with the fused loops turned off (a copy: the layout is cached per object)."""
    monkeypatch.setenv("BRL_NATIVE", "0")
    twin = Transitions.from_coo(*P.coo(), P.n_states, P.n_actions)
    assert twin.fused_layout() is None
    monkeypatch.delenv("BRL_NATIVE")
    return twin


@needs_compiler
def test_the_library_builds_where_there_is_a_compiler():
    assert native.library() is not None, native.why()
    assert native.why() == ""


@needs_compiler
@pytest.mark.parametrize("S, A, tau, gamma, reward_scale", [
    (300, 4, 0.1, 0.99, 1.0),      # several blocks of 256 states, the last one short
    (7, 1, 1.0, 0.9, 1.0),         # one action, fewer states than a block
    (600, 5, 0.01, 0.999, 50.0),   # no constant shift fits: each state's maximum
    (257, 3, 10.0, 0.5, 1.0),      # one state past a block
    (40, 200, 0.5, 0.9, 1.0),      # many actions, few states
])
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_bellman_steps_match_torch(monkeypatch, S, A, tau, gamma, reward_scale, steps):
    P = sparse_P(S, A, seed=S + A, terminal=0.05)
    twin = torch_twin(P, monkeypatch)
    assert P.fused_layout() is not None
    g = torch.Generator().manual_seed(1)
    r = reward_scale * torch.randn(S, A, generator=g, dtype=DT)
    V = torch.randn(S, generator=g, dtype=DT) / (1 - gamma)
    fused = soft_bellman_update(P, r, V, gamma, tau, steps)
    plain = soft_bellman_update(twin, r, V, gamma, tau, steps)
    scale = float(plain[0].abs().max())
    for a, b in (fused[0], plain[0]), (fused[2], plain[2]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13 * scale)
    # the policy exp(Q / tau) turns rounding in Q into scale / tau times as much
    torch.testing.assert_close(fused[1], plain[1], rtol=0, atol=1e-15 * scale / tau)
    # warm-started from the product the last call returned (the first step takes it)
    again = soft_bellman_update(P, r, fused[0], gamma, tau, steps, fused[2])
    again_plain = soft_bellman_update(twin, r, plain[0], gamma, tau, steps, plain[2])
    torch.testing.assert_close(again[0], again_plain[0], rtol=1e-12,
                               atol=1e-12 * float(again_plain[0].abs().max()))


@needs_compiler
@pytest.mark.parametrize("constant_shift", [True, False])
def test_both_exponent_shifts_are_fused(monkeypatch, constant_shift):
    S, A, tau, gamma = 400, 4, 1.0 if constant_shift else 0.001, 0.95
    P = sparse_P(S, A, seed=3)
    twin = torch_twin(P, monkeypatch)
    r = torch.randn(S, A, generator=torch.Generator().manual_seed(2), dtype=DT)
    u = torch.zeros(S, dtype=DT)
    loop, plain = _BellmanLoop(P, r, u, gamma, tau, 5), _BellmanLoop(twin, r, u, gamma, tau, 5)
    assert loop.fused is not None and (loop.shift is not None) == constant_shift
    torch.testing.assert_close(loop.steps(u, 5), plain.steps(u, 5), rtol=1e-13, atol=1e-9)


@needs_compiler
def test_infinite_and_nan_rewards_flow_as_in_torch(monkeypatch):
    S, A, tau, gamma = 300, 3, 0.1, 0.9
    P = sparse_P(S, A, seed=5)
    twin = torch_twin(P, monkeypatch)
    r = torch.randn(S, A, generator=torch.Generator().manual_seed(4), dtype=DT)
    r[10, 1] = -torch.inf  # a forbidden action
    r[20, :] = -torch.inf  # a state with none allowed
    r[30, 2] = torch.nan
    V = torch.zeros(S, dtype=DT)
    fused = soft_bellman_update(P, r, V, gamma, tau, 3)[0]
    plain = soft_bellman_update(twin, r, V, gamma, tau, 3)[0]
    assert torch.equal(fused.isnan(), plain.isnan()) and bool(fused.isnan().any())
    assert torch.equal(fused.isneginf(), plain.isneginf())
    finite = fused.isfinite()
    torch.testing.assert_close(fused[finite], plain[finite], rtol=1e-13, atol=1e-12)


@needs_compiler
def test_the_bare_product_is_p_times_v():
    P = sparse_P(700, 3, seed=11, terminal=0.1)
    v = torch.randn(700, generator=torch.Generator().manual_seed(3), dtype=DT)
    torch.testing.assert_close(native.product(P.fused_layout(), v), P.expect(v).T, rtol=1e-14,
                               atol=1e-14)


@needs_compiler
@pytest.mark.parametrize("kind", ["centred", "fixed_point"])
@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("scatter", [False, True])
def test_adjoint_steps_match_torch(monkeypatch, kind, steps, scatter):
    if scatter:  # as on problems whose S*A vector outgrows the cache
        monkeypatch.setattr(native, "_SCATTER_MIN_PAIRS", 0)
    S, A, gamma = 500, 4, 0.99
    P = sparse_P(S, A, seed=7, terminal=0.02)
    twin = torch_twin(P, monkeypatch)
    g = torch.Generator().manual_seed(8)
    grad = torch.randn(S, A, generator=g, dtype=DT)
    pi = torch.softmax(torch.randn(S, A, generator=g, dtype=DT), -1)
    z = torch.randn(S, generator=g, dtype=DT)
    g_sum = grad.sum(-1)
    if kind == "centred":
        args = {"sign": 1.0, "alpha": gamma, "d": -g_sum}
    else:
        args = {"sign": -1.0, "alpha": -gamma, "c": g_sum}
    fused = pull_steps(P, grad, pi, z, steps, **args)
    plain = pull_steps(twin, grad, pi, z, steps, **args)
    torch.testing.assert_close(fused, plain, rtol=1e-13, atol=1e-13)
    assert pull_steps(P, grad, pi, z, 0, **args) is z


@needs_compiler
def test_storage_the_loops_cannot_take_keeps_torch():
    P = sparse_P(50, 2, seed=1)
    assert P.to(dtype=torch.float32).fused_layout() is None
    assert Transitions.from_dense(P.dense()).fused_layout() is None
    # one row with every state as a successor: padding all rows to it would be 25x the nonzeros
    S, A = 400, 2
    rows = torch.cat([torch.arange(S * A), torch.zeros(S, dtype=torch.long)])
    cols = torch.cat([torch.arange(S * A) % S, torch.arange(S)])
    wide = Transitions.from_coo(rows, cols, torch.full((rows.numel(),), 0.5 / S, dtype=DT), S, A)
    assert wide.fused_layout() is None
    r = torch.zeros(S, A, dtype=DT)
    V = soft_bellman_update(wide, r, torch.zeros(S, dtype=DT), 0.9, 1.0, 3)[0]
    assert bool(V.isfinite().all())


def test_turned_off_or_failing_builds_fall_back_to_torch(monkeypatch, tmp_path):
    monkeypatch.setenv("BRL_NATIVE", "0")
    assert native.library() is None and "BRL_NATIVE=0" in native.why()
    monkeypatch.delenv("BRL_NATIVE")
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("BRL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert native.library() is None and "no-such-compiler is not found" in native.why()
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.delenv("CC")
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    assert native.library() is None and "no C compiler" in native.why()
    P = sparse_P(60, 3, seed=2)
    assert P.fused_layout() is None
    V = soft_bellman_update(P, torch.ones(60, 3, dtype=DT), torch.zeros(60, dtype=DT), 0.9,
                            1.0, 4)[0]
    assert bool(V.isfinite().all())


@needs_compiler
def test_a_compiler_error_is_reported_not_raised(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("BRL_CACHE_DIR", str(tmp_path))
    broken = tmp_path / "native.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(native, "SOURCE", broken)
    assert native.library() is None and native.why()
    assert not list(tmp_path.glob("*.so"))


@needs_compiler
def test_a_cached_layout_is_dropped_once_the_library_is_off(monkeypatch):
    import pickle

    P = sparse_P(300, 3, seed=9)
    r = torch.randn(300, 3, generator=torch.Generator().manual_seed(1), dtype=DT)
    V = torch.zeros(300, dtype=DT)
    fused = soft_bellman_update(P, r, V, 0.9, 1.0, 3)[0]
    assert P.fused_layout() is not None
    copy = pickle.loads(pickle.dumps(P))
    assert copy._fused is None  # decided again where it is loaded
    monkeypatch.setenv("BRL_NATIVE", "0")  # after the layout was built
    assert P.fused_layout() is None
    torch.testing.assert_close(soft_bellman_update(P, r, V, 0.9, 1.0, 3)[0], fused, rtol=1e-13,
                               atol=1e-13)
    grad = torch.randn(300, 3, dtype=DT)
    pull_steps(P, grad, torch.full((300, 3), 1 / 3, dtype=DT), V, 2, 1.0, 0.9)


@needs_compiler
def test_wrong_shapes_never_reach_c(monkeypatch):
    S, A = 300, 3
    P = sparse_P(S, A, seed=10)
    twin = torch_twin(P, monkeypatch)
    ell = P.fused_layout()
    base = torch.zeros(A, S, dtype=DT)
    with pytest.raises(ValueError, match="shape"):
        native.bellman_steps(ell, base, 0.9, None, -700.0, torch.zeros(S - 1, dtype=DT), 2)
    with pytest.raises(ValueError, match="float64"):
        native.policy(ell, base, 1.0, -700.0, torch.zeros(S, dtype=torch.float32))
    # a broadcast policy (S, 1) takes torch's path, which broadcasts it
    grad = torch.randn(S, A, dtype=DT)
    pi, z = torch.full((S, 1), 1 / A, dtype=DT), torch.randn(S, dtype=DT)
    torch.testing.assert_close(pull_steps(P, grad, pi, z, 2, 1.0, 0.9),
                               pull_steps(twin, grad, pi, z, 2, 1.0, 0.9))


def _fresh_build(monkeypatch, folder):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("BRL_CACHE_DIR", str(folder))


@needs_compiler
def test_a_group_writable_umask_keeps_the_cache_private(monkeypatch, tmp_path):
    """Under umask 002 (many systems' default) the folder and the library came out
    group-writable, and the check below then refused them: the fused loops were off."""
    import os
    import stat

    previous = os.umask(0o002)
    try:
        _fresh_build(monkeypatch, tmp_path / "cache")
        assert native.library() is not None, native.why()
        _fresh_build(monkeypatch, tmp_path / "cache")  # a second process finds it
        assert native.library() is not None, native.why()
    finally:
        os.umask(previous)
    for path in [tmp_path / "cache", *(tmp_path / "cache").glob("*.so")]:
        assert not path.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH)


@needs_compiler
@pytest.mark.parametrize("found", ["damaged", "writable by others"])
def test_a_cached_library_is_built_again(monkeypatch, tmp_path, found):
    _fresh_build(monkeypatch, tmp_path / "first")
    assert native.library() is not None
    (built,) = (tmp_path / "first").glob("native-*.so")
    # the same name in a folder not loaded from yet (the loader would reuse a loaded path)
    (tmp_path / "second").mkdir()
    cached = tmp_path / "second" / built.name
    if found == "damaged":
        cached.write_bytes(b"not a shared object")
    else:  # a working library, but another user could have changed it: never loaded
        cached.write_bytes(built.read_bytes())
        cached.chmod(0o666)
    planted = cached.stat().st_ino
    _fresh_build(monkeypatch, tmp_path / "second")
    assert native.library() is not None, native.why()
    assert cached.stat().st_ino != planted and cached.read_bytes() == built.read_bytes()
    assert not cached.stat().st_mode & 0o022


def test_a_compiler_that_fails_silently_is_reported(monkeypatch, tmp_path):
    silent = tmp_path / "silent-cc"
    silent.write_text("#!/bin/sh\nexit 3\n")
    silent.chmod(0o755)
    _fresh_build(monkeypatch, tmp_path / "cache")
    monkeypatch.setenv("CC", f"{silent} --as-a-wrapper")  # split as the shell would
    assert native.library() is None and "exited with 3" in native.why()
