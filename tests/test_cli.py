"""The `brl` command: help, exit codes, `solvers`, `compile`, and hostile input files.

No input may produce a Python traceback or an "internal error": every bad file is exit 1 with a
located `error[CODE]` line.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROBLEMS, ROOT

import bilevel_dsl as brl
from bilevel_dsl import from_json
from bilevel_dsl.cli import main

LOCATED = re.compile(r"^(?P<file>[^\n]+?):(?P<line>\d+):(?P<col>\d+): error\[E\d{3}\]: ", re.M)
UNLOCATED = re.compile(r"^(?P<file>[^\n]+?): error\[E00[23]\]: ", re.M)


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv("BRL_DEBUG", raising=False)


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------ help and listings


@pytest.mark.parametrize("command", [[], ["check"], ["compile"], ["solve"], ["solvers"],
                                     ["gradcheck"]])
def test_help_exits_zero(command: list[str], capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: brl")
    if command:
        assert f"brl {command[0]}" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("brl ")


def test_no_command_prints_help(capsys):
    code, out, _ = run([], capsys)
    assert code == 1 and "usage: brl" in out


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["chekc", "x.brl"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["solve", "gradcheck"])
@pytest.mark.parametrize("seed", ["-1", "99999999999999999999", "1.5"])
def test_a_seed_out_of_range_is_a_usage_error(command, seed, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "x.brl", "--seed", seed])
    assert info.value.code == 2
    assert "argument --seed" in capsys.readouterr().err


def test_solvers_table(capsys):
    code, out, err = run(["solvers"], capsys)
    assert code == 0 and not err
    assert "m_sobirl" in out and "exact" in out
    assert len(out.strip().split("\n")) >= 3  # a header and a row per solver
    code, out, _ = run(["solvers", "exact"], capsys)
    assert code == 0 and "exact" in out


def test_unknown_solver_name_in_solvers(capsys):
    code, _, err = run(["solvers", "m_sobrl"], capsys)
    assert code == 1 and "m_sobirl" in err and "internal error" not in err


# ------------------------------------------------------------------ check


def test_check_examples_exit_zero(capsys):
    code, out, err = run(["check", *map(str, PROBLEMS)], capsys)
    assert code == 0, err
    assert err == ""
    assert len(re.findall(r": ok \(", out)) == len(PROBLEMS)


def test_check_exit_one_and_keeps_going(tmp_path, capsys):
    good, bad = tmp_path / "good.brl", tmp_path / "bad.brl"
    good.write_text("brl 1\nparam a = 1\ncheck a == 1\n")
    bad.write_text("brl 1\nparam a = b\nparam c = d\n")
    code, out, err = run(["check", str(bad), str(good)], capsys)
    assert code == 1
    assert f"{good}: ok (2 statements, 1 check passed" in out
    assert len(LOCATED.findall(err)) == 2  # both errors of bad.brl, in one run
    assert "undefined name `b`" in err and "undefined name `d`" in err


def test_check_renders_like_the_golden_files(capsys):
    golden = ROOT / "tests" / "golden"
    source = golden / "undefined_name.brl"
    code, _, err = run(["check", str(source)], capsys)
    assert code == 1
    expected = (golden / "undefined_name.txt").read_text(encoding="utf-8")
    assert err == expected.replace("undefined_name.brl", str(source))


def test_check_with_overrides(tmp_path, capsys):
    path = tmp_path / "p.brl"
    path.write_text("brl 1\nparam lam = 0.05\nparam n = 3\ncheck lam < 1\n")
    assert run(["check", str(path), "-D", "lam=0.5", "-D", "n=4"], capsys)[0] == 0
    code, _, err = run(["check", str(path), "-D", "lam=2"], capsys)
    assert code == 1 and "error[E702]" in err
    code, _, err = run(["check", str(path), "-D", "n=2.5"], capsys)
    assert code == 1 and "error[E305]" in err and ":3:7:" in err
    code, _, err = run(["check", str(path), "-D", "lamb=1"], capsys)
    assert code == 1 and "did you mean `lam`?" in err
    code, _, err = run(["check", str(path), "-D", "lam"], capsys)
    assert code == 1 and "write -D name=value" in err
    code, _, err = run(["check", str(path), "-D", "1x=2"], capsys)
    assert code == 1 and "is not a name" in err
    code, _, err = run(["check", str(path), "-D", "lam="], capsys)
    assert code == 1 and "the value is empty" in err and "file" not in err


def test_define_sets_the_variables_start(tmp_path, capsys):
    path = tmp_path / "p.brl"
    path.write_text("brl 1\nmdp M = random_mdp(states = 3, actions = 2)\n"
                    "var x[M.S] = 0 in [-1, 1]\n"
                    "lower M { temperature = 1  reward[s, a] = x[s] }\nupper minimize norm2(x)\n")
    start = brl.lower(brl.compile_file(path, overrides={"x": "[0.5, 2, -0.5]"})).x0
    assert start.tolist() == [0.5, 1.0, -0.5]  # projected onto the bounds
    assert brl.lower(brl.compile_file(path, overrides={"x": "0.25"})).x0.tolist() == [0.25] * 3
    code, _, err = run(["check", str(path), "-D", "x=[1, 2]"], capsys)
    assert code == 1 and "-D x:" in err and ":3:5:" in err
    code, _, err = run(["check", str(path), "-D", "xx=1"], capsys)
    assert code == 1 and "no param or var `xx`" in err and "did you mean `x`?" in err


def test_check_validates_solver_options(tmp_path, capsys):
    path = tmp_path / "p.brl"
    path.write_text("brl 1\nmdp M = random_mdp(states = 3, actions = 2)\nvar x[M.S, M.A]\n"
                    "lower M { temperature = 1  reward[s, a] = x[s, a] }\n"
                    "upper minimize norm2(x)\nsolve m_sobirl(outr = 5)\n")
    code, _, err = run(["check", str(path)], capsys)
    assert code == 1 and "error[E802]" in err and "did you mean `outer`?" in err


def test_check_reports_solver_options_out_of_range(tmp_path, capsys):
    path = tmp_path / "p.brl"
    path.write_text("brl 1\nmdp M = random_mdp(states = 3, actions = 2)\nvar x[M.S, M.A]\n"
                    "lower M { temperature = 1  reward[s, a] = x[s, a] }\n"
                    "upper minimize norm2(x)\nsolve m_sobirl(outer = 0, beta = 0.1)\n")
    code, _, err = run(["check", str(path)], capsys)
    assert code == 1
    assert err.split("\n")[:4] == [
        f"{path}:6:24: error[E805]: option `outer` must be at least 1, got 0",
        "6 | solve m_sobirl(outer = 0, beta = 0.1)",
        "  |                        ^",
        "  = hint: `outer` takes an integer in [1, inf)",
    ]


SOLVABLE = ("brl 1\nmdp M = random_mdp(states = 3, actions = 2)\nvar x[M.S, M.A] = 0\n"
            "lower M { temperature = 1  reward[s, a] = x[s, a] }\n"
            "upper minimize norm2(x) - value(M, policy)\nsolve m_sobirl(outer = 2)\n")


@pytest.mark.parametrize(("setting", "message"), [
    ("outer=-5", "error: --set outer=-5: option `outer` must be at least 1, got -5"),
    ("zeta=0", "error: --set zeta=0: option `zeta` must be greater than 0, got 0"),
    ("outer=many", "error: --set outer=many: option `outer` expects an integer, got `many`"),
])
def test_solve_set_out_of_range_is_one_line(setting: str, message: str, tmp_path, capsys):
    path = tmp_path / "p.brl"
    path.write_text(SOLVABLE)
    out = tmp_path / "run"
    code, _, err = run(["solve", str(path), "--quiet", "--out", str(out), "--set", setting],
                       capsys)
    assert code == 1 and err == message + "\n"
    assert not out.exists()


def test_solve_set_at_the_end_of_a_range_runs(tmp_path, capsys):
    path = tmp_path / "p.brl"
    path.write_text(SOLVABLE)
    code, _, err = run(["solve", str(path), "--quiet", "--out", str(tmp_path / "run"),
                        "--set", "outer=1", "--set", "tol=0"], capsys)
    assert code == 0, err


def test_an_unwritable_out_fails_before_the_solve(tmp_path, capsys):
    """A bad --out must be reported at once, not after the run (whose results it would lose)."""
    path = tmp_path / "p.brl"
    path.write_text(SOLVABLE)
    taken = tmp_path / "a_file"
    taken.write_text("hi")
    code, out, err = run(["solve", str(path), "--quiet", "--out", str(taken),
                          "--set", "outer=100000"], capsys)
    assert code == 1 and out == ""
    assert err.startswith(f"error: --out {taken}: that is a file, not a folder")


@pytest.mark.parametrize("solver", ["exact", "m_sobirl"])
def test_a_run_that_turns_nan_stops_at_the_last_finite_point(solver, tmp_path, capsys):
    """log(x) at the bound x = 0 makes the reward -inf after one step: the run must stop there,
    keep the finite iterate, say why and exit 1, not go on with NaN."""
    path = tmp_path / "nan.brl"
    path.write_text("brl 1\nmdp M = random_mdp(states = 4, actions = 2, discount = 0.9)\n"
                    "var x[M.S, M.A] = 0.5 in [0, 1]\n"
                    "lower M { temperature = 0.5  reward[s, a] = log(x[s, a]) }\n"
                    "upper minimize 10 * norm2(x) - value(M, policy, M.R + 1)\n")
    code, _, err = run(["solve", str(path), "--quiet", "--solver", solver, "--out",
                        str(tmp_path / "run"), "--set", "beta=1", "--set", "outer=50"], capsys)
    assert code == 1 and "NaN or infinite" in err
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["stopped_because"] == "not_finite"
    assert record["x"] == [[0.5, 0.5]] * 4 and record["objective"] == pytest.approx(10.0)
    assert "the last finite iterate's" in err
    # NaN at x0 itself (inf * 0): no iterate was finite, and the message does not claim one
    path.write_text("brl 1\nmdp M = random_mdp(states = 4, actions = 2, discount = 0.9)\n"
                    "param lam = 1.0\nvar x[M.S, M.A] = 0 in [0, 1]\n"
                    "lower M { temperature = 0.5  reward[s, a] = x[s, a] }\n"
                    "upper minimize lam * norm2(x) - value(M, policy)\n")
    code, _, err = run(["solve", str(path), "--quiet", "--solver", solver, "--out",
                        str(tmp_path / "at_x0"), "-D", "lam=inf"], capsys)
    assert code == 1 and "at the initial x already: no iterate was finite" in err
    assert "last finite iterate" not in err


def test_a_library_warning_is_one_line_without_a_source_path(tmp_path, capsys, monkeypatch):
    """The kernel's warnings (GMRES stopping short, say) reach the terminal as the command
    line's own `warning:` lines, not as Python's `/path/softmdp.py:123: UserWarning`."""
    import warnings

    from bilevel_dsl import softmdp

    solve_system = softmdp._solve

    def short(*args, **kwargs):
        warnings.warn("GMRES stopped after 3 iterations", stacklevel=2)
        return solve_system(*args, **kwargs)

    monkeypatch.setattr(softmdp, "_solve", short)
    path = tmp_path / "value.brl"
    path.write_text("brl 1\nmdp M = random_mdp(states = 4, actions = 2, discount = 0.9)\n"
                    "var x[M.S, M.A] = 0.5\nlower M { temperature = 0.5  reward[s, a] = x[s, a] }\n"
                    "upper minimize norm2(x) - value(M, policy, M.R)\n")
    shown = warnings.showwarning
    code, _, err = run(["solve", str(path), "--quiet", "--out", str(tmp_path / "run"),
                        "--set", "outer=2"], capsys)
    assert code == 0 and warnings.showwarning is shown
    assert "warning: GMRES stopped after 3 iterations\n" in err
    assert "UserWarning" not in err and "softmdp.py" not in err


def test_a_closed_pipe_is_not_an_internal_error():
    """`brl solvers | head -1`: the reader leaves early; no 'internal error' message."""
    child = subprocess.Popen([sys.executable, "-m", "bilevel_dsl.cli", "solvers"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()
    assert child.wait(timeout=60) == 1
    assert child.stderr.read() == b""


# ------------------------------------------------------------------ compile and solve


def test_compile_prints_json(capsys):
    code, out, _ = run(["compile", str(PROBLEMS[0])], capsys)
    assert code == 0
    assert json.loads(out)["node"] == "Program"
    assert from_json(out).statements


def test_solve_refuses_a_broken_or_incomplete_file(tmp_path, capsys):
    broken = tmp_path / "broken.brl"
    broken.write_text("brl 1\nparam a = b\n")
    code, _, err = run(["solve", str(broken), "--out", str(tmp_path / "run")], capsys)
    assert code == 1 and "error[E201]" in err
    incomplete = tmp_path / "incomplete.brl"
    incomplete.write_text("brl 1\nmdp M = random_mdp(states = 3, actions = 2)\n")
    code, _, err = run(["solve", str(incomplete), "--out", str(tmp_path / "run")], capsys)
    assert code == 1 and "error[E503]" in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ gradcheck

# A near-deterministic follower (rewards of 0.01 against a temperature of 1e-3): phi curves on
# the scale of tau, where a plain central difference with step 1e-5 is off by 2e-5.
LOW_TEMPERATURE = """brl 1
seed 10
mdp M = random_mdp(states = 4, actions = 2, discount = 0.99)
param pay[M.S, M.A] ~ uniform(0, 1)
var x[M.S, M.A] = 0 in [-0.01, 0.01]
lower M { temperature = 1e-3  reward[s, a] = pay[s, a] * 0.01 + x[s, a] }
upper maximize value(M, policy, pay) - norm2(x)
"""


def test_gradcheck_passes_at_low_temperature(tmp_path, capsys):
    path = tmp_path / "cold.brl"
    path.write_text(LOW_TEMPERATURE, encoding="utf-8")
    code, out, err = run(["gradcheck", str(path)], capsys)
    assert code == 0, out
    errors = [float(line.split()[-4]) for line in out.splitlines()[1:4]]
    assert max(errors) <= 1e-6 and out.splitlines()[4].startswith("ok: ")
    # where it is, on stderr (one line per point in a log): big problems take minutes
    assert [line.split(":")[0] for line in err.splitlines()] == [
        "gradcheck x0", "gradcheck random 1", "gradcheck random 2"]


def test_gradcheck_fails_with_a_coarse_step_and_says_why(tmp_path, capsys):
    path = tmp_path / "cold.brl"
    path.write_text(LOW_TEMPERATURE, encoding="utf-8")
    code, out, _ = run(["gradcheck", str(path), "--eps", "0.01", "--points", "0"], capsys)
    assert code == 1
    # tau 1e-3 against a step of 1e-2: phi bends within the step (halving ratio 0.38)
    assert "FAILED at 1 point" in out and "improved about 2x" in out
    assert "--eps 0.001" in out and "temperature much smaller than the step" in out


def test_gradcheck_tells_rounding_noise_and_kinks_apart(tmp_path, capsys):
    """The advice follows how the finite differences moved when their step was halved: worse
    (rounding in phi: a larger step), not at all (a wrong gradient or a kink)."""
    path = tmp_path / "offset.brl"
    # a common reward offset of 1e6 at tau 0.01: r / tau ~ 1e8, so phi carries noise of ~1e-8
    path.write_text("brl 1\nseed 3\nmdp M = random_mdp(states = 4, actions = 3)\n"
                    "param R[M.S, M.A] ~ uniform(0, 1)\nvar x[M.S, M.A] = 0\n"
                    "lower M { temperature = 0.01  reward[s, a] = 1e6 + x[s, a] }\n"
                    "upper minimize 0.5 * norm2(x) - value(M, policy, R)\n", encoding="utf-8")
    code, out, _ = run(["gradcheck", str(path), "--points", "0"], capsys)
    assert code == 1 and "got worse when their step was halved" in out
    assert "--eps 0.001" in out
    assert run(["gradcheck", str(path), "--points", "0", "--eps", "1e-3"], capsys)[0] == 0
    # |x| written as max(max(x, 0), -x): at the three-way tie x = 0 autograd splits the
    # gradient between branches (-1/4), the central differences see the average slope, 0
    kink = tmp_path / "kink.brl"
    kink.write_text("brl 1\nmdp M = random_mdp(states = 2, actions = 2)\nvar x[M.S, M.A] = 0\n"
                    "lower M { temperature = 1  reward[s, a] = x[s, a] }\n"
                    "upper minimize max(max(x[0, 0], 0), -x[0, 0]) + 0.1 * norm2(policy)\n",
                    encoding="utf-8")
    code, out, _ = run(["gradcheck", str(kink), "--points", "0"], capsys)
    assert code == 1 and "did not move" in out and "kink" in out


def test_gradcheck_at_a_stationary_point_says_it_passed_on_the_absolute_error(tmp_path,
                                                                               capsys):
    path = tmp_path / "flat.brl"
    # at x = 0 the follower is uniform, where its entropy is largest: grad phi is 0 up to
    # rounding, and the finite differences are rounding noise of 1e-11
    path.write_text("brl 1\nmdp M = random_mdp(states = 4, actions = 3)\n"
                    "var x[M.S, M.A] = 0\nlower M { temperature = 0.5  reward[s, a] = x[s, a] }\n"
                    "upper minimize mean {s in M.S} entropy(policy)[s] + 0.05 * norm2(x)\n",
                    encoding="utf-8")
    code, out, _ = run(["gradcheck", str(path), "--points", "0"], capsys)
    assert code == 0
    assert "ok: abs. error below --atol" in out and "passed on the absolute error" in out


@pytest.mark.parametrize("flag, value, message", [
    ("--tol", "-1", "must be above 0"), ("--eps", "0", "must be above 0"),
    ("--points", "-1", "must be at least 0"), ("--atol", "nan", "expected a finite number"),
    ("--eps", "inf", "expected a finite number"),
])
def test_gradcheck_refuses_meaningless_settings(flag, value, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(["gradcheck", str(ROOT / "problems" / "synthetic.brl"), flag, value])
    assert info.value.code == 2 and message in capsys.readouterr().err


# ------------------------------------------------------------------ hostile inputs


def hostile_inputs() -> dict[str, bytes]:
    rng = random.Random(1234)
    huge_line = b"brl 1\nparam x = " + b"a" * (10 << 20)
    return {
        "empty": b"",
        "only_comments": b"# one\n   # two\n\n",
        "only_whitespace": b" \n\t\n\r\n",
        "random_bytes": bytes(rng.randrange(256) for _ in range(4096)),
        "random_ascii": bytes(rng.randrange(32, 127) for _ in range(4096)),
        "nul_bytes": b"\x00" * 64,
        "nul_in_code": b"brl 1\nparam a = 1\x00 + 2\n",
        "invalid_utf8": b"brl 1\nparam a = 1 # \xc3\x28 \xff\n",
        "utf16": "brl 1\nparam a = 1\n".encode("utf-16"),
        "ten_megabyte_line": huge_line,
        "ten_megabyte_spaces": b"brl 1\nparam x = 1" + b" " * (10 << 20) + b"$",
        "nested_parentheses": b"brl 1\nparam x = " + b"(" * 10_000 + b"1" + b")" * 10_000,
        "unbalanced_parentheses": b"brl 1\nparam x = " + b"(" * 10_000 + b"1",
        "long_sum_chain": b"brl 1\nparam x = " + b"+".join([b"1"] * 10_000),
        "long_product_chain": b"brl 1\nparam x = 2" + b" * 2" * 10_000,
        "power_tower": b"brl 1\nparam x = 2" + b"^2" * 10_000,
        "minus_chain": b"brl 1\nparam x = " + b"-" * 10_000 + b"1",
        "not_chain": b"brl 1\ncheck " + b"not " * 10_000 + b"0",
        "nested_brackets": b"brl 1\nparam x = " + b"[" * 10_000 + b"1" + b"]" * 10_000,
        "nested_calls": b"brl 1\nparam x = " + b"abs(" * 10_000 + b"1" + b")" * 10_000,
        "nested_sums": b"brl 1\nparam x = " + b"sum {i in 0..1} " * 5_000 + b"1",
        "nested_if": b"brl 1\nparam x = " + b"if 1 then " * 5_000 + b"1" + b" else 0" * 5_000,
        "attribute_chain": b"brl 1\nparam x = M" + b".S" * 10_000,
        "index_chain": b"brl 1\nparam v[2] = 0\nparam x = v" + b"[0]" * 10_000,
        "float_overflow": b"brl 1\nparam x = 1e999",
        "huge_integer": b"brl 1\nparam x = " + b"9" * 5000,
        "huge_seed": b"brl 1\nseed " + b"9" * 5000,
        "huge_version": b"brl " + b"9" * 5000,
        "huge_dimension": b"brl 1\nparam x[100000, 100000, 100000] = 0",
        "huge_range": b"brl 1\nset S = 0..99999999999999999999",
        "overflow_to_inf": b"brl 1\nparam x = 1e300 * 1e300",
        "unterminated_string": b'brl 1\nproblem p "never closed\nparam a = 1\n',
        "unterminated_triple": b'brl 1\nmdp m = gridworld(map = """\nS.G\n',
        "unicode_identifier": "brl 1\nparam café = 1\n".encode(),
        "unicode_operator": "brl 1\nparam a = 1 ≤ 2\n".encode(),
        "emoji": "brl 1\nparam a = 1 # 🚀\nparam b = 🚀\n".encode(),
        "bom_then_error": "\ufeffbrl 1\nparam a = b\n".encode(),
        "lone_cr": b"brl 1\rparam a = b\r",
        "missing_header": b"param a = 1\n",
        "header_only_word": b"brl\n",
        "wrong_version": b"brl 2\n",
        "python_code": b"import os\nos.system('echo hi')\n",
        "json": b'{"node": "Program", "ir_version": 1}',
        "many_statements": b"brl 1\n" + b"".join(b"param p%d = %d\n" % (i, i)
                                                 for i in range(5000)) + b"param q = p\n",
        "gigantic_map": b'brl 1\nmdp m = gridworld(map = "' + b"S" + b"." * 5000 + b'G#")\n'
                        + b"param x = undefined\n",
    }


HOSTILE = hostile_inputs()


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_input_is_a_located_error(name: str, tmp_path, capsys):
    path = tmp_path / f"{name}.brl"
    path.write_bytes(HOSTILE[name])
    code, out, err = run(["check", str(path)], capsys)
    assert code == 1, err
    assert "Traceback" not in err and "internal error" not in err
    found = LOCATED.findall(err)
    assert found, err[:2000]
    assert LOCATED.match(err) and LOCATED.match(err)["file"] == str(path)
    # a diagnostic shows a window of a huge line, not the line
    assert len(err) < 20_000


def test_ten_megabyte_name_is_shortened_in_the_message(tmp_path, capsys):
    path = tmp_path / "big.brl"
    path.write_bytes(HOSTILE["ten_megabyte_line"])
    code, _, err = run(["check", str(path)], capsys)
    assert code == 1 and "error[E201]: undefined name `aaaa" in err
    assert max(len(line) for line in err.split("\n")) < 400


@pytest.mark.parametrize("kind", ["directory", "missing"])
def test_unreadable_paths(kind: str, tmp_path, capsys):
    path = tmp_path / "thing.brl"
    if kind == "directory":
        path.mkdir()
    code, _, err = run(["check", str(path)], capsys)
    assert code == 1
    assert UNLOCATED.match(err) and UNLOCATED.match(err)["file"] == str(path)
    assert "error[E002]" in err and "Traceback" not in err


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_a_device_is_read_only_up_to_the_size_limit(tmp_path, capsys):
    """A device reports size 0 and never ends: read without a bound, /dev/zero took 23 GB."""
    path = tmp_path / "zero.brl"
    path.symlink_to("/dev/zero")
    code, _, err = run(["check", str(path)], capsys)
    assert code == 1 and "error[E003]" in err and "larger than 64 MiB" in err


def test_valid_oddities_pass(tmp_path, capsys):
    for name, data in {
        "bom": "\ufeffbrl 1\nparam a = 1\n".encode(),
        "crlf": b"brl 1\r\nparam a = 1\r\ncheck a == 1\r\n",
        "header_only": b"brl 1",
        "tabs": b"brl 1\n\tparam\ta\t=\t1\n",
        "comment_after_header": b"brl 1 # version one\n",
    }.items():
        path = tmp_path / f"{name}.brl"
        path.write_bytes(data)
        code, _, err = run(["check", str(path)], capsys)
        assert code == 0, (name, err)


def test_hostile_inputs_in_a_real_process(tmp_path):
    """The installed `brl` command, in a fresh process, on every hostile file at once."""
    paths = []
    for name, data in HOSTILE.items():
        if name.startswith("ten_megabyte"):
            continue  # covered in-process; keeps this test fast
        path = tmp_path / f"{name}.brl"
        path.write_bytes(data)
        paths.append(str(path))
    paths += [str(tmp_path), str(tmp_path / "missing.brl")]
    good = tmp_path / "good.brl"
    good.write_text("brl 1\nparam a = 1\n")
    env = {k: v for k, v in os.environ.items() if k != "BRL_DEBUG"}
    brl = Path(sys.executable).with_name("brl")
    command = [str(brl)] if brl.exists() else [sys.executable, "-m", "bilevel_dsl.cli"]
    result = subprocess.run([*command, "check", str(good), *paths], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    assert f"{good}: ok" in result.stdout
    reported = {m["file"] for m in LOCATED.finditer(result.stderr)}
    reported |= {m["file"] for m in UNLOCATED.finditer(result.stderr)}
    assert reported == set(paths)


# ------------------------------------------------------------------ keeping a run's work


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_sigterm_stops_a_run_like_ctrl_c_and_keeps_its_record(tmp_path, name):
    """kill, timeout and job schedulers send SIGTERM, a closed terminal or a dropped ssh
    session SIGHUP: the run stops at the next iteration and its folder is written, as after
    Ctrl-C (before, the folder stayed empty)."""
    import signal
    import time

    out = tmp_path / "run"
    process = _solve_in_background(tmp_path, out, "--quiet", "--set", "outer=100000000")
    time.sleep(2.0)  # some iterations, even on a busy machine
    process.send_signal(getattr(signal, name))
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + getattr(signal, name), stderr  # 143, 129: as a shell
    record = json.loads((out / "result.json").read_text())
    assert record["stopped_because"] == "interrupted" and record["iterations"] > 0
    assert b"Traceback" not in stderr and b"interrupted" in stdout


def _solve_in_background(tmp_path: Path, out: Path, *flags: str) -> subprocess.Popen:
    """`brl solve` of a small problem into ``out`` in another process, once ``out`` exists
    (it is made just before the solve)."""
    import time

    path = tmp_path / "p.brl"
    path.write_text(SOLVABLE)
    process = subprocess.Popen(
        [sys.executable, "-m", "bilevel_dsl.cli", "solve", str(path), "--out", str(out),
         *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 60
    while not out.exists() and time.time() < deadline:
        time.sleep(0.05)
    return process


def test_a_reader_that_goes_away_does_not_end_the_run(tmp_path):
    """`brl solve ... 2>&1 | head`, a quit pager: the progress lines meet a closed pipe, and the
    run goes on to its end and writes its folder (it used to stop with nothing saved)."""
    out = tmp_path / "run"
    process = _solve_in_background(tmp_path, out, "--set", "outer=3000")
    process.stdout.close()  # the summary's reader leaves too
    process.stderr.readline()  # the first progress line, then the reader leaves
    process.stderr.close()
    assert process.wait(timeout=120) == 0
    record = json.loads((out / "result.json").read_text())
    assert record["stopped_because"] == "max_iterations" and record["iterations"] == 3000


@pytest.mark.skipif(sys.platform == "win32", reason="the folder lock is POSIX flock")
def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path, capsys):
    """Two runs given one --out both ended well, and one silently replaced the other's record:
    the folder is locked (no file in it) while a run uses it."""
    import signal
    import time

    out = tmp_path / "run"
    first = _solve_in_background(tmp_path, out, "--quiet", "--set", "outer=100000000")
    path = tmp_path / "p.brl"
    try:
        time.sleep(1.0)
        code, _, err = run(["solve", str(path), "--quiet", "--out", str(out), "--force"],
                           capsys)
        assert code == 1 and "is in use by another brl run" in err
        assert sorted(p.name for p in out.iterdir()) == []
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    assert (out / "result.json").is_file()  # the first run's record, its folder free again
    assert run(["solve", str(path), "--quiet", "--out", str(out), "--force"], capsys)[0] == 0


def test_an_output_folder_name_too_long_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "p.brl"
    path.write_text(SOLVABLE)
    code, _, err = run(["solve", str(path), "--quiet", "--out", str(tmp_path / ("x" * 300))],
                       capsys)
    assert code == 1 and err.startswith("error: cannot write the output folder")
    assert "internal error" not in err


def test_out_refuses_to_replace_a_run_unless_forced(tmp_path, capsys):
    path = tmp_path / "p.brl"
    path.write_text(SOLVABLE)
    out = tmp_path / "run"
    assert run(["solve", str(path), "--quiet", "--out", str(out)], capsys)[0] == 0
    assert (out / "result.json").stat().st_mode & 0o044 == 0o044 & ~_umask()
    first = (out / "result.json").read_text()
    code, _, err = run(["solve", str(path), "--quiet", "--out", str(out), "-D", "x=1"], capsys)
    assert code == 1 and "already holds a run" in err and "--force" in err
    assert (out / "result.json").read_text() == first
    assert run(["solve", str(path), "--quiet", "--out", str(out), "--force"], capsys)[0] == 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_compile_output_and_gradcheck_misuse_are_errors_not_tracebacks(tmp_path, capsys):
    synthetic = str(ROOT / "problems" / "synthetic.brl")
    code, _, err = run(["compile", synthetic, "-o", str(tmp_path)], capsys)
    assert code == 1 and "is a folder" in err and not list(tmp_path.iterdir())
    code, _, err = run(["compile", synthetic, "-o", str(tmp_path / "no" / "ir.json")], capsys)
    assert code == 1 and "does not exist" in err
    code, _, err = run(["gradcheck", str(ROOT / "problems" / "rlhf_hopper.brl")], capsys)
    assert code == 1 and "gymnasium environment" in err
    record = tmp_path / "result.json"  # a run's record is not overwritten by an IR
    record.write_text('{"problem": "synthetic", "history": {}}')
    code, _, err = run(["compile", synthetic, "-o", str(record)], capsys)
    assert code == 1 and "holds no IR" in err and "history" in record.read_text()
    ir_file = tmp_path / "ir.json"  # an IR is replaced
    assert run(["compile", synthetic, "-o", str(ir_file)], capsys)[0] == 0
    assert run(["compile", synthetic, "-o", str(ir_file)], capsys)[0] == 0


def test_check_reports_a_solve_statement_that_cannot_solve_the_file(tmp_path, capsys):
    path = tmp_path / "p.brl"
    path.write_text(SOLVABLE.replace("solve m_sobirl(outer = 2)", "solve sobirl(outer = 2)"))
    code, _, err = run(["check", str(path)], capsys)
    assert code == 1 and f"{path}:6:7: error[E806]: solver `sobirl` cannot solve" in err
    assert "solvers that can: `m_sobirl`, `exact`" in err
    code, _, err = run(["solve", str(path), "--out", str(tmp_path / "run")], capsys)
    assert code == 1 and "error[E806]" in err
    assert run(["solve", str(path), "--quiet", "--solver", "exact", "--set", "outer=2",
                "--out", str(tmp_path / "run")], capsys)[0] == 0


def test_gradcheck_at_a_non_finite_point_says_so(tmp_path, capsys):
    path = tmp_path / "sqrt.brl"  # d sqrt(x) / dx is infinite at the start x = 0
    path.write_text("brl 1\nmdp M = random_mdp(states = 3, actions = 2)\nvar x[M.S] = 0\n"
                    "lower M { temperature = 1  reward[s, a] = sqrt(x[s]) }\n"
                    "upper minimize norm2(x) - value(M, policy)\n")
    code, out, err = run(["gradcheck", str(path), "--points", "0"], capsys)
    assert code == 1 and "not finite" in out and "internal error" not in err


def test_check_judges_the_solve_statement_only_of_a_complete_file(tmp_path, capsys):
    """A file still missing its objective, or asking for a GPU this machine lacks, checks ok;
    the capability check lowers on the CPU."""
    path = tmp_path / "p.brl"
    path.write_text(SOLVABLE.replace("upper minimize norm2(x) - value(M, policy)\n", ""))
    assert run(["check", str(path)], capsys)[0] == 0
    path.write_text(SOLVABLE.replace("(outer = 2)", "(outer = 2) on cuda"))
    assert run(["check", str(path)], capsys)[0] == 0


def test_the_cli_runs_off_the_main_thread(tmp_path, capsys):
    """Signals can only be handled on the main thread: elsewhere the CLI runs without them."""
    import threading

    path = tmp_path / "p.brl"
    path.write_text(SOLVABLE)
    codes = []
    worker = threading.Thread(target=lambda: codes.append(main(
        ["solve", str(path), "--quiet", "--out", str(tmp_path / "run")])))
    worker.start()
    worker.join()
    assert codes == [0] and (tmp_path / "run" / "result.json").is_file()


def test_solve_auto_in_a_file_picks_a_solver_and_takes_no_options(tmp_path, capsys):
    path = tmp_path / "p.brl"
    without = SOLVABLE.replace("solve m_sobirl(outer = 2)\n", "")
    path.write_text(without + "solve auto\n")
    code, out, _ = run(["solve", str(path), "--quiet", "--set", "outer=3", "--out",
                        str(tmp_path / "run")], capsys)
    assert code == 0 and "m_sobirl" in out
    path.write_text(without + "solve auto(outer = 3)\n")
    code, _, err = run(["check", str(path)], capsys)
    assert code == 1 and "E802" in err and "`auto` takes no options" in err


def test_compile_schema_takes_no_file(capsys):
    code, _, err = run(["compile", "--schema", "problems/maze_nav.brl"], capsys)
    assert code == 1 and "--schema or a file, not both" in err


def test_a_failed_write_still_prints_the_summary(tmp_path, capsys, monkeypatch):
    """A full disk at the end of a run: the summary (x, the objective) is printed before the
    error, so the run is not lost from the console too; exit 1, no internal error."""
    import solvers.output

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(solvers.output, "write_run", full_disk)
    path = tmp_path / "p.brl"
    path.write_text(SOLVABLE)
    code, out, err = run(["solve", str(path), "--quiet", "--out", str(tmp_path / "run")], capsys)
    assert code == 1 and "objective" in out and "x" in out
    assert err.startswith(f"error: cannot write the run to {tmp_path / 'run'}: No space left")


def test_force_removes_the_old_runs_checkpoint(tmp_path, capsys):
    """--force replaces a run: its checkpoint must go too, or --resume would bring it back."""
    path = tmp_path / "p.brl"
    path.write_text(SOLVABLE)
    out_dir = tmp_path / "run"
    (out_dir / "checkpoint").mkdir(parents=True)
    (out_dir / "checkpoint" / "progress.json").write_text("{}")
    (out_dir / "reward_net.pt").write_text("old")
    (out_dir / "notes.txt").write_text("mine")
    code, _, err = run(["solve", str(path), "--quiet", "--out", str(out_dir), "--force"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["curve.png", "notes.txt",
                                                         "result.json"]


def _solvers_raise(monkeypatch, error: BaseException) -> None:
    """Every solver `brl solve` picks raises ``error`` as soon as it runs."""
    import dataclasses

    import solvers

    def raising(*args, **kwargs):
        raise error

    resolve = solvers.resolve

    def resolve_to_a_raising_solver(*args):
        spec, options = resolve(*args)
        return dataclasses.replace(spec, run=raising), options

    monkeypatch.setattr(solvers, "resolve", resolve_to_a_raising_solver)


@pytest.mark.parametrize("existing", [False, True])
def test_an_interrupt_before_anything_is_saved_leaves_no_empty_folder(tmp_path, capsys,
                                                                     monkeypatch, existing):
    """Ctrl-C while a run sets up (a deep run's first queries): the folder made for it goes,
    a folder the user made stays; exit 130 either way."""
    _solvers_raise(monkeypatch, KeyboardInterrupt())
    path = tmp_path / "p.brl"
    path.write_text(SOLVABLE)
    out_dir = tmp_path / "run"
    if existing:
        out_dir.mkdir()
    code, _, err = run(["solve", str(path), "--quiet", "--solver", "m_sobirl", "--out",
                        str(out_dir)], capsys)
    assert code == 130 and err.endswith("interrupted\n")
    assert out_dir.is_dir() == existing
    assert ("removed" in err) != existing


def test_an_extra_argument_is_named_in_the_commands_usage(tmp_path, capsys):
    path = tmp_path / "p.brl"
    path.write_text(SOLVABLE)
    with pytest.raises(SystemExit) as info:
        main(["solve", str(path), "second.brl"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "usage: brl solve" in err
    assert "brl solve: error: unrecognized arguments: second.brl" in err


@pytest.mark.parametrize("flag", ["--out", "--resume"])
def test_an_empty_folder_name_is_refused(tmp_path, capsys, flag):
    """`--out ''` (an unset shell variable) fell back to runs/... without a word."""
    path = tmp_path / "p.brl"
    path.write_text(SOLVABLE)
    code, _, err = run(["solve", str(path), "--quiet", flag, ""], capsys)
    assert code == 1 and err == f"error: {flag} needs a folder, got an empty name\n"


def test_nan_in_a_define_says_there_is_no_nan(tmp_path, capsys):
    path = tmp_path / "p.brl"
    path.write_text(SOLVABLE.replace("var x", "param c = 1\nvar x"))
    code, _, err = run(["check", str(path), "-D", "c=nan"], capsys)
    assert code == 1 and "-D c: undefined name `nan`" in err
    assert "hint: brl has no NaN value: write a number (`inf` is infinity)" in err


def test_an_option_of_another_solver_is_named_as_such(tmp_path, capsys):
    """`implicit` is sobirl_sac's; for sac_true the closest name was `time_limit`."""
    path = tmp_path / "p.brl"
    path.write_text(SOLVABLE)
    code, _, err = run(["solve", str(path), "--quiet", "--solver", "exact", "--set",
                        "inner=3"], capsys)
    assert code == 1
    assert err == ("error: --set inner: solver `exact` has no option `inner`; `inner` is an "
                   "option of m_sobirl, sobirl, stoc_sobirl, drlhf\n"), err


def test_another_solver_says_the_files_options_are_left_behind(tmp_path, capsys):
    path = tmp_path / "p.brl"
    path.write_text(SOLVABLE)
    code, _, err = run(["solve", str(path), "--quiet", "--solver", "exact", "--set", "outer=1",
                        "--out", str(tmp_path / "run")], capsys)
    assert code == 0
    assert ("note: the file's options for m_sobirl (outer = 2) do not apply to exact; pass "
            "those you want with --set") in err


def test_a_time_limit_is_named_as_the_reason_to_stop(tmp_path, capsys):
    path = tmp_path / "p.brl"
    path.write_text(SOLVABLE)
    code, out, _ = run(["solve", str(path), "--quiet", "--set", "outer=100000000",
                        "--set", "time_limit=0.5", "--out", str(tmp_path / "run")], capsys)
    assert code == 0
    assert re.search(r"stopped because\s+time_limit", out)


@pytest.mark.parametrize(("setting", "message"), [
    ("outer=1_0", "option `outer` expects an integer, got `1_0`"),
    ("beta=\u0663", "option `beta` expects a number, got `\u0663`"),
    ("OUTER=3", "did you mean `outer`?"),
])
def test_set_takes_plain_numbers_and_names_only(setting, message, tmp_path, capsys):
    path = tmp_path / "p.brl"
    path.write_text(SOLVABLE)
    code, _, err = run(["solve", str(path), "--quiet", "--set", setting], capsys)
    assert code == 1 and message in err


def test_gradcheck_reports_a_non_finite_error_as_the_worst(tmp_path, capsys):
    path = tmp_path / "p.brl"
    path.write_text(SOLVABLE)
    code, out, _ = run(["gradcheck", str(path), "--eps", "1e300", "--points", "0"], capsys)
    assert code == 1 and re.search(r"FAILED at 1 point: worst relative error (inf|nan) ", out)


def test_gradcheck_leaves_points_passed_on_the_absolute_error_out_of_the_worst(tmp_path,
                                                                                 capsys):
    """At x0 = 0 the gradient of this problem is 0 and its relative error is noise (about
    1e5): the verdict's worst relative error is that of the other points."""
    path = tmp_path / "tiny.brl"
    path.write_text("brl 1\nmdp M = random_mdp(states = 4, actions = 2, discount = 0.9)\n"
                    "var x[M.S, M.A] = 0 in [-1, 1]\n"
                    "lower M { temperature = 0.5  reward[s, a] = x[s, a] }\n"
                    "upper minimize 0.5 * norm2(x) - value(M, policy, M.R + 1)\n")
    code, out, _ = run(["gradcheck", str(path)], capsys)
    worst = float(re.search(r"ok: worst relative error (\S+)", out).group(1))
    assert code == 0 and worst < 1e-6 and "1 point passed on the absolute error" in out
    code, out, _ = run(["gradcheck", str(path), "--points", "0"], capsys)
    assert code == 0 and re.search(r"ok: largest absolute error \S+ \(below --atol 1e-08\)", out)


def test_gym_overrides_say_what_is_wrong(capsys):
    hopper = str(ROOT / "problems" / "rlhf_hopper.brl")
    code, _, err = run(["check", hopper, "-D", "env=1"], capsys)
    assert code == 1 and "-D env: `env` is an MDP, not a param or var" in err
    code, _, err = run(["check", hopper, "-D", "initial_pairs=1000000000"], capsys)
    assert code == 1 and "from 0 to 10000000, got 1000000000" in err


def test_compile_replaces_its_own_schema(tmp_path, capsys):
    schema = tmp_path / "schema.json"
    assert run(["compile", "--schema", "-o", str(schema)], capsys)[0] == 0
    assert run(["compile", "--schema", "-o", str(schema)], capsys)[0] == 0


def test_the_progress_ends_at_the_last_iteration(tmp_path, capsys):
    """m_sobirl reports each iterate before its step; the line still ends at `2/2`."""
    path = tmp_path / "p.brl"
    path.write_text(SOLVABLE)
    code, _, err = run(["solve", str(path), "--out", str(tmp_path / "run")], capsys)
    assert code == 0 and err.splitlines()[-1].startswith("2/2 100%")


def test_running_out_of_memory_is_an_error_not_a_bug(tmp_path, capsys, monkeypatch):
    """torch's failed allocation deep in a solver: a plain error with what to try, exit 1."""
    _solvers_raise(monkeypatch, RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
        "tried to allocate 2252800000 bytes."))
    path = tmp_path / "p.brl"
    path.write_text(SOLVABLE)
    code, _, err = run(["solve", str(path), "--quiet", "--out", str(tmp_path / "run")], capsys)
    assert code == 1 and "internal error" not in err
    assert err.startswith("error: the run needs more memory than this machine has (2.1 GiB")


def test_compile_writes_into_a_pipe_without_replacing_it(tmp_path, capsys):
    """`-o /dev/null` or a named pipe is written to: renaming a file over it (what a regular
    output gets, so that a crash leaves no half file) would replace the device itself."""
    import stat
    import threading

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    received: list[str] = []
    reader = threading.Thread(target=lambda: received.append(pipe.read_text()))
    reader.start()
    code, _, err = run(["compile", str(ROOT / "problems" / "synthetic.brl"), "-o", str(pipe)],
                         capsys)
    reader.join(timeout=30)
    assert code == 0, err
    assert stat.S_ISFIFO(pipe.stat().st_mode)
    assert json.loads(received[0])["node"] == "Program"


def test_ctrl_c_while_the_command_loads_ends_it_once_loaded():
    """Ctrl-C is held while the compiler and torch load (an interrupt inside torch's start-up
    once aborted the process, exit 134): the command then ends, quietly, with 130."""
    code = ("import os, signal, sys, threading\n"
            "import brl_main\n"
            "threading.Timer(0.1, lambda: os.kill(os.getpid(), signal.SIGINT)).start()\n"
            "sys.argv = ['brl', 'check', 'problems/synthetic.brl']\n"
            "sys.exit(brl_main.main())\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 130 and result.stderr == "interrupted\n", result.stderr


def test_an_internal_error_has_its_own_exit_status(tmp_path, capsys, monkeypatch):
    """70 (a bug in brl), which a script can tell from 1 (the input) and 2 (the command line)."""
    _solvers_raise(monkeypatch, ValueError("a bug"))
    path = tmp_path / "p.brl"
    path.write_text(SOLVABLE)
    code, _, err = run(["solve", str(path), "--quiet", "--out", str(tmp_path / "run")], capsys)
    assert code == 70 and "internal error: ValueError: a bug" in err and "BRL_DEBUG=1" in err


def test_check_prints_a_warning_and_still_passes(tmp_path, capsys):
    path = tmp_path / "w.brl"
    path.write_text(SOLVABLE.replace("reward[s, a] = x[s, a]", "reward[s, a] = M.R[s, a]"))
    code, out, err = run(["check", str(path)], capsys)
    assert code == 0 and f"{path}: ok" in out
    assert f"{path}:4:43: warning[W401]: the follower's reward does not depend on `x`" in err


def test_gradcheck_tells_a_step_far_too_wide_from_rounding(tmp_path, capsys):
    """A near-deterministic follower at a near tie: phi turns within 1e-6 of x, far inside the
    default step. The differences then double as the step halves, as rounding noise does, but
    far above any rounding: the advice is a much smaller step (it was a larger one)."""
    path = tmp_path / "tie.brl"
    path.write_text("brl 1\nmdp M = random_mdp(states = 2, actions = 3)\n"
                    "var x[M.A] = [0.5, 0.5000002, 0.4999] in [0, 1]\n"
                    "lower M { temperature = 1e-3  reward[s, a] = 1000 * x[a] + "
                    "(if s == 1 then 2000 * x[a] else 0) }\n"
                    "upper minimize (policy[0, 0] - 0.3)^2 + (policy[1, 1] - 0.6)^2\n",
                    encoding="utf-8")
    code, out, _ = run(["gradcheck", str(path), "--points", "0"], capsys)
    assert code == 1 and "far above what rounding in phi could do" in out, out
    assert "--eps 1e-08" in out
    assert run(["gradcheck", str(path), "--points", "0", "--eps", "1e-8"], capsys)[0] == 0
