"""The solver registry: lookup, capability checks, options and the text it prints."""

from __future__ import annotations

import dataclasses
import math
import re
from types import SimpleNamespace

import pytest
import torch

from solvers import (
    AUTO_ORDER,
    REGISTRY,
    Capabilities,
    IncapableSolverError,
    Monitor,
    NoCapableSolverError,
    Option,
    OptionError,
    ProblemFeatures,
    Registry,
    SolveResult,
    SolverSpec,
    UnknownSolverError,
    describe,
    parse_option_value,
    resolve,
    solve,
)
from solvers.registry import Interval, OptionRangeError

POLICY_FEATURES = frozenset({"policy", "value", "occupancy", "entropy"})


def fake_run(problem: object, options: dict, monitor: Monitor) -> SolveResult:
    for k in range(1, 4):
        monitor.update(k, 1.0 / k, 0.1 / k)
    return SolveResult(
        x=torch.zeros(2),
        policy=torch.full((3, 2), 0.5),
        objective=1 / 3,
        history={"objective": [1.0, 0.5, 1 / 3], "hypergrad_norm": [0.1, 0.05, 0.03],
                 "time": [0.0, 0.1, 0.2]},
        iterations=3,
        stopped_because=f"ran {options['outer']} outer iterations",
    )


def make_spec(
    name: str,
    aliases: tuple[str, ...] = (),
    forms: frozenset[str] = frozenset({"policy_functional"}),
    features: frozenset[str] = POLICY_FEATURES,
    devices: frozenset[str] = frozenset({"cpu", "cuda"}),
) -> SolverSpec:
    return SolverSpec(
        name=name,
        aliases=aliases,
        summary=f"fake solver {name}",
        capabilities=Capabilities(
            model_based=True,
            environments=frozenset({"tabular"}),
            forms=forms,
            features=features,
            devices=devices,
        ),
        options=(
            Option("outer", int, 500, "outer iterations"),
            Option("beta", float, 0.05, "upper step size"),
            Option("method", str, "direct", "adjoint solve", choices=("direct", "gmres")),
            Option("warm_start", bool, True, "reuse the last policy"),
            Option("time_limit", float, None, "seconds before stopping"),
        ),
        run=fake_run,
    )


@pytest.fixture
def registry() -> Registry:
    reg = Registry()
    reg.register(make_spec("m_sobirl", aliases=("msobirl",)))
    reg.register(make_spec("exact", aliases=("reference",), devices=frozenset({"cpu"})))
    reg.register(
        make_spec(
            "drlhf",
            forms=frozenset({"trajectory"}),
            features=frozenset({"expected_return", "preference_loss"}),
        )
    )
    return reg


def features(
    form: str = "policy_functional",
    feats: frozenset[str] = frozenset({"value"}),
    device: str = "cpu",
) -> ProblemFeatures:
    return ProblemFeatures("tabular", form, feats, device)


def test_global_registry_imports_with_solver_modules_missing() -> None:
    # Whatever built-ins exist so far are registered in the documented auto order.
    names = REGISTRY.names()
    assert names == [name for name in AUTO_ORDER if name in names]


def test_missing_builtin_module_is_skipped_but_a_broken_one_raises(tmp_path, monkeypatch) -> None:
    assert Registry(["solvers._not_written_yet"]).names() == []
    (tmp_path / "broken_solver.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError):
        Registry(["broken_solver"]).names()


def test_get_by_name_alias_case_and_dash(registry: Registry) -> None:
    assert registry.get("m_sobirl").name == "m_sobirl"
    assert registry.get("msobirl").name == "m_sobirl"
    assert registry.get("M-SoBiRL").name == "m_sobirl"
    assert registry.get("reference").name == "exact"
    assert registry.names() == ["m_sobirl", "exact", "drlhf"]


def test_unknown_solver_suggests_and_lists(registry: Registry) -> None:
    with pytest.raises(UnknownSolverError) as info:
        registry.get("m_sobril")
    message = str(info.value)
    assert "did you mean `m_sobirl`?" in message
    for name in ("m_sobirl", "exact", "drlhf"):
        assert f"`{name}`" in message
    with pytest.raises(UnknownSolverError) as info:
        registry.get("msobril")  # closest to the alias `msobirl`: the solver's name is shown
    assert "did you mean `m_sobirl`?" in str(info.value)


def test_duplicate_name_or_alias_is_refused(registry: Registry) -> None:
    with pytest.raises(ValueError, match="already used"):
        registry.register(make_spec("other", aliases=("msobirl",)))


def test_missing_lists_form_features_and_device(registry: Registry) -> None:
    problem = features("trajectory", frozenset({"preference_loss", "value"}), "cuda")
    assert registry.missing(registry.get("exact"), problem) == [
        "objective form `trajectory`",
        "feature `preference_loss`",
        "device `cuda`",
    ]
    assert registry.missing(registry.get("m_sobirl"), features()) == []


def test_incapable_solver_gets_a_table(registry: Registry) -> None:
    problem = features("trajectory", frozenset({"preference_loss"}), "cuda")
    with pytest.raises(IncapableSolverError) as info:
        registry.check_capable(registry.get("exact"), problem)
    lines = str(info.value).splitlines()
    assert lines[0] == "solver `exact` cannot solve this problem:"
    assert lines[1].split() == ["problem", "needs", "exact", "accepts"]
    assert lines[3].split()[:3] == ["objective", "form", "trajectory"]
    assert any(line.split()[:2] == ["feature", "preference_loss"] for line in lines)
    assert any(line.split()[:3] == ["device", "cuda", "cpu"] for line in lines)
    assert lines[-1] == "solvers that can: `drlhf`"
    registry.check_capable(registry.get("m_sobirl"), features())  # capable: no error


def test_auto_picks_first_capable_in_order(registry: Registry) -> None:
    assert registry.auto(features()).name == "m_sobirl"
    assert registry.auto(features("trajectory", frozenset({"preference_loss"}))).name == "drlhf"


def test_auto_without_a_capable_solver_says_what_each_lacks(registry: Registry) -> None:
    with pytest.raises(NoCapableSolverError) as info:
        registry.auto(features(feats=frozenset({"value", "telepathy"})))
    message = str(info.value)
    for name in ("m_sobirl", "exact", "drlhf"):
        assert any(line.startswith(name) and "feature `telepathy`" in line
                   for line in message.splitlines())


def test_validate_options_fills_defaults_and_types(registry: Registry) -> None:
    spec = registry.get("m_sobirl")
    typed = registry.validate_options(spec, {"outer": 10, "beta": 1})
    assert typed == {"outer": 10, "beta": 1.0, "method": "direct", "warm_start": True,
                     "time_limit": None}
    assert type(typed["beta"]) is float
    assert registry.validate_options(spec, {"time_limit": 5})["time_limit"] == 5.0


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"outer": 1.5}, "`outer` expects an integer, got 1.5"),
        ({"outer": True}, "`outer` expects an integer, got true, a truth value"),
        ({"beta": "big"}, "`beta` expects a number"),
        ({"beta": False}, "`beta` expects a number"),
        ({"warm_start": 1}, "`warm_start` expects true or false"),
        ({"method": "gmrs"}, "did you mean `gmres`?"),
        ({"outr": 3}, "has no option `outr`; did you mean `outer`?"),
        ({"outer": None}, "`outer` expects an integer, got none"),
    ],
)
def test_validate_options_rejects(registry: Registry, options: dict, expected: str) -> None:
    with pytest.raises(OptionError, match=re.escape(expected)):
        registry.validate_options(registry.get("m_sobirl"), options)


@pytest.mark.parametrize(
    ("name", "text", "value"),
    [
        ("outer", "200", 200),
        ("outer", " -3 ", -3),
        ("outer", "1e4", 10_000),  # a whole number, however written
        ("outer", "2.0", 2),
        ("beta", "1e-3", 1e-3),
        ("beta", "2", 2.0),
        ("method", "gmres", "gmres"),
        ("warm_start", "false", False),
        ("warm_start", "Yes", True),
        ("time_limit", "none", None),
        ("time_limit", "60", 60.0),
    ],
)
def test_parse_option_value_good(registry: Registry, name: str, text: str, value: object) -> None:
    option = {o.name: o for o in registry.get("m_sobirl").options}[name]
    parsed = parse_option_value(option, text)
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("outer", "2.5", "option `outer` expects an integer, got `2.5`"),
        ("outer", "1e400", "option `outer` expects an integer, got `1e400`"),
        ("outer", "inf", "option `outer` expects an integer, got `inf`"),
        ("outer", "none", "option `outer` expects an integer, got `none`"),
        ("beta", "fast", "option `beta` expects a number, got `fast`"),
        ("warm_start", "maybe", "option `warm_start` expects true or false, got `maybe`"),
        ("method", "lu", "option `method` must be one of direct, gmres; got `lu`"),
    ],
)
def test_parse_option_value_bad(registry: Registry, name: str, text: str, expected: str) -> None:
    option = {o.name: o for o in registry.get("m_sobirl").options}[name]
    with pytest.raises(OptionError) as info:
        parse_option_value(option, text)
    assert str(info.value) == expected


def test_option_declaration_is_checked() -> None:
    with pytest.raises(OptionError):
        Option("outer", int, 0.5, "bad default")
    with pytest.raises(OptionError):
        Option("method", str, "lu", "default not a choice", choices=("direct",))
    with pytest.raises(TypeError):
        Option("shape", tuple, (), "unsupported type")


def test_capability_matrix_lists_every_solver(registry: Registry) -> None:
    matrix = registry.capability_matrix()
    lines = matrix.splitlines()
    assert lines[0].split() == ["solver", "model", "environments", "forms", "features",
                                "devices", "aliases"]
    for name in registry.names():
        assert any(line.startswith(name) for line in lines)
    assert "msobirl" in matrix and "preference_loss" in matrix
    assert lines[-1] == "auto order: m_sobirl, exact, drlhf"
    assert Registry().capability_matrix() == "no solvers registered"


def test_describe_shows_options(registry: Registry) -> None:
    text = describe(registry.get("m_sobirl"))
    assert text.startswith("m_sobirl (aliases: msobirl): fake solver m_sobirl")
    assert "model-based" in text
    option_lines = {line.split()[0]: line.split() for line in text.splitlines() if line}
    assert option_lines["outer"][:3] == ["outer", "int", "500"]
    assert option_lines["time_limit"][:3] == ["time_limit", "float", "none"]
    assert "(one of: direct, gmres)" in text


def fake_problem(**changes: object) -> SimpleNamespace:
    fields = {
        "form": "policy_functional",
        "features": frozenset({"value"}),
        "x0": torch.zeros(2),
        "solver": "m_sobirl",
        "solver_options": {"outer": 7, "beta": 0.5},
    }
    fields.update(changes)
    problem = SimpleNamespace(**fields)
    problem.device = problem.x0.device
    return problem


def test_problem_features_of_a_problem() -> None:
    problem = fake_problem(features=frozenset({"value", "entropy"}))
    assert ProblemFeatures.of(problem) == ProblemFeatures(
        "tabular", "policy_functional", frozenset({"value", "entropy"}), "cpu"
    )


def test_resolve_merges_file_options_under_explicit_ones(registry: Registry) -> None:
    spec, typed = resolve(fake_problem(), None, {"beta": 0.1}, registry)
    assert spec.name == "m_sobirl"
    assert (typed["outer"], typed["beta"]) == (7, 0.1)
    # The file's options belong to the file's solver: another solver starts from its defaults.
    spec, typed = resolve(fake_problem(), "exact", None, registry)
    assert (spec.name, typed["outer"]) == ("exact", 500)
    spec, typed = resolve(fake_problem(solver=None, solver_options={}), None, None, registry)
    assert spec.name == "m_sobirl"


def test_resolve_refuses_an_incapable_solver(registry: Registry) -> None:
    with pytest.raises(IncapableSolverError):
        resolve(fake_problem(form="trajectory"), "exact", None, registry)


def test_solve_runs_the_solver_and_closes_the_monitor(registry: Registry) -> None:
    class Recorder(Monitor):
        def __init__(self) -> None:
            self.seen: list[int] = []
            self.closed = False

        def update(self, iteration: int, objective: float, hypergrad_norm: float) -> None:
            self.seen.append(iteration)

        def close(self) -> None:
            self.closed = True

    monitor = Recorder()
    spec, result = solve(fake_problem(), "msobirl", {"outer": 3}, monitor, registry)
    assert spec.name == "m_sobirl"
    assert result.stopped_because == "ran 3 outer iterations"
    assert monitor.seen == [1, 2, 3] and monitor.closed


# ------------------------------------------------------------------ valid ranges of options


@pytest.mark.parametrize(
    ("text", "inside", "outside", "words"),
    [
        ("[1, inf)", [1, 2, 10**9], [0, -1, 0.5, math.inf, math.nan], "at least 1"),
        ("(0, inf)", [1e-300, 5.0], [0.0, -1.0, math.inf, math.nan], "greater than 0"),
        ("(0, 1]", [0.5, 1.0], [0.0, 1.5, math.nan], "in (0, 1]"),
        ("[0, 1]", [0.0, 1.0], [-1e-9, 1.0000001], "in [0, 1]"),
        ("(-inf, 0]", [-5.0, 0.0], [0.1], "at most 0"),
        (" ( -1 , 1e-3 ) ", [0.0], [-1.0, 1e-3], "in (-1, 0.001)"),
    ],
)
def test_interval_notation(text: str, inside: list, outside: list, words: str) -> None:
    interval = Interval.parse(text)
    assert all(v in interval for v in inside)
    assert not any(v in interval for v in outside)
    assert interval.describe() == words
    assert Interval.parse(str(interval)) == interval


@pytest.mark.parametrize("text", ["1, 2", "[1, 2", "[a, 2]", "[2, 1]", "[nan, 1]", "(1)", ""])
def test_interval_notation_rejects_what_is_not_one(text: str) -> None:
    with pytest.raises(ValueError, match="not an interval"):
        Interval.parse(text)


def test_option_ranges_are_declared_and_checked() -> None:
    option = Option("outer", int, 10, "steps", valid="[1, inf)")
    assert option.valid == Interval(1, math.inf, True, False)
    with pytest.raises(OptionRangeError):
        Option("outer", int, 0, "a default out of range", valid="[1, inf)")
    with pytest.raises(TypeError):
        Option("method", str, "a", "a string has no range", valid="[0, 1]")
    with pytest.raises(ValueError):
        Option("beta", float, 0.1, "bad notation", valid="0 < beta")
    assert Option("limit", float, None, "optional", valid="(0, inf)").default is None


def range_registry() -> Registry:
    spec = make_spec("m_sobirl")
    spec = dataclasses.replace(spec, options=(
        Option("outer", int, 500, "outer iterations", valid="[1, inf)"),
        Option("rate", float, 0.5, "a rate", valid="(0, 1]"),
        Option("limit", float, None, "seconds", valid="(0, inf)"),
    ))
    reg = Registry()
    reg.register(spec)
    return reg


@pytest.mark.parametrize(
    ("options", "message", "hint"),
    [
        ({"outer": 0}, "option `outer` must be at least 1, got 0",
         "`outer` takes an integer in [1, inf)"),
        ({"outer": -5}, "option `outer` must be at least 1, got -5",
         "`outer` takes an integer in [1, inf)"),
        ({"rate": 0}, "option `rate` must be in (0, 1], got 0", "`rate` takes a number in (0, 1]"),
        ({"rate": 1.5}, "option `rate` must be in (0, 1], got 1.5",
         "`rate` takes a number in (0, 1]"),
        ({"limit": -1.0}, "option `limit` must be greater than 0, got -1",
         "`limit` takes a number in (0, inf)"),
    ],
)
def test_validate_options_rejects_values_out_of_range(options: dict, message: str,
                                                      hint: str) -> None:
    reg = range_registry()
    with pytest.raises(OptionRangeError) as info:
        reg.validate_options(reg.get("m_sobirl"), options)
    assert str(info.value) == message and info.value.hint == hint


def test_values_at_the_ends_of_a_range_are_valid() -> None:
    reg = range_registry()
    typed = reg.validate_options(reg.get("m_sobirl"), {"outer": 1, "rate": 1, "limit": None})
    assert typed == {"outer": 1, "rate": 1.0, "limit": None}
    option = {o.name: o for o in reg.get("m_sobirl").options}["outer"]
    assert parse_option_value(option, "1") == 1
    with pytest.raises(OptionRangeError, match=re.escape("must be at least 1, got 0")):
        parse_option_value(option, "0")


def test_describe_shows_the_valid_ranges() -> None:
    text = describe(range_registry().get("m_sobirl"))
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line}
    assert rows["option"][:5] == ["option", "type", "default", "valid", "description"]
    assert rows["outer"][:5] == ["outer", "int", "500", "[1,", "inf)"]
    assert rows["rate"][3:5] == ["(0,", "1]"]


@pytest.mark.parametrize("name", ["m_sobirl", "exact", "sobirl", "stoc_sobirl", "drlhf"])
def test_built_in_solvers_declare_a_range_for_every_number(name: str) -> None:
    for option in REGISTRY.get(name).options:
        if option.type in (int, float):
            assert option.valid is not None, f"{name}: option `{option.name}` has no range"
            if option.default is not None:
                assert option.default in option.valid


def test_a_sampling_solver_refuses_a_trajectory_objective_without_linear_terms() -> None:
    """A solver that samples trajectory terms needs the objective to be linear in them."""
    caps = Capabilities(False, frozenset({"tabular"}), frozenset({"trajectory"}),
                        frozenset({"policy", "expected_return"}), frozenset({"cpu"}),
                        needs_linear_terms=True)
    reg = Registry()
    reg.register(SolverSpec("sampler", (), "samples", caps, (), lambda p, o, m: None))
    mixed = ProblemFeatures("tabular", "trajectory", frozenset({"policy", "expected_return"}),
                            "cpu", linear_terms=False)
    assert reg.missing(reg.get("sampler"), mixed) == [
        "objective form `trajectory, not a sum of multiples of trajectory terms and terms "
        "without the policy`"]
    assert reg.missing(reg.get("sampler"), ProblemFeatures(
        "tabular", "trajectory", frozenset({"expected_return"}), "cpu")) == []
