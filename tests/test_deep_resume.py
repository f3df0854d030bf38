"""Deep runs that stop, resume, or cannot run: the baselines end to end, fragments longer than
the episodes, interrupted runs, damaged and foreign checkpoints, environments the solvers
cannot take. Every run here is tiny (tens of SAC steps, networks of 8 units)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bilevel_dsl import BrlError, compile_source, lower
from solvers import Monitor, SolverError, resolve
from solvers.deep import preferences
from solvers.deep.envs import EnvSpec, make_vector_env
from solvers.deep.output import deep_summary
from solvers.deep.preferences import FragmentCollector
from solvers.deep.replay import ReplayBuffer
from solvers.deep.sac import SACLearner
from solvers.deep.sobirl_sac import CHECKPOINT, find_checkpoint, saved_run

SMALL = """brl 1
problem small "a tiny deep problem"
seed 2
mdp env = gym("{env}"{gym})
var r = reward_net(env, hidden = [8], lr = 1e-3, batch = 8)
lower env {{ temperature = auto   reward[s, a] = r[s, a] }}
upper minimize preference_loss(env, policy, truth = env.reward, fragment = {fragment},
                               initial_pairs = {initial}, pairs = 2, queue = 50,
                               warmup_epochs = 1)
solve {solver}(outer = 2, sac_steps = 40, learning_starts = 20, sac_batch = 8, sac_width = 8,
               eval_every = 0, checkpoint_every = 1{extra})
"""


def _source(env: str = "Pendulum-v1", solver: str = "sobirl_sac", fragment: int = 10,
            initial: int = 4, gym: str = "", name: str = "small") -> str:
    extra = ", implicit_warmup = 0" if solver == "sobirl_sac" else ""
    text = SMALL.format(env=env, gym=gym, fragment=fragment, initial=initial, solver=solver,
                        extra=extra)
    return text.replace("problem small", f"problem {name}")


def _run(text: str, out: Path | None = None, resume: Path | None = None, solver=None,
         seed: int | None = None, **options):
    problem = lower(compile_source(text, "t.brl"), device="cpu")
    if seed is not None:
        problem = dataclasses.replace(problem, seed=seed)
    spec, typed = resolve(problem, solver, options)
    return problem, spec.run(problem, typed, Monitor(), out=out, resume=resume)


@pytest.mark.parametrize("env, solver", [("Pendulum-v1", "drlhf_sac"),
                                         ("CartPole-v1", "drlhf_sac"),
                                         ("Pendulum-v1", "sac_true")])
def test_the_baselines_run_end_to_end(env, solver):
    problem, result = _run(_source(env, solver))
    assert result.iterations == 2 and result.stopped_because == "max_iterations"
    assert result.extra["env_steps"] == 80
    summary = deep_summary(problem, result, {"solver": solver})
    assert "nan" not in summary
    if solver == "sac_true":
        assert result.extra["queries"] == 0 and "preference loss" not in summary
    else:
        assert result.extra["queries"] == 4 + 2 * 2 and math.isfinite(result.objective)


def test_a_fragment_longer_than_the_episodes_is_refused_by_check():
    text = _source(gym=", max_episode_steps = 8")
    with pytest.raises(BrlError) as info:
        compile_source(text, "t.brl")
    diag = info.value.diagnostics[0]
    assert diag.code == "E305" and "at most 8 steps" in diag.message
    line = text.split("\n")[diag.span.line - 1]
    assert line[diag.span.column - 1:].startswith("10,")


def test_a_fragment_longer_than_the_episodes_is_refused_before_the_run():
    problem = lower(compile_source(_source(), "t.brl"), device="cpu")
    problem = dataclasses.replace(problem, env=EnvSpec("Pendulum-v1", max_episode_steps=5))
    spec, typed = resolve(problem, None, {})
    start = time.perf_counter()
    with pytest.raises(SolverError, match="at most 5 steps"):
        spec.run(problem, typed, Monitor())
    assert time.perf_counter() - start < 5


def test_a_query_gives_up_when_no_episode_lasts_a_fragment(monkeypatch):
    monkeypatch.setattr(preferences, "PATIENCE", 10)
    collector = FragmentCollector(make_vector_env(EnvSpec("CartPole-v1"), 1, 0), 50,
                                  torch.device("cpu"))
    always_left = lambda obs: torch.zeros(obs.shape[0], dtype=torch.long)  # noqa: E731
    with pytest.raises(SolverError, match="lower `fragment`"):
        collector.collect(2, always_left)
    assert collector.steps == 10 * 2 * 50


def test_a_run_whose_query_gives_up_keeps_its_work(tmp_path, monkeypatch, capsys):
    """The follower's episodes too short for its fragments: the run stops at its last whole
    iteration with `no_fragments`, keeps the folder and the checkpoint, and exits 1."""
    from bilevel_dsl.cli import main

    monkeypatch.setattr(preferences, "PATIENCE", 1)
    path = tmp_path / "cart.brl"
    path.write_text(_source("CartPole-v1", fragment=200, initial=0))
    out = tmp_path / "run"
    assert main(["solve", str(path), "--quiet", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "stopped because      no_fragments" in captured.out
    assert "error: the query found" in captured.err and "lower `fragment`" in captured.err
    record = json.loads((out / "result.json").read_text())
    assert record["stopped_because"] == "no_fragments"
    assert json.loads((out / CHECKPOINT / "progress.json").read_text())["iteration"] == 0


def test_time_limit_stops_a_long_query_and_keeps_the_work(tmp_path):
    # CartPole episodes of an untrained policy rarely last 200 steps: the query runs long
    text = _source("CartPole-v1", fragment=200, initial=0)
    start = time.perf_counter()
    _, result = _run(text, out=tmp_path, time_limit=1.5, checkpoint_every=10)
    assert time.perf_counter() - start < 8
    assert result.stopped_because == "time_limit" and result.iterations == 0
    assert result.extra["env_steps"] == 0  # the interrupted block is not counted
    progress = json.loads((tmp_path / CHECKPOINT / "progress.json").read_text())
    assert progress["iteration"] == 0


def test_an_interrupted_run_saves_its_last_whole_iteration(tmp_path, monkeypatch):
    text = _source()
    calls = []
    train = SACLearner.train

    def train_then_interrupt(self, steps, reward_fn=None):
        calls.append(steps)
        out = train(self, steps, reward_fn)
        if len(calls) == 3:  # Ctrl-C after the third SAC block, before its queries
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(SACLearner, "train", train_then_interrupt)
    _, result = _run(text, out=tmp_path, outer=4, checkpoint_every=10)
    monkeypatch.undo()
    assert result.stopped_because == "interrupted" and result.iterations == 2
    assert result.extra["env_steps"] == result.history["env_steps"][-1] == 80
    assert result.extra["queries"] == result.history["queries"][-1] == 8
    checkpoint = tmp_path / CHECKPOINT
    progress = json.loads((checkpoint / "progress.json").read_text())
    assert progress["iteration"] == 2 and progress["history"]["env_steps"] == [40, 80]
    assert len(np.load(checkpoint / "learner" / "replay" / "obs.npy")) == 80
    _, two = _run(text, outer=2)  # what the interrupted run returned to, computed plainly
    assert torch.equal(result.x, two.x)
    _, resumed = _run(text, resume=checkpoint, outer=4, checkpoint_every=10)
    assert resumed.iterations == 4 and resumed.history["env_steps"] == [40, 80, 120, 160]


def test_a_ctrl_c_while_the_state_is_copied_keeps_it_consistent(tmp_path, monkeypatch):
    """A Ctrl-C held while the end-of-iteration copy is taken: the run stops at that whole
    iteration, and the checkpoint's replay buffer matches its history."""
    from solvers.deep import sobirl_sac

    take, calls = sobirl_sac._Snapshot.take.__func__, []

    def take_then_ctrl_c(cls, *args):
        calls.append(1)
        if len(calls) == 3:  # the copy at the end of iteration 2 (the first is before the loop)
            os.kill(os.getpid(), signal.SIGINT)  # held until the copy is done
        return take(cls, *args)

    monkeypatch.setattr(sobirl_sac._Snapshot, "take", classmethod(take_then_ctrl_c))
    _, result = _run(_source(), out=tmp_path, outer=4, checkpoint_every=10)
    assert result.stopped_because == "interrupted" and result.iterations == 2
    progress = json.loads((tmp_path / CHECKPOINT / "progress.json").read_text())
    counters = json.loads((tmp_path / CHECKPOINT / "learner/replay/counters.json").read_text())
    assert progress["history"]["env_steps"] == [40, 80] and counters["size"] == 80


def test_a_second_ctrl_c_while_returning_to_the_last_iteration_still_saves(tmp_path,
                                                                           monkeypatch):
    from solvers.deep import sobirl_sac

    restore = sobirl_sac._Snapshot.restore

    def restore_with_ctrl_c(self, *args):
        os.kill(os.getpid(), signal.SIGINT)  # pressed again: held until the restore is done
        return restore(self, *args)

    train, calls = SACLearner.train, []

    def train_then_interrupt(self, steps, reward_fn=None):
        calls.append(steps)
        out = train(self, steps, reward_fn)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(sobirl_sac._Snapshot, "restore", restore_with_ctrl_c)
    monkeypatch.setattr(SACLearner, "train", train_then_interrupt)
    _, result = _run(_source(), out=tmp_path, outer=4, checkpoint_every=10)
    assert result.stopped_because == "interrupted" and result.iterations == 2
    assert json.loads((tmp_path / CHECKPOINT / "progress.json").read_text())["iteration"] == 2


def test_leftovers_of_a_killed_save_do_not_stop_the_next(tmp_path):
    """A kill between a save's two renames leaves `checkpoint.old` (and no `checkpoint/`), one
    during its writes a `checkpoint.tmp`: --resume finds the old checkpoint, the next save
    clears both."""
    text = _source()
    _run(text, out=tmp_path, outer=1)
    (tmp_path / CHECKPOINT).rename(tmp_path / (CHECKPOINT + ".old"))
    (tmp_path / (CHECKPOINT + ".tmp")).write_text("half")
    found = find_checkpoint(tmp_path)
    assert found == tmp_path / (CHECKPOINT + ".old")
    _, result = _run(text, out=tmp_path, resume=found, outer=2)
    assert result.iterations == 2 and result.stopped_because == "max_iterations"
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT]


def test_a_time_limit_is_not_carried_over_on_resume(tmp_path, capsys):
    from bilevel_dsl.cli import main

    path = tmp_path / "small.brl"
    path.write_text(_source().replace("outer = 2", "outer = 1000"))
    out = tmp_path / "run"
    assert main(["solve", str(path), "--quiet", "--out", str(out), "--set",
                 "time_limit=2"]) == 0
    first = json.loads((out / "result.json").read_text())["iterations"]
    assert main(["solve", str(path), "--quiet", "--resume", str(out), "--set",
                 f"outer={first + 1}"]) == 0
    assert json.loads((out / "result.json").read_text())["iterations"] == first + 1


def test_a_finished_run_can_be_extended_and_counts_query_steps_on(tmp_path):
    text = _source()
    _, whole = _run(text, outer=3)
    _, first = _run(text, out=tmp_path, outer=2, checkpoint_every=10)  # the final checkpoint
    assert (tmp_path / CHECKPOINT / "progress.json").is_file()
    _, rest = _run(text, resume=tmp_path / CHECKPOINT, outer=3, checkpoint_every=10)
    assert rest.iterations == 3
    assert rest.history["query_steps"] == whole.history["query_steps"]
    assert rest.history["query_steps"][:2] == first.history["query_steps"]


def test_progress_json_is_strict_json_and_reads_back(tmp_path):
    text = _source("Pendulum-v1", "sac_true")
    _run(text, out=tmp_path)

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    progress = json.loads((tmp_path / CHECKPOINT / "progress.json").read_text(),
                          parse_constant=refuse)
    assert progress["history"]["objective"] == [None, None]
    assert progress["run"] == saved_run(tmp_path / CHECKPOINT)
    _, resumed = _run(text, resume=tmp_path / CHECKPOINT, outer=3)
    assert resumed.iterations == 3 and all(math.isnan(v) for v in resumed.history["objective"])


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A run's folder with a checkpoint after 2 iterations (and the text it was run from)."""
    folder = tmp_path_factory.mktemp("saved")
    _run(_source(), out=folder)
    return folder / CHECKPOINT


def _damage_progress(change):
    def damage(checkpoint: Path) -> None:
        path = checkpoint / "progress.json"
        progress = json.loads(path.read_text())
        change(progress)
        path.write_text(json.dumps(progress))
    return damage


def _truncate(name: str):
    def damage(checkpoint: Path) -> None:
        data = (checkpoint / name).read_bytes()
        (checkpoint / name).write_bytes(data[: len(data) // 2])
    return damage


DAMAGE = {
    "empty state.pt": ("state.pt", lambda c: (c / "state.pt").write_bytes(b"")),
    "truncated state.pt": ("state.pt", _truncate("state.pt")),
    "no learner.pt": ("learner/learner.pt", lambda c: (c / "learner" / "learner.pt").unlink()),
    "no obs.npy": ("obs.npy", lambda c: (c / "learner" / "replay" / "obs.npy").unlink()),
    "truncated obs.npy": ("obs.npy", _truncate("learner/replay/obs.npy")),
    "garbled counters": ("counters.json",
                         lambda c: (c / "learner" / "replay" / "counters.json").write_text("{")),
    "garbled progress": ("progress.json", lambda c: (c / "progress.json").write_text("{x")),
    "iteration -5": ("iteration", _damage_progress(lambda p: p.update(iteration=-5))),
    "iteration x": ("iteration", _damage_progress(lambda p: p.update(iteration="x"))),
    "iteration 99": ("iteration 99", _damage_progress(lambda p: p.update(iteration=99))),
    "no history": ("history", _damage_progress(lambda p: p.pop("history"))),
    # one record cut short: it passed, and the run crashed when it drew its curves
    "short record": ("history", _damage_progress(
        lambda p: p["history"].update(objective=p["history"]["objective"][:1]))),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_checkpoint_is_named_as_such(saved, tmp_path, case):
    named, damage = DAMAGE[case]
    checkpoint = tmp_path / CHECKPOINT
    shutil.copytree(saved, checkpoint)
    damage(checkpoint)
    with pytest.raises(SolverError) as info:
        _run(_source(), resume=checkpoint, outer=100)
    message = str(info.value)
    assert "damaged or incomplete" in message and named in message, message
    assert "does not fit" not in message


@pytest.mark.parametrize("change, said", [
    ({"sac_width": 16}, "sac_width = 8; this run has sac_width = 16. Resume with --set "
                        "sac_width=8"),
    ({"seed": 5}, "seed 2; this run has seed 5. Resume with --seed 2"),
    ({"solver": "drlhf_sac"}, "solver sobirl_sac; this run has solver drlhf_sac"),
    ({"name": "other"}, "belongs to problem `small`; this file is problem `other`"),
    ({"gym": ", discount = 0.5"}, "follower discount = 0.99; this run has follower discount "
                                  "= 0.5"),
    ({"temperature": "0.2"}, 'follower temperature = "auto"; this run has follower '
                             "temperature = 0.2"),
])
def test_resume_refuses_another_run(saved, change, said):
    text = _source(name=change.pop("name", "small"), gym=change.pop("gym", ""))
    text = text.replace("temperature = auto", f"temperature = {change.pop('temperature', 'auto')}")
    with pytest.raises(SolverError, match="was saved with|belongs to") as info:
        _run(text, resume=saved, **change)
    assert said in str(info.value)


def test_an_older_checkpoint_of_other_fragments_is_refused_on_loading(saved, tmp_path):
    checkpoint = tmp_path / CHECKPOINT
    shutil.copytree(saved, checkpoint)
    _damage_progress(lambda p: p.pop("run"))(checkpoint)  # as written before the record
    assert saved_run(checkpoint) is None
    with pytest.raises(SolverError, match="fragments of 10 steps, this run's of 5"):
        _run(_source(fragment=5), resume=checkpoint, outer=3)


def test_saved_run_records_the_run(saved, tmp_path):
    run = saved_run(saved)
    assert run["problem"] == "small" and run["seed"] == 2 and run["solver"] == "sobirl_sac"
    assert run["options"]["sac_width"] == 8 and run["options"]["outer"] == 2
    assert saved_run(tmp_path) is None
    (tmp_path / "progress.json").write_text("[1, 2")
    assert saved_run(tmp_path) is None


def test_environments_the_solvers_cannot_take_are_refused():
    with pytest.raises(BrlError) as info:
        compile_source(_source("FrozenLake-v1"), "t.brl")
    diag = info.value.diagnostics[0]
    assert diag.code == "E406" and "Discrete(16)" in diag.message
    assert "Box observations" in diag.hint
    for env_id in ("Hopper-v3", "phys2d/Pendulum-v0"):  # moved to another package; needs jax
        with pytest.raises(BrlError) as info:
            compile_source(_source(env_id), "t.brl")
        assert info.value.diagnostics[0].code == "E406"
        assert "gymnasium cannot make it" in info.value.diagnostics[0].message
    problem = lower(compile_source(_source(), "t.brl"), device="cpu")
    problem = dataclasses.replace(problem, env=EnvSpec("Blackjack-v1"))
    spec, typed = resolve(problem, None, {})
    with pytest.raises(SolverError, match="Tuple"):
        spec.run(problem, typed, Monitor())


def test_replay_rollback_undoes_the_adds_after_the_mark():
    buffer = ReplayBuffer(5, (2,), torch.float32, (), torch.int64)

    def add(i: int, new_episode: bool = False) -> None:
        obs = torch.full((1, 2), float(i))
        buffer.add(obs, torch.tensor([i]), torch.tensor([float(i)]),
                   obs + (0.5 if new_episode else 1.0), torch.tensor([new_episode]))

    for i in range(6):
        add(i, new_episode=i == 2)
    before = buffer.next_obs.clone(), buffer.obs.clone(), buffer.pos, buffer.size
    buffer.mark()
    for i in range(6, 13):  # more than the capacity: every row is overwritten
        add(i)
    buffer.rollback()
    assert torch.equal(buffer.next_obs, before[0]) and torch.equal(buffer.obs, before[1])
    assert (buffer.pos, buffer.size) == before[2:]


def test_the_command_line_resumes_with_the_saved_options_and_defines(tmp_path, capsys):
    """`brl solve F --resume DIR` needs only the file: the solver, seed, options and -D values
    of the first command come from the checkpoint; another -D is refused, naming it."""
    from bilevel_dsl.cli import main

    path = tmp_path / "small.brl"
    path.write_text(_source().replace("pairs = 2,", "pairs = more,")
                    .replace("seed 2\n", "seed 2\nparam more = 2\n"))
    out = tmp_path / "run"
    assert main(["solve", str(path), "--quiet", "--out", str(out), "--solver", "drlhf_sac",
                 "--set", "outer=1", "--set", "sac_width=8", "--set", "sac_steps=40",
                 "--set", "learning_starts=20", "--set", "sac_batch=8", "--set", "eval_every=0",
                 "--seed", "5", "-D", "more=3"]) == 0
    assert main(["solve", str(path), "--quiet", "--resume", str(out), "--set", "outer=2"]) == 0
    record = json.loads((out / "result.json").read_text())
    assert record["solver"]["name"] == "drlhf_sac" and record["seed"] == 5
    assert record["solver"]["options"]["sac_width"] == 8 and record["iterations"] == 2
    assert record["history"]["queries"][-1] == 4 + 3 + 3  # -D more=3 held on resume
    assert record["resumed_at"] == [1] and record["defines"] == {"more": "3"}
    assert re.search(r"iterations +2 \(resumed at iteration 1\)", capsys.readouterr().out)
    assert main(["solve", str(path), "--quiet", "--resume", str(out), "--set", "outer=3"]) == 0
    assert json.loads((out / "result.json").read_text())["resumed_at"] == [1, 2]
    capsys.readouterr()
    assert main(["solve", str(path), "--quiet", "--resume", str(out), "--set", "outer=4",
                 "--set", "sac_width=16"]) == 1
    assert "--set sac_width=8" in capsys.readouterr().err
    assert main(["solve", str(path), "--quiet", "--resume", str(out), "--set", "outer=4",
                 "-D", "more=4"]) == 1
    assert "-D more=3" in capsys.readouterr().err


def test_resuming_another_problems_folder_names_the_problem(tmp_path, capsys):
    """The checkpoint's -D values are not applied to another problem's file: the refusal is
    about the problem, not about a -D the user never typed; and a file whose `solve` options
    differ from the checkpoint's gets a note saying which is used."""
    from bilevel_dsl.cli import main

    path = tmp_path / "small.brl"
    path.write_text(_source().replace("pairs = 2,", "pairs = more,")
                    .replace("seed 2\n", "seed 2\nparam more = 2\n"))
    out = tmp_path / "run"
    assert main(["solve", str(path), "--quiet", "--out", str(out), "-D", "more=3",
                 "--set", "outer=1"]) == 0
    other = tmp_path / "other.brl"
    other.write_text(_source(name="other"))
    capsys.readouterr()
    assert main(["solve", str(other), "--quiet", "--resume", str(out)]) == 1
    err = capsys.readouterr().err
    assert "belongs to problem `small`" in err and "-D more" not in err
    assert main(["solve", str(path), "--quiet", "--resume", str(out)]) == 0
    assert ("note: resuming with the saved run's outer = 1; the file says 2 (--set outer=2 "
            "to use it)") in capsys.readouterr().err


def test_resuming_with_another_network_environment_or_a_garbled_option_says_so(tmp_path,
                                                                              capsys):
    """A file edited since the checkpoint: a note says so; another reward network or
    environment is refused naming the difference (it failed deep inside torch's loading); a
    saved option that is no longer valid is called damaged, not blamed on the file."""
    from bilevel_dsl.cli import main

    path, out = tmp_path / "small.brl", tmp_path / "run"
    path.write_text(_source())
    assert main(["solve", str(path), "--quiet", "--out", str(out), "--set", "outer=1"]) == 0
    capsys.readouterr()
    path.write_text(_source().replace("hidden = [8]", "hidden = [16]"))
    assert main(["solve", str(path), "--quiet", "--resume", str(out), "--set", "outer=2"]) == 1
    err = capsys.readouterr().err
    assert f"note: {path} has changed since the run in {out} was saved" in err
    assert ("was saved with reward_net hidden = [8]; this run has reward_net hidden = [16]. "
            "Resume with the file's reward_net as it was (hidden = [8])") in err
    path.write_text(_source(env="MountainCarContinuous-v0"))
    assert main(["solve", str(path), "--quiet", "--resume", str(out), "--set", "outer=2"]) == 1
    assert 'environment env_id = "Pendulum-v1"; this run has environment env_id = ' \
        '"MountainCarContinuous-v0"' in capsys.readouterr().err
    path.write_text(_source())
    progress = out / "checkpoint" / "progress.json"
    saved = json.loads(progress.read_text())
    saved["run"]["options"]["sac_width"] = "eight"
    progress.write_text(json.dumps(saved))
    assert main(["solve", str(path), "--quiet", "--resume", str(out), "--set", "outer=2"]) == 1
    err = capsys.readouterr().err
    assert 'the saved run\'s option sac_width = "eight" is not valid' in err
    assert "damaged" in err and "has changed" not in err


def test_a_checkpoint_cut_short_ends_the_run_as_a_failure_and_leaves_no_half_folder(
        tmp_path, monkeypatch):
    """torch reports a short write (a full disk) as a RuntimeError, which escaped as an
    internal error and left `checkpoint.tmp` behind; the run now stops as it does when the
    folder cannot be written, keeping its record."""
    import solvers.deep.sobirl_sac as sobirl_sac

    real_save = torch.save
    calls = []

    def cut_short(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 2:  # the first checkpoints are written, then the disk is full
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(sobirl_sac.torch, "save", cut_short)
    _, result = _run(_source(), out=tmp_path, outer=4, checkpoint_every=1)
    assert result.stopped_because == "cannot_save", result.stopped_because
    assert "the write was cut short" in result.extra["failure"]
    assert not (tmp_path / (CHECKPOINT + ".tmp")).exists()
