"""Golden tests of the diagnostics: the full rendered text of each error a user can cause.

Each case is `tests/golden/NAME.brl` (or bytes below) and its expected rendering
`tests/golden/NAME.txt`: `file:line:col: error[CODE]: message`, the source line, a caret under the
offending text, notes and a hint.  Regenerate with `BRL_UPDATE_GOLDEN=1 pytest
tests/test_diagnostics.py`, then review every changed file by eye.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from conftest import diagnostics

from bilevel_dsl import BrlError, compile_source
from bilevel_dsl.cli import solver_catalog
from bilevel_dsl.parser import decode

GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("BRL_UPDATE_GOLDEN") == "1"

# Cases that are not plain .brl text, or need command-line options.
RAW = {"not_utf8": b"brl 1\nparam caf\xe9 = 1\n", "nul_byte": b"brl 1\nparam a = 1\x00\n"}
OVERRIDES = {
    "override_int_given_real": {"n": "2.5"},
    "override_unknown_param": {"lamb": "0.1"},
    "override_wrong_shape": {"w": "[0, 1]"},
}
# The code each case must produce (first diagnostic), so a regenerated golden file cannot
# silently change what the case tests.
EXPECTED = {
    "missing_header": ["E100"],
    "unsupported_version": ["E102"],
    "empty_file": ["E101"],
    "not_utf8": ["E001"],
    "nul_byte": ["E001"],
    "syntax_missing_equals": ["E100"],
    "syntax_unterminated_string": ["E100"],
    "syntax_unexpected_eof": ["E100"],
    "syntax_assign_in_check": ["E100"],
    "syntax_chained_comparison": ["E100"],
    "syntax_bad_character": ["E100"],
    "syntax_several_statements": ["E100", "E100", "E100"],
    "syntax_reserved_word": ["E100"],
    "syntax_incomplete_statement": ["E100"],
    "undefined_name": ["E201"],
    "undefined_twice": ["E201", "E201"],
    "undefined_mdp_one_letter": ["E201"],
    "unknown_function": ["E201"],
    "unknown_mdp_part": ["E201"],
    "ambiguous_member": ["E201"],
    "duplicate_definition": ["E202"],
    "duplicate_var": ["E202"],
    "used_before_declaration": ["E203"],
    "shape_mismatch": ["E301"],
    "shape_mismatch_binary": ["E301"],
    "reward_four_indices": ["E302"],
    "too_many_indices": ["E302"],
    "wrong_index_set": ["E303"],
    "wrong_index_order_P": ["E303"],
    "index_out_of_range": ["E304"],
    "objective_not_scalar": ["E306"],
    "row_not_distribution": ["E401"],
    "row_negative": ["E401"],
    "discount_one": ["E402"],
    "discount_table": ["E402"],
    "temperature_zero": ["E403"],
    "temperature_negative": ["E403"],
    "gridworld_unknown_option": ["E404"],
    "gridworld_bad_map": ["E405"],
    "policy_in_param": ["E501"],
    "policy_without_lower": ["E501"],
    "data_missing": ["E601"],
    "data_wrong_shape": ["E602"],
    "data_outside": ["E603"],
    "bounds_reversed": ["E701"],
    "check_failed": ["E702"],
    "check_failed_array": ["E702"],
    "unknown_solver": ["E801"],
    "unknown_solver_option": ["E802"],
    "solver_option_type": ["E803"],
    "solver_option_range": ["E805", "E805"],
    "override_int_given_real": ["E305"],
    "override_unknown_param": ["E201"],
    "override_wrong_shape": ["E301"],
    "number_too_large": ["E901"],
    "nesting_too_deep": ["E902"],
    "chain_too_long": ["E902"],
}


def run_case(name: str) -> tuple[BrlError, str]:
    filename = f"{name}.brl"
    try:
        if name in RAW:
            text = decode(RAW[name], filename).text
        else:
            text = (GOLDEN / filename).read_text(encoding="utf-8")
        compile_source(text, filename, base_dir=GOLDEN, overrides=OVERRIDES.get(name),
                       solver_catalog=solver_catalog)
    except BrlError as err:
        rendered = err.render().replace(str(GOLDEN), "<golden>") + "\n"
        # the registry grows as solvers are written: the golden text does not list them
        rendered = re.sub(r"known solvers: [^\n]*", "known solvers: <the registry's list>",
                          rendered)
        return err, rendered
    pytest.fail(f"{filename} compiled without an error")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_golden(name: str):
    err, rendered = run_case(name)
    assert [d.code for d in err.diagnostics] == EXPECTED[name]
    golden = GOLDEN / f"{name}.txt"
    if UPDATE or not golden.exists():
        golden.write_text(rendered, encoding="utf-8")
        if not UPDATE:
            pytest.fail(f"wrote the missing golden file {golden.name}; review it and rerun")
    assert rendered == golden.read_text(encoding="utf-8")


def test_every_golden_file_has_a_case():
    inputs = {p.stem for p in GOLDEN.glob("*.brl")} | set(RAW)
    outputs = {p.stem for p in GOLDEN.glob("*.txt")}
    assert inputs == set(EXPECTED)
    assert outputs == set(EXPECTED)


# ------------------------------------------------------------------ structure of the rendering

LOCATION = re.compile(r"^(?P<file>[^:\n]+):(?P<line>\d+):(?P<col>\d+): error\[(?P<code>E\d{3})\]: ")


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if not n.startswith("override_u")))
def test_caret_sits_under_the_span(name: str):
    """The caret line marks exactly the text of the diagnostic's span (for one-line spans)."""
    err, _ = run_case(name)
    for diag in err.diagnostics:
        assert diag.span is not None, f"{name}: {diag.code} has no location"
        text = diag.span
        rendered = err.render().split("\n")
        head = next(i for i, line in enumerate(rendered)
                    if LOCATION.match(line) and f":{text.line}:{text.column}:" in line)
        source_line, caret_line = rendered[head + 1], rendered[head + 2]
        gutter = f"{text.line} | "
        assert source_line.startswith(gutter) and caret_line.startswith(" " * (len(gutter) - 2))
        shown, carets = source_line[len(gutter):], caret_line[len(gutter):]
        start = len(carets) - len(carets.lstrip(" "))
        width = len(carets.strip())
        assert set(carets.strip()) == {"^"}
        if text.end_line == text.line and not shown.startswith("..."):
            assert start == text.column - 1
            if shown.endswith("..."):  # a long line's window, cut on the right: so are the carets
                assert start + width == len(shown) - 3
            else:
                assert width == max(text.end_column - text.column, 1)


def test_each_error_is_located_with_a_code():
    for name in EXPECTED:
        if name == "override_unknown_param":
            continue  # a -D name that is not in the file: no place in the file to point at
        _, rendered = run_case(name)
        first = rendered.split("\n")[0]
        match = LOCATION.match(first)
        assert match, first
        assert match["file"] == f"{name}.brl"


def test_did_you_mean_hints():
    hints = {name: run_case(name)[0].diagnostics[0].hint for name in (
        "undefined_name", "unknown_function", "unknown_solver_option", "gridworld_unknown_option",
        "override_unknown_param", "unknown_mdp_part")}
    assert hints["undefined_name"] == "did you mean `lam`?"
    assert hints["unknown_function"] == "did you mean `norm`?"
    assert hints["unknown_solver_option"] == "did you mean `outer`?"
    assert hints["gridworld_unknown_option"] == "did you mean `slip`?"
    assert hints["override_unknown_param"] == "did you mean `lam`?"
    assert "R" in hints["unknown_mdp_part"]


def test_unknown_solver_lists_the_known_ones():
    hint = run_case("unknown_solver")[0].diagnostics[0].hint
    assert hint.startswith("known solvers: `m_sobirl`, `exact`") and hint.endswith("(or `auto`)")


def test_row_error_names_the_row_and_its_sum():
    diag = run_case("row_not_distribution")[0].diagnostics[0]
    assert "(s = 0, a = go)" in diag.message
    assert "sums to 0.9" in diag.message
    assert "2 more rows" in diag.message  # rows (0, go), (1, go) and (2, go) sum to 0.9


def test_check_failure_shows_both_sides():
    diag = run_case("check_failed")[0].diagnostics[0]
    assert diag.message == "check failed: p must be a distribution"
    assert diag.notes == ("left side = 0.9", "right side = 1")


# ------------------------------------------------------------------ several errors in one run


def test_independent_errors_are_all_reported():
    found = diagnostics("brl 1\nparam a = alpha\nparam b = 1\nparam c = betta + b\n"
                        "set S = 0..2\nparam d[S] = [1, 2]\nvar x[2] in [1, 0]\n")
    assert [(d.code, d.span.line) for d in found] == [
        ("E201", 2), ("E201", 4), ("E301", 6), ("E701", 7)]


def test_a_failed_declaration_does_not_cascade():
    # `a` fails; the uses of `a` below must not report again
    found = diagnostics("brl 1\nparam a = undefined_thing\nparam b = a + 1\nparam c[2] = b\n"
                        "check c[0] == 1\n")
    assert [(d.code, d.span.line) for d in found] == [("E201", 2)]


def test_errors_in_bilevel_parts_are_all_reported():
    found = diagnostics(
        "brl 1\nmdp M = random_mdp(states = 3, actions = 2, discount = 1.5)\n"
        "var x[3] = 0 in [2, 1]\nlower M { temperature = 0.1  reward[s, a] = 0 }\n"
        "upper minimize lam * norm2(x)\n")
    assert [d.code for d in found] == ["E402", "E701", "E201"]


def test_an_error_in_the_lower_block_does_not_hide_errors_in_the_objective():
    found = diagnostics(
        "brl 1\nmdp M = random_mdp(states = 4, actions = 2)\nvar x[M.S, M.A] = 0\n"
        "lower M { temperature = 0.5  reward[s, a] = sigmoyd(x[s, a]) }\n"
        "upper minimize norm2(x) - valu(M, policy)\n")
    assert [(d.code, d.span.line, d.hint) for d in found] == [
        ("E201", 4, "did you mean `sigmoid`?"), ("E201", 5, "did you mean `value`?")]


def test_hint_for_set_used_as_number():
    found = diagnostics("brl 1\nset S = 0..3\nparam n = S + 1")
    assert found[0].code == "E305" and "card(S)" in found[0].hint


def test_carets_count_screen_columns_under_wide_characters():
    """A CJK character takes two columns in a terminal: the carets under and after one must
    too, or they point at the wrong text."""
    with pytest.raises(BrlError) as info:
        compile_source('brl 1\nproblem p "漢字"\nparam b = "字字" + 1\n', "test.brl")
    source_line, caret_line = info.value.render().split("\n")[1:3]
    assert source_line == '3 | param b = "字字" + 1'
    assert caret_line == "  |           ^^^^^^"  # `"字字"`: 1 + 2 + 2 + 1 columns


def test_at_most_fifty_diagnostics_are_printed_per_file():
    text = "brl 1\n" + "".join(f"param p{i} = 1 +\n" for i in range(120))
    with pytest.raises(BrlError) as info:
        compile_source(text, "many.brl")
    assert len(info.value.diagnostics) == 120
    rendered = info.value.render()
    assert rendered.count("error[E100]") == 50
    assert rendered.endswith("many.brl: ... and 70 more errors")


def test_long_quotes_are_cut_and_the_prose_between_quotes_is_not():
    """Backticks are taken in pairs: a hint with two short quotes far apart was once cut
    between them, as if the prose were one long quote."""
    from bilevel_dsl.diagnostics import Diagnostic, render

    hint = "`lam` is declared with whole numbers, " + "so " * 30 + "write `1.0` there"
    name = "n" * 200
    text = render(Diagnostic("E305", f"unknown `{name}`", None, hint), None)
    assert hint in text and f"`{'n' * 77}...`" in text and name not in text


def test_a_program_checked_without_its_text_is_located_without_an_empty_excerpt():
    from bilevel_dsl import compile_program, parse_source
    from bilevel_dsl.diagnostics import SourceFile

    program = parse_source(SourceFile("p.brl", "brl 1\nparam a = b\n"))
    with pytest.raises(BrlError) as info:
        compile_program(program)
    rendered = info.value.render()
    assert rendered.startswith("p.brl:2:11: error[E201]") and "2 |" not in rendered
    with pytest.raises(BrlError) as info:  # given the text, it is quoted
        compile_program(program, "brl 1\nparam a = b\n")
    assert "2 | param a = b" in info.value.render()
