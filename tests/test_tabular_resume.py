"""A tabular run's work kept: its record saved as it goes (a run killed outright leaves its last
iterate), ``--resume`` taking it up at that iterate, and ``--force`` keeping the run it replaces
until the new one has saved."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from bilevel_dsl.cli import main
from solvers.progress import ProgressMonitor
from solvers.result import UNFINISHED, unfinished

# a bounded leader on a 4-state MDP: exact's steps are deterministic to the follower's tolerance
PROBLEM = ("brl 1\nmdp M = random_mdp(states = 4, actions = 2, discount = 0.9)\n"
           "var x[M.S, M.A] = 0 in [-1, 1]\n"
           "lower M { temperature = 0.5  reward[s, a] = x[s, a] }\n"
           "upper minimize 0.5 * norm2(x) - value(M, policy, M.R + 1)\n")


def _solve(tmp_path: Path, capsys, *flags: str) -> tuple[int, str, str]:
    path = tmp_path / "p.brl"
    if not path.exists():
        path.write_text(PROBLEM)
    code = main(["solve", str(path), "--quiet", *flags])
    out, err = capsys.readouterr()
    return code, out, err


def _record(folder: Path) -> dict:
    return json.loads((folder / "result.json").read_text())


def test_the_monitor_offers_the_run_to_its_keeper_at_most_once_an_interval():
    clock = iter(range(100)).__next__
    kept = []
    monitor = ProgressMonitor(10, stream=open(os.devnull, "w"), clock=lambda: float(clock()),
                              keeper=kept.append, keep_every=3.0)
    import torch

    for k in range(8):
        monitor.update(k, 1.0, 1.0)
        monitor.keep(lambda k=k: unfinished(torch.zeros(2), torch.ones(2, 1), 1.0, {}, k))
    assert [r.iterations for r in kept] == [1, 3, 5, 7]  # the clock ticks once per read
    assert all(r.stopped_because == UNFINISHED for r in kept)


def test_a_tabular_run_killed_outright_leaves_its_last_iterate(tmp_path):
    """kill -9 (or the OOM killer) gives a run no chance to write: the record it saved as it
    went is what is left, whole and marked `unfinished`."""
    path, out = tmp_path / "p.brl", tmp_path / "run"
    path.write_text(PROBLEM)
    process = subprocess.Popen(
        [sys.executable, "-m", "bilevel_dsl.cli", "solve", str(path), "--quiet", "--out",
         str(out), "--solver", "m_sobirl", "--set", "outer=100000000", "--save-every", "0.2"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 60
    while not (out / "result.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    record = _record(out)
    assert record["stopped_because"] == "unfinished" and record["iterations"] > 0
    assert record["history"]["iteration"][-1] == record["iterations"]
    assert len(record["x"]) == 4 and record["timings"]["solve"] > 0


def test_resume_takes_an_exact_run_up_where_it_ended(tmp_path, capsys):
    """exact keeps no state beyond x (the follower is solved to 1e-10 at every step), so a run
    of 12 steps resumed for 13 more ends where 25 uninterrupted steps end."""
    whole, part = tmp_path / "whole", tmp_path / "part"
    common = ("--solver", "exact", "--set", "beta=0.5")
    assert _solve(tmp_path, capsys, *common, "--set", "outer=25", "--out", str(whole))[0] == 0
    assert _solve(tmp_path, capsys, *common, "--set", "outer=12", "--out", str(part))[0] == 0
    code, out, err = _solve(tmp_path, capsys, "--resume", str(part), "--set", "outer=25")
    assert code == 0, err
    assert f"note: resuming at iteration 12 of the run in {part}" in err
    assert "iterations       25 (resumed at iteration 12)" in out
    a, b = _record(whole), _record(part)
    assert b["iterations"] == a["iterations"] == 25 and b["resumed_at"] == [12]
    assert b["solver"] == a["solver"]  # the saved options, but outer as --set says
    assert len(b["history"]["objective"]) == len(a["history"]["objective"]) == 26
    assert max(abs(u - v) for u, v in zip(sum(a["x"], []), sum(b["x"], []))) < 1e-8
    assert abs(a["objective"] - b["objective"]) < 1e-10
    times = b["history"]["time"]
    assert all(later >= earlier for earlier, later in zip(times, times[1:]))


def test_resume_merges_a_history_kept_every_few_iterations(tmp_path, capsys):
    """m_sobirl with log_every = 4 and outer = 10 records the steps from iterates 0, 4, 8 and 9
    (the last, whatever log_every) and ends at x_10; the continuation's iterate 0 is x_10."""
    out = tmp_path / "run"
    flags = ("--solver", "m_sobirl", "--set", "log_every=4", "--out", str(out))
    assert _solve(tmp_path, capsys, *flags, "--set", "outer=10")[0] == 0
    assert _record(out)["history"]["iteration"] == [0, 4, 8, 9]
    code, _, err = _solve(tmp_path, capsys, "--resume", str(out), "--set", "outer=20")
    assert code == 0, err
    record = _record(out)
    assert record["history"]["iteration"] == [0, 4, 8, 9, 10, 14, 18, 19]
    assert record["iterations"] == 20 and record["resumed_at"] == [10]
    assert record["solver"]["options"]["start"] == "solved"
    assert all(len(v) == 8 for v in record["history"].values())
    # and again: the earlier resumption is kept
    assert _solve(tmp_path, capsys, "--resume", str(out), "--set", "outer=22")[0] == 0
    assert _record(out)["resumed_at"] == [10, 20]


@pytest.mark.parametrize(("change", "message"), [
    (("--seed", "7"), "was saved with seed 0; this run has seed 7. Resume with --seed 0"),
    (("--set", "outer=5"), "is at iteration 5, and this run's outer = 5; resume with --set "
                           "outer=N for an N above 5"),
    (("--set", "beta=0.2"), "was saved with beta = 0.5; this run has beta = 0.2. Resume with "
                            "--set beta=0.5"),
])
def test_resume_refuses_another_run(tmp_path, capsys, change, message):
    out = tmp_path / "run"
    assert _solve(tmp_path, capsys, "--solver", "exact", "--set", "beta=0.5", "--set",
                  "outer=5", "--out", str(out))[0] == 0
    before = (out / "result.json").read_text()
    code, _, err = _solve(tmp_path, capsys, "--resume", str(out), *change)
    assert code == 1 and message in err, err
    assert (out / "result.json").read_text() == before


@pytest.mark.parametrize(("damage", "why"), [
    (lambda r: r.update(x=[[1.0, 2.0]]), "`x` has shape [1, 2]"),
    (lambda r: r.update(iterations=-1), "`iterations` is -1, not a count"),
    (lambda r: r.update(history=[1, 2]), "its `history` is missing or garbled"),
    (lambda r: r.update(solver="exact"), "its problem, seed, solver or options are garbled"),
])
def test_resume_refuses_a_damaged_record(tmp_path, capsys, damage, why):
    out = tmp_path / "run"
    assert _solve(tmp_path, capsys, "--solver", "exact", "--set", "outer=3", "--out",
                  str(out))[0] == 0
    record = _record(out)
    damage(record)
    (out / "result.json").write_text(json.dumps(record))
    code, _, err = _solve(tmp_path, capsys, "--resume", str(out), "--solver", "exact")
    assert code == 1 and "is damaged or incomplete" in err and why in err, err
    assert "Traceback" not in err


def test_resume_without_a_record_says_what_is_missing(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = _solve(tmp_path, capsys, "--resume", str(tmp_path / "empty"))
    assert code == 1
    assert "no record there (expected" in err and "result.json" in err


def test_force_keeps_the_old_run_until_the_new_one_saves(tmp_path, capsys, monkeypatch):
    """A replacing run that fails before it saves anything leaves the old run as it was; one
    that saves replaces it, leaving nothing of the old behind."""
    import dataclasses

    import solvers

    out = tmp_path / "run"
    assert _solve(tmp_path, capsys, "--solver", "exact", "--set", "outer=3", "--out",
                  str(out))[0] == 0
    old = (out / "result.json").read_text()
    resolve = solvers.resolve

    def failing(*args):
        spec, options = resolve(*args)
        return dataclasses.replace(spec, run=lambda *a, **k: 1 / 0), options

    monkeypatch.setattr(solvers, "resolve", failing)
    code, _, err = _solve(tmp_path, capsys, "--force", "--out", str(out))
    assert code == 2 and "ZeroDivisionError" in err
    assert "the run it was to replace is kept" in err
    assert (out / "result.json").read_text() == old
    assert sorted(p.name for p in out.iterdir()) == ["curve.png", "result.json"]
    monkeypatch.setattr(solvers, "resolve", resolve)
    assert _solve(tmp_path, capsys, "--force", "--out", str(out), "--solver", "exact",
                  "--set", "outer=4")[0] == 0
    assert _record(out)["iterations"] == 4
    assert sorted(p.name for p in out.iterdir()) == ["curve.png", "result.json"]


def test_a_model_free_run_resumes_with_its_counts_going_on(tmp_path, capsys):
    """sobirl's cumulative simulator draws go on from the saved count, and the continuation
    draws new numbers: its first sampled estimate is not the run's first again."""
    out = tmp_path / "run"
    (tmp_path / "p.brl").write_text(PROBLEM.replace(
        "value(M, policy, M.R + 1)", "expected_return(M, policy, horizon = 10, reward = R)")
        .replace("var x", "param R[M.S, M.A] ~ normal(0, 1)\nvar x"))
    assert _solve(tmp_path, capsys, "--solver", "sobirl", "--set", "outer=4", "--set",
                  "verify=off", "--out", str(out))[0] == 0
    first = _record(out)
    code, _, err = _solve(tmp_path, capsys, "--resume", str(out), "--set", "outer=7")
    assert code == 0, err
    record = _record(out)
    assert record["iterations"] == 7 and record["resumed_at"] == [4]
    assert record["history"]["iteration"] == list(range(7))
    drawn = record["history"]["transitions"]
    assert all(later > earlier for earlier, later in zip(drawn, drawn[1:]))
    assert record["history"]["objective"][:4] == first["history"]["objective"]
    assert record["history"]["objective"][4] != first["history"]["objective"][0]
