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
import torch
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
    (lambda r: r.update(x=[[1.0, "a"]]), "`x` is not an array of numbers"),
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
    assert code == 70 and "ZeroDivisionError" in err
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


def test_a_query_budget_counts_the_saved_runs_queries(tmp_path, capsys):
    """drlhf with query_budget = 200 (64 a step): the first command stops at 256; resuming
    goes no further, and a raised budget goes on from 256, the totals counting both parts."""
    out, source = tmp_path / "run", str(ROOT / "problems" / "rlhf_chain.brl")
    flags = ("--solver", "drlhf", "--set", "verify=off", "--quiet")
    assert main(["solve", source, *flags, "--set", "query_budget=200", "--out", str(out)]) == 0
    first = _record(out)
    assert first["stopped_because"] == "query_budget" and first["extra"]["queries"] == 256
    capsys.readouterr()
    assert main(["solve", source, "--quiet", "--resume", str(out)]) == 1
    assert ("the saved run has asked 256 preference queries, its query_budget = 200; resume "
            "with --set query_budget=N for an N above 256") in capsys.readouterr().err
    assert main(["solve", source, "--quiet", "--resume", str(out), "--set",
                 "query_budget=400"]) == 0
    record = _record(out)
    assert record["stopped_because"] == "query_budget" and record["extra"]["queries"] == 448
    assert record["history"]["queries"] == [64, 128, 192, 256, 320, 384, 448]
    assert record["history"]["iteration"] == list(range(7)) and record["iterations"] == 7


def test_a_run_set_aside_by_a_killed_force_is_put_back(tmp_path, capsys):
    """A --force run killed before it saved leaves the old run in .brl-replaced/, its only
    copy: the next run given the folder puts it back first (a second --force deleted it)."""
    out = tmp_path / "run"
    assert _solve(tmp_path, capsys, "--solver", "exact", "--set", "outer=3", "--out",
                  str(out))[0] == 0
    old = (out / "result.json").read_text()
    (out / ".brl-replaced").mkdir()
    for name in ("result.json", "curve.png"):  # as _set_aside left them
        (out / name).rename(out / ".brl-replaced" / name)
    (out / ".result.json.x1y2.tmp").write_text("{")  # a write a kill cut short
    code, _, err = _solve(tmp_path, capsys, "--out", str(out))
    assert code == 1 and "already holds a run" in err
    assert "holds again the run that an earlier --force set aside" in err
    assert (out / "result.json").read_text() == old
    code, _, err = _solve(tmp_path, capsys, "--resume", str(out), "--set", "outer=4")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["curve.png", "result.json"]


def test_force_keeps_the_old_run_when_the_new_one_stops_before_an_iteration(
        tmp_path, capsys, monkeypatch):
    """A tabular run stopped at once still writes a record (interrupted, 0 iterations): that
    is no replacement for a run of 3 iterations."""
    import dataclasses

    import solvers
    from solvers.result import SolveResult

    out = tmp_path / "run"
    assert _solve(tmp_path, capsys, "--solver", "exact", "--set", "outer=3", "--out",
                  str(out))[0] == 0
    old = (out / "result.json").read_text()
    resolve = solvers.resolve

    def stopped(problem, *args, **kwargs):
        return SolveResult(problem.x0, torch.full((4, 2), 0.5, dtype=torch.float64), 0.0,
                           {"objective": [], "hypergrad_norm": [], "time": []}, 0,
                           "interrupted")

    monkeypatch.setattr(solvers, "resolve", lambda *a: (
        dataclasses.replace(resolve(*a)[0], run=stopped), resolve(*a)[1]))
    code, _, err = _solve(tmp_path, capsys, "--force", "--out", str(out))
    assert code == 130 and "the run it was to replace is kept" in err
    assert (out / "result.json").read_text() == old


def test_resume_says_what_a_record_cannot_tell(tmp_path, capsys):
    """An older record has no -D values: a note asks for them. A variable whose shape the
    file has changed is named as such, not as a damaged record."""
    out = tmp_path / "run"
    assert _solve(tmp_path, capsys, "--solver", "exact", "--set", "outer=3", "--out",
                  str(out))[0] == 0
    record = _record(out)
    del record["defines"]
    (out / "result.json").write_text(json.dumps(record))
    code, _, err = _solve(tmp_path, capsys, "--resume", str(out), "--set", "outer=4")
    assert code == 0 and "did not keep its -D values" in err
    (tmp_path / "p.brl").write_text(PROBLEM.replace("random_mdp(states = 4", "random_mdp("
                                                    "states = 5"))
    code, _, err = _solve(tmp_path, capsys, "--resume", str(out), "--set", "outer=5")
    assert code == 1 and "damaged" not in err
    assert ("has `x` of shape [4, 2], and the file now declares it with shape [5, 2]; resume "
            "with the file as it was") in err


def test_a_resumed_runs_progress_counts_from_where_it_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    path = tmp_path / "p.brl"
    path.write_text(PROBLEM)
    assert main(["solve", str(path), "--quiet", "--solver", "exact", "--set", "outer=10",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["solve", str(path), "--resume", str(out), "--set", "outer=20"]) == 0
    lines = [line.split()[0] for line in capsys.readouterr().err.splitlines()
             if "/20" in line]
    assert lines[0] == "12/20" and lines[-1] == "20/20", lines


def test_nohup_keeps_a_run_going_through_a_hang_up(tmp_path):
    """`nohup brl solve ...` ignores SIGHUP; brl used to put its own handler in its place."""
    path, out = tmp_path / "p.brl", tmp_path / "run"
    path.write_text(PROBLEM)
    process = subprocess.Popen(
        [sys.executable, "-m", "bilevel_dsl.cli", "solve", str(path), "--quiet", "--out",
         str(out), "--solver", "m_sobirl", "--set", "outer=20000"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    deadline = time.time() + 60
    while not out.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    process.send_signal(signal.SIGHUP)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert _record(out)["stopped_because"] == "max_iterations"


def test_a_run_that_fails_in_mid_course_keeps_the_iterations_it_finished(tmp_path, capsys):
    """An index that follows the variable is whole at x0 and fractional a few steps on: the
    run fails there, and its folder keeps what came before (stopped_because `failed`), from
    which --resume goes on once the file is mended."""
    path, out = tmp_path / "p.brl", tmp_path / "run"
    failing = PROBLEM.replace("upper minimize 0.5 * norm2(x)", "param w[2] = [1, 2]\nupper "
                              "minimize w[if x[0, 0] > 0.05 then x[0, 0] else 0] + norm2(x - 1)")
    assert failing != PROBLEM
    path.write_text(failing)
    code, _, err = _solve(tmp_path, capsys, "--solver", "exact", "--set", "outer=50",
                          "--set", "beta=0.01", "--out", str(out))
    record = _record(out)
    assert code == 1 and record["stopped_because"] == "failed", err
    assert 0 < record["iterations"] < 50 and len(record["history"]["objective"]) > 1
    assert record["extra"]["failure"].startswith("error[E305]: an index must be an integer")
    assert f"the run failed after iteration {record['iterations']}, which {out} keeps" in err
    assert "it follows the variable `x`" in err and (out / "curve.png").exists()
    path.write_text(failing.replace("then x[0, 0] else 0", "then 1 else 0"))
    code, _, err = _solve(tmp_path, capsys, "--resume", str(out))
    assert code == 0 and _record(out)["iterations"] == 50, err


def test_resume_refuses_a_solver_the_file_now_names(tmp_path, capsys):
    path, out = tmp_path / "p.brl", tmp_path / "run"
    path.write_text(PROBLEM + "solve m_sobirl(outer = 3)\n")
    assert _solve(tmp_path, capsys, "--out", str(out))[0] == 0
    path.write_text(PROBLEM + "solve exact(outer = 6)\n")
    code, _, err = _solve(tmp_path, capsys, "--resume", str(out))
    assert code == 1 and "saved with solver m_sobirl" in err and "--solver m_sobirl" in err, err
    code, _, err = _solve(tmp_path, capsys, "--resume", str(out), "--solver", "m_sobirl",
                          "--set", "outer=6")
    assert code == 0 and _record(out)["iterations"] == 6, err
