"""The IR's JSON form: lossless round trip, the JSON Schema, `brl compile`, and bad documents."""

from __future__ import annotations

import json
import math
import sys

import jsonschema
import pytest
import torch
from conftest import DOCS, PROBLEMS, brl_blocks

from bilevel_dsl import (
    BrlError,
    IRFormatError,
    compile_file,
    compile_source,
    from_json,
    ir,
    json_schema,
    lower,
    parse_file,
    parse_source,
    to_json,
)
from bilevel_dsl.cli import main
from bilevel_dsl.diagnostics import SourceFile
from bilevel_dsl.parser import MAX_CHAIN
from bilevel_dsl.serialize import to_dict


def doc_programs() -> list[tuple[str, ir.Program]]:
    out = []
    for doc in DOCS:
        for line, text in brl_blocks(doc.read_text(encoding="utf-8")):
            name = f"{doc.name}:{line}"
            out.append((name, parse_source(SourceFile(name, text))))
    return out


def all_programs() -> list[tuple[str, ir.Program]]:
    return [(p.name, parse_file(p)) for p in PROBLEMS] + doc_programs()


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_there_are_programs_to_check():
    names = [name for name, _ in all_programs()]
    assert len(PROBLEMS) >= 5 and sum(":" in n for n in names) >= 10


@pytest.mark.parametrize(("name", "program"), all_programs(), ids=lambda v: getattr(v, "name", v))
def test_round_trip(name: str, program: ir.Program, validator):
    text = to_json(program)
    assert from_json(text) == program
    assert from_json(to_json(program, indent=None)) == program
    document = json.loads(text)
    errors = sorted(validator.iter_errors(document), key=str)
    assert not errors, errors[0].message if errors else ""
    # spans survive, so a tool reading the JSON can still point into the source
    assert document["statements"][0]["span"] == list(
        (lambda s: (s.line, s.column, s.end_line, s.end_column))(program.statements[0].span))


def test_round_trip_keeps_every_number_exactly():
    numbers = "0.1, 1e-300, 1.7976931348623157e308, 123456789012345678, 3, -0.0"
    text = f"brl 1\nparam a = [{numbers}]\nparam b = [{numbers}, a]\nparam c = 3"
    program = parse_source(SourceFile("n.brl", text))
    again = from_json(to_json(program))
    folded, items, three = (s.value for s in again.statements)
    expected = [0.1, 1e-300, 1.7976931348623157e308, 123456789012345678.0, 3.0, -0.0]
    assert list(folded.values) == expected and not folded.is_integer
    assert math.copysign(1, folded.values[-1]) == -1
    assert [i.value for i in items.items[:5]] == expected[:5]
    assert [i.is_integer for i in items.items[:5]] == [False, False, False, True, True]
    assert three.is_integer and three.value == 3.0


def test_json_is_strict_json_and_names_node_types():
    text = to_json(parse_file(PROBLEMS[0]))

    def no_constants(token):
        raise AssertionError(f"non-standard JSON constant {token}")

    document = json.loads(text, parse_constant=no_constants)
    assert document["node"] == "Program" and document["ir_version"] == ir.IR_VERSION
    kinds = {s["node"] for s in document["statements"]}
    assert {"MdpDecl", "VarDecl", "LowerDecl", "UpperDecl"} <= kinds


def test_upper_form_and_features_are_in_the_json():
    program = parse_file(next(p for p in PROBLEMS if p.name == "rlhf_chain.brl"))
    upper = next(s for s in json.loads(to_json(program))["statements"] if s["node"] == "UpperDecl")
    assert upper["form"] == "trajectory" and "preference_loss" in upper["features"]


def test_schema_describes_every_node(validator):
    schema = json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    defs = schema["$defs"]
    for cls in (ir.Number, ir.Reduction, ir.MdpDecl, ir.UpperDecl, ir.Program, ir.Span):
        assert cls.__name__ in defs
    assert defs["Program"]["properties"]["ir_version"] == {"const": ir.IR_VERSION}


def test_schema_rejects_what_from_json_rejects(validator):
    document = json.loads(to_json(parse_file(PROBLEMS[0])))
    bad_version = {**document, "ir_version": 99}
    extra_field = {**document, "surprise": 1}
    missing_field = {k: v for k, v in document.items() if k != "statements"}
    for bad in (bad_version, extra_field, missing_field):
        assert not validator.is_valid(bad)
    for bad in (bad_version, missing_field):
        with pytest.raises(IRFormatError):
            from_json(json.dumps(bad))


def corrupt(path: list, new) -> str:
    document = json.loads(to_json(parse_file(PROBLEMS[0])))
    node = document
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = new
    return json.dumps(document)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[]",
        "{}",
        "null",
        "NaN",
        '{"node": "Program"}',
        '{"node": "Program", "ir_version": 3}',
        '{"node": "Program", "ir_version": "1"}',
        '{"node": "Program", "ir_version": 1}',
        '{"node": "Number", "ir_version": 1}',
        "[" * 100_000 + "]" * 100_000,
        '{"node": "Program", "ir_version": 1, "language_version": 1, "source": "x", '
        '"statements": ' + "[" * 5000 + "]" * 5000 + "}",
    ],
    ids=lambda t: t[:30],
)
def test_from_json_rejects_garbage(text: str):
    with pytest.raises(IRFormatError):
        from_json(text)


@pytest.mark.parametrize(
    ("path", "new"),
    [
        (["statements", 0, "span"], [1, 2, 3]),
        (["statements", 0, "span"], [1, 2, 3, True]),
        (["statements", 0, "span"], "1:1"),
        (["statements", 0, "node"], "Bogus"),
        (["statements", 0, "node"], "Number"),
        (["statements", 0], 5),
        (["statements"], {}),
        (["language_version"], "1"),
        (["ir_version"], True),
        (["source"], None),
    ],
)
def test_from_json_rejects_corrupt_documents(path: list, new):
    with pytest.raises(IRFormatError):
        from_json(corrupt(path, new))


def test_from_json_rejects_wrong_field_types_deep_inside():
    program = parse_source(SourceFile("t.brl", "brl 1\nparam a = 1 + 2"))
    document = json.loads(to_json(program))
    document["statements"][0]["value"]["left"]["value"] = "1"
    with pytest.raises(IRFormatError, match=r"value"):
        from_json(json.dumps(document))
    document["statements"][0]["value"]["left"] = {"node": "SetDecl"}
    with pytest.raises(IRFormatError):
        from_json(json.dumps(document))


def test_from_json_checks_a_number_array_and_reads_version_1():
    program = parse_source(SourceFile("t.brl", "brl 1\nparam a[2, 2] = [[1, 2], [3, 4]]"))
    document = json.loads(to_json(program))
    table = document["statements"][0]["value"]
    assert (table["node"], table["shape"], table["values"]) == ("NumberArray", [2, 2],
                                                                [1.0, 2.0, 3.0, 4.0])
    for field, bad in (("shape", [3, 2]), ("shape", []), ("shape", [0, 4]),
                       ("values", [1, 2, 3, True]), ("values", [1, 2, 3, "4"])):
        with pytest.raises(IRFormatError, match=field):
            from_json(json.dumps({**document, "statements": [
                {**document["statements"][0], "value": {**table, field: bad}}]}))
    with pytest.raises(IRFormatError, match="NaN"):
        from_json(json.dumps(document).replace("4.0", "NaN"))
    for bad in ("1" + "0" * 400, "1e400"):  # an integer no float holds; an overflow to inf
        with pytest.raises(IRFormatError, match="not a finite number"):
            from_json(json.dumps(document).replace("4.0", bad))
    with pytest.raises(IRFormatError, match="is_integer"):
        from_json(json.dumps(document).replace("4.0", "4.5"))
    with pytest.raises(IRFormatError, match="version 1"):
        from_json(json.dumps({**document, "ir_version": 1}))
    # version 1, which wrote every number as a node, is version 2 without NumberArray
    version_1 = {**document, "ir_version": 1, "statements": [
        {**document["statements"][0], "value": to_dict(ir.ArrayLiteral(
            program.statements[0].value.span,
            (ir.Number(program.statements[0].value.span, 1.0, True),)))}]}
    assert isinstance(from_json(json.dumps(version_1)).statements[0].value, ir.ArrayLiteral)


def test_deep_expressions_round_trip():
    # the deepest expressions the parser accepts still serialise and read back
    for depth in (150, 190):
        text = "brl 1\nparam a = " + "-" * depth + "1"
        program = parse_source(SourceFile("deep.brl", text))
        assert from_json(to_json(program)) == program


@pytest.mark.parametrize("terms", [1000, MAX_CHAIN + 1])
def test_long_chains_compile_round_trip_and_evaluate(terms: int):
    """A chain `a + a + ... + a` is a tree as deep as it is long: every stage takes it."""
    limit = sys.getrecursionlimit()
    text = ("brl 1\nparam a = 2\nvar x = 1\nmdp M = random_mdp(states = 2, actions = 2)\n"
            "lower M { temperature = 1  reward[s, a] = x }\n"
            f"param p = {' + '.join(['a'] * terms)}\n"
            f"upper minimize {' - '.join(['x * x'] * (terms - 1))} + value(M, policy, M.R)\n"
            f"check {' and '.join(['a > 1'] * terms)}\n")
    checked = compile_source(text, "chain.brl")
    assert float(checked.names["p"].t) == 2 * terms
    assert checked.checks == 1
    # indented, the JSON of a chain n deep holds about n^2 spaces: the longest go compact
    indent = 2 if terms <= 1000 else None
    document = to_json(checked.program, indent=indent)
    again = from_json(document)
    assert to_json(again, indent=indent) == document
    assert sys.getrecursionlimit() == limit  # restored
    problem = lower(checked)
    pi = torch.full((2, 2), 0.5, dtype=torch.float64)
    at = {x: problem.objective(torch.tensor(x, dtype=torch.float64), pi) for x in (0.0, 3.0)}
    assert float(at[3.0] - at[0.0]) == pytest.approx((3 - terms) * 9.0)  # x*x - x*x - ...
    sys.setrecursionlimit(limit + 20_000)  # dataclass equality recurses through the chain
    try:
        assert again == checked.program
    finally:
        sys.setrecursionlimit(limit)


def test_a_long_constant_chain_is_cached_by_the_lowered_objective():
    # `a + ... + a` does not move with x or the policy: the lowered closure computes it once
    terms = 2000
    checked = compile_source(
        "brl 1\nparam a = 2\nvar x = 1\nmdp M = random_mdp(states = 2, actions = 2)\n"
        "lower M { temperature = 1  reward[s, a] = x }\n"
        f"upper minimize {' + '.join(['a'] * terms)} + x * x\n", "chain.brl")
    problem = lower(checked)
    pi = torch.full((2, 2), 0.5, dtype=torch.float64)
    for x in (3.0, 1.0, 3.0):
        value = problem.objective(torch.tensor(x, dtype=torch.float64), pi)
        assert float(value) == 2 * terms + x * x


# ------------------------------------------------------------------ the command line


def test_brl_compile_writes_json(tmp_path, capsys):
    problem = next(p for p in PROBLEMS if p.name == "maze_nav.brl")
    out = tmp_path / "out.json"
    assert main(["compile", str(problem), "-o", str(out)]) == 0
    program = from_json(out.read_text(encoding="utf-8"))
    assert program == compile_file(problem).program
    assert main(["compile", str(problem)]) == 0
    printed = capsys.readouterr().out
    assert from_json(printed) == program


def test_brl_compile_schema(tmp_path, capsys):
    assert main(["compile", "--schema"]) == 0
    assert json.loads(capsys.readouterr().out) == json_schema()
    out = tmp_path / "schema.json"
    assert main(["compile", "--schema", "-o", str(out)]) == 0
    jsonschema.Draft202012Validator.check_schema(json.loads(out.read_text(encoding="utf-8")))


def test_brl_compile_errors(tmp_path, capsys):
    bad = tmp_path / "bad.brl"
    bad.write_text("brl 1\nparam a = b\n", encoding="utf-8")
    out = tmp_path / "out.json"
    assert main(["compile", str(bad), "-o", str(out)]) == 1
    assert not out.exists()
    assert "error[E201]" in capsys.readouterr().err
    assert main(["compile"]) == 1
    assert "give a .brl file" in capsys.readouterr().err


def test_a_node_with_a_field_the_schema_does_not_allow_is_refused():
    data = json.loads(to_json(compile_source("brl 1\nparam a = 1\n").program))
    data["statements"][0]["colour"] = "red"
    with pytest.raises(IRFormatError, match="no field 'colour'"):
        from_json(json.dumps(data))


def test_words_in_the_ir_are_checked_and_features_recomputed():
    """An edited document cannot smuggle in an operator the evaluator would compute as another
    one, a sense other than minimize/maximize, or stale features."""
    text = ("brl 1\nmdp M = random_mdp(states = 3, actions = 2, discount = 0.5)\n"
            "var x[M.S, M.A] = 0\nlower M { temperature = 1  reward[s, a] = x[s, a] }\n"
            "param a = 7 - 2\nupper maximize value(M, policy)\n")
    data = json.loads(to_json(compile_source(text).program))
    param = data["statements"][3]
    upper = data["statements"][4]
    for node, field, bad in ((param["value"], "op", "%"), (upper, "sense", "sideways"),
                             (upper, "features", ["teleport"])):
        edited = json.loads(json.dumps(data))
        target = edited["statements"][3]["value"] if node is param["value"] \
            else edited["statements"][4]
        target[field] = bad
        with pytest.raises(IRFormatError, match="is not one of"):
            from_json(json.dumps(edited))
    stale = json.loads(json.dumps(data))
    stale["statements"][4]["features"] = ["entropy"]
    recomputed = from_json(json.dumps(stale)).statements[4].features
    assert list(recomputed) == data["statements"][4]["features"]
    enum = json_schema()["$defs"]["Binary"]["properties"]["op"]["enum"]
    assert "%" not in enum and "+" in enum


def test_library_misuse_gets_clear_errors():
    import pickle

    text = "brl 1\nparam lam = 0.5\nparam b = lam * 2\n"
    assert float(compile_source(text, overrides={"lam": 2}).names["b"].t) == 4.0
    with pytest.raises(TypeError, match="as brl text"):
        compile_source(text, overrides={"lam": object()})
    assert parse_source("brl 1\nparam a = 1\n").statements[0].name == "a"
    with pytest.raises(TypeError, match="use its .program"):
        to_json(compile_source(text))
    with pytest.raises(BrlError) as info:
        compile_source("brl 1\nparam a = b\n")
    again = pickle.loads(pickle.dumps(info.value))
    assert again.diagnostics == info.value.diagnostics and again.render() == info.value.render()


def test_lower_checks_the_device_and_the_shape_of_x():
    text = ("brl 1\nmdp M = random_mdp(states = 4, actions = 2, discount = 0.5)\n"
            "var x[M.S, M.A] = 0\nlower M { temperature = 1  reward[s, a] = x[s, a] }\n"
            "upper minimize norm2(x) - value(M, policy)\n")
    checked = compile_source(text)
    with pytest.raises(BrlError, match="unknown device 'bogus'"):
        lower(checked, device="bogus")
    problem = lower(checked, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"x has shape \(5, 2\)"):
        problem.reward(torch.zeros(5, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"pi has shape \(2, 4\), but the follower's policy"):
        problem.objective(problem.x0, torch.full((2, 4), 0.5, dtype=torch.float64))
    problem.x0 += 1  # each lowering has its own start
    assert float(lower(checked).x0.abs().sum()) == 0.0


def test_an_edited_ir_program_compiles():
    import dataclasses

    from bilevel_dsl import compile_program

    program = compile_source("brl 1\nparam lam = 0.5\nparam b = lam * 2\n").program
    edited = from_json(to_json(program))
    number = edited.statements[0].value
    edited = dataclasses.replace(edited, statements=(
        dataclasses.replace(edited.statements[0], value=dataclasses.replace(number, value=3.0)),
        edited.statements[1]))
    assert float(compile_program(edited).names["b"].t) == 6.0
    assert float(compile_program(edited, overrides={"lam": 1}).names["b"].t) == 2.0
    with pytest.raises(TypeError, match="takes a CheckedProgram"):
        lower(program)
