"""Semantic analysis: names, sets, shapes, MDP parts, the bilevel blocks and `check`."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import codes, compile_ok, diagnostics, param, value

MDP = "brl 1\nmdp M = random_mdp(states = 3, actions = 2, discount = 0.8)\n"
FOLLOWER = MDP + "var x[M.S, M.A] = 0\nlower M { temperature = 1  reward[s, a] = x[s, a] }\n"


def first(text: str, **kwargs):
    found = diagnostics(text, **kwargs)
    return found[0]


# ------------------------------------------------------------------ names


def test_undefined_name_suggests_a_close_one():
    diag = first("brl 1\nparam discount_rate = 0.9\nparam r = discount_rat * 2")
    assert diag.code == "E201" and diag.hint == "did you mean `discount_rate`?"
    assert (diag.span.line, diag.span.column, diag.span.end_column) == (3, 11, 23)
    assert first("brl 1\nparam r = zzz").hint is None  # nothing close: no guess


def test_used_before_declaration_is_e203_not_e201():
    diag = first("brl 1\nparam a = b + 1\nparam b = 2")
    assert diag.code == "E203" and "line 3" in diag.message
    # an MDP named by a lower block before its declaration, too
    diag = first("brl 1\nlower M { temperature = 1  reward[s, a] = 0 }\n"
                 "mdp M = random_mdp(states = 3, actions = 2)")
    assert diag.code == "E203" and diag.message == "`M` is used before its declaration on line 3"


def test_duplicates_and_builtin_names():
    assert codes("brl 1\nset S = 0..1\nparam S = 1") == ["E202"]
    assert codes("brl 1\nparam exp = 1") == ["E202"]  # a function name
    assert codes("brl 1\nparam policy = 1") == ["E202"]
    assert codes("brl 1\nparam inf = 1") == ["E202"]
    assert codes("brl 1\nseed 1\nseed 2") == ["E202"]
    assert codes("brl 1\nproblem a\nproblem b") == ["E202"]
    assert codes("brl 1\nset S = {a, b, a}") == ["E202"]
    assert codes(FOLLOWER + "upper minimize norm2(x)\nupper minimize norm2(x)") == ["E202"]
    assert codes(FOLLOWER + "lower M { temperature = 1  reward[s, a] = 0 }") == ["E202"]
    assert codes("brl 1\nparam v[i in 2, i in 2] = 0") == ["E202"]
    assert codes("brl 1\nparam v = sum {i in 0..1, i in 0..1} i") == ["E202"]
    assert codes("brl 1\nparam v = sum {i in 0..1} sum {i in 0..1} i") == ["E202"]


def test_function_used_as_a_name():
    diag = first("brl 1\nparam a = exp + 1")
    assert diag.code == "E305" and "exp(...)" in diag.message


def test_unknown_function_and_arity():
    assert first("brl 1\nparam a = expp(1)").hint == "did you mean `exp`?"
    assert codes("brl 1\nparam a = exp(1, 2)") == ["E305"]
    assert codes("brl 1\nparam a = card(1)") == ["E305"]
    assert codes("brl 1\nparam a = dot([1, 2], [1, 2, 3])") == ["E301"]
    assert codes("brl 1\nparam a = quad([1, 2], [[1, 2]])") == ["E301"]


def test_members_positions_and_ambiguity():
    prelude = "set Light = {red, amber, green}\nset Flag = {green, red}"
    assert value("Light.green", prelude) == 2
    assert value("amber", prelude) == 1  # unambiguous bare member
    diag = first("brl 1\n" + prelude + "\nparam g = green")
    assert diag.code == "E201" and "ambiguous" in diag.message
    assert diag.hint == "name its set, e.g. `Light.green`"
    assert first("brl 1\n" + prelude + "\nparam g = Light.purple").code == "E201"
    # the actions of a grid world are members too
    checked = compile_ok('brl 1\nmdp maze = gridworld(map = "S.G")\ncheck right == 3\n'
                         "check maze.A.left == 2")
    assert checked.checks == 2


def test_a_set_or_mdp_used_as_a_number():
    diag = first("brl 1\nset S = 0..3\nparam n = 2 * S")
    assert diag.code == "E305" and diag.hint == "to count its elements write `card(S)`"
    diag = first(MDP + "param n = M + 1")
    assert diag.code == "E305" and "M.P" in diag.hint
    assert codes('brl 1\nparam n = "text" * 2') == ["E305"]


# ------------------------------------------------------------------ sets and indexing


def test_index_from_another_set_is_e303_even_when_sizes_agree():
    diag = first("brl 1\nset S = {a, b}\nset T = {c, d}\nparam v[S] = [1, 2]\n"
                 "param w = sum {t in T} v[t]")
    assert diag.code == "E303" and diag.hint == "use an index that ranges over `S`"
    assert (diag.span.line, diag.span.column) == (5, 26)


def test_integer_expressions_index_any_dimension():
    prelude = "set S = 0..3\nparam v[S] = [10, 20, 30, 40]"
    assert param(prelude + "\nparam result[i in S] = v[3 - i]").tolist() == [40, 30, 20, 10]
    assert param(prelude + "\nparam result[i in S] = v[min(i + 1, 3)]").tolist() == [
        20, 30, 40, 40]
    assert value("v[1] + v[3]", prelude) == 60


def test_ranges_index_by_value():
    # a set that starts at 1 is indexed by its own values
    assert value("v[1] + v[3]", "set S = 1..3\nparam v[S] = [10, 20, 30]") == 40
    assert first("brl 1\nset S = 1..3\nparam v[S] = [10, 20, 30]\nparam a = v[0]").code == "E304"
    # a dimension given by a size is numbered from 0: v[i] and v[1] agree when i is 1
    prelude = "param v[3] = [10, 20, 30]"
    assert value("sum {i in 1..2} v[i]", prelude) == value("v[1] + v[2]", prelude) == 50
    assert first("brl 1\n" + prelude + "\nparam a = sum {i in 1..3} v[i]").code == "E304"
    assert value("sum {i in 0..2} v[i]", prelude) == 60
    # ... and so is a range from 0 that covers part of it, like `k + 0` would
    assert value("sum {k in 0..1} v[k]", prelude) == value("sum {k in 0..1} v[k + 0]",
                                                           prelude) == 30
    assert first("brl 1\n" + prelude + "\nparam a = sum {k in 0..3} v[k]").code == "E304"
    assert value("sum {k in K} v[k]", "set K = 0..1\n" + prelude) == 30
    # named members and an MDP's states are not numbers: their size must match (E303)
    assert first("brl 1\nset L = {red, green}\n" + prelude
                 + "\nparam a = sum {l in L} v[l]").code == "E303"
    assert first("brl 1\nmdp M = random_mdp(states = 2, actions = 2)\n" + prelude
                 + "\nparam a = sum {s in M.S} v[s]").code == "E303"


def test_index_errors():
    prelude = "brl 1\nset S = 0..3\nparam v[S] = 1\n"
    assert first(prelude + "param a = v[4]").code == "E304"
    assert first(prelude + "param a = v[-1]").code == "E304"
    assert first(prelude + "param a = v[0.5]").code == "E305"
    assert first(prelude + "param a = v[0, 0]").code == "E302"
    assert first(prelude + "param a = v[[0, 1]]").code == "E301"
    assert first(prelude + "param a[i in S] = v[j]").code == "E201"


def test_unbound_index_in_a_plain_declaration():
    diag = first("brl 1\nset S = 0..2\nparam v[S] = sum {i in S} i * 0\nparam w[S] = v[i]")
    assert diag.code == "E201"
    checked = compile_ok("brl 1\nset S = 0..2\nparam a[s in S] = s\nparam b = a")
    assert checked.names["b"].t.tolist() == [0.0, 1.0, 2.0]


def test_ranges_must_be_integer_and_forward():
    assert codes("brl 1\nset S = 0..2.5") == ["E305"]
    assert codes("brl 1\nset S = 3..1") == ["E301"]
    assert codes("brl 1\nset S = 0..100000000") == ["E301"]
    assert compile_ok("brl 1\nset S = 3..2\ncheck card(S) == 0").checks == 1


def test_dimensions():
    assert codes("brl 1\nparam v[0] = 1") == ["E301"]
    assert codes("brl 1\nparam v[2.5] = 1") == ["E305"]
    assert codes("brl 1\nparam v[[1, 2]] = 1") == ["E305"]
    assert param("param n = 2\nparam result[n, n + 1] = 7").shape == (2, 3)


# ------------------------------------------------------------------ shapes and params


def test_shape_errors():
    assert first("brl 1\nparam w[3] = [1, 2]").code == "E301"
    assert first("brl 1\nparam w[2, 2] = [1, 2]").code == "E301"
    assert first("brl 1\nparam w = [1, 2] + [1, 2, 3]").code == "E301"
    assert first("brl 1\nparam w = [[1, 2], [3]]").code == "E301"
    assert first("brl 1\nparam w[s in 2] = [s, s]").code == "E301"


def test_broadcasting_and_literals():
    assert param("param result[2, 3] = 5").tolist() == [[5.0] * 3] * 2
    assert param("param result = [1, 2] * 2 + [10, 20]").tolist() == [12.0, 24.0]
    assert param("param result[i in 0..1, j in 0..2] = 10 * i + j").tolist() == [
        [0.0, 1.0, 2.0], [10.0, 11.0, 12.0]]


def test_params_must_be_finite_unless_infinity():
    assert codes("brl 1\nparam a = log(0)") == ["E305"]
    assert codes("brl 1\nparam a = 0 / 0") == ["E305"]
    assert value("-inf") == float("-inf")


def test_draw_errors():
    assert codes("brl 1\nparam a = normal(0, 1)") == ["E305"]  # needs `~`
    assert codes("brl 1\nparam a ~ normal(0)") == ["E305"]
    assert codes("brl 1\nparam a ~ normal(0, -1)") == ["E305"]
    assert codes("brl 1\nparam a ~ uniform(1, 0)") == ["E305"]
    assert codes("brl 1\nparam a ~ bernoulli(2)") == ["E305"]
    assert codes("brl 1\nparam a ~ normal([0, 1], 1)") == ["E301"]


def test_overrides_replace_params():
    checked = compile_ok("brl 1\nparam n = 3\nparam lam = 0.5\nparam w[3] = [1, 2, 3]\n"
                         "param twice = 2 * lam",
                         overrides={"n": "4", "lam": "1", "w": "[0, 0, 1]"})
    assert float(checked.names["n"].t) == 4 and checked.names["n"].kind == "int"
    assert float(checked.names["twice"].t) == 2.0  # later declarations see the new value
    assert checked.names["w"].t.tolist() == [0.0, 0.0, 1.0]
    # one number fills an array param, as in a declaration (docs/language.md)
    filled = compile_ok("brl 1\nparam w[3] = [1, 2, 3]", overrides={"w": "0"})
    assert filled.names["w"].t.tolist() == [0.0, 0.0, 0.0]


def test_overrides_take_numpy_and_torch_numbers_and_arrays():
    """What a notebook holds: `for lam in np.linspace(...)` gives np.float64 (whose repr is
    `np.float64(0.1)` under numpy 2), data lives in arrays."""
    import numpy as np

    text = "brl 1\nparam n = 3\nparam lam = 0.5\nparam w[2, 2] = [[1.0, 2], [3, 4]]"
    checked = compile_ok(text, overrides={"n": np.int64(4), "lam": np.float64(0.1),
                                          "w": np.array([[0.5, 1.5], [2.5, 1e-20]])})
    assert float(checked.names["n"].t) == 4 and checked.names["n"].kind == "int"
    assert float(checked.names["lam"].t) == 0.1
    assert checked.names["w"].t.tolist() == [[0.5, 1.5], [2.5, 1e-20]]
    checked = compile_ok(text, overrides={"lam": torch.tensor(0.25), "w": [[1, 2], [3, 4.5]]})
    assert float(checked.names["lam"].t) == 0.25
    assert checked.names["w"].t.tolist() == [[1, 2], [3, 4.5]]
    for bad in (True, None, [[1], [2, 3]], np.array([]), {"a": 1}):
        with pytest.raises(TypeError, match="as brl text"):
            compile_ok(text, overrides={"w": bad})


def test_override_errors():
    base = "brl 1\nparam n = 3\nparam lam = 0.5\nparam w[3] = [1, 2, 3]\nset S = 0..1\n"
    diag = first(base, overrides={"n": "2.5"})
    assert diag.code == "E305" and "integer" in diag.message and diag.span.line == 2
    diag = first(base, overrides={"lamb": "1"})
    assert diag.code == "E201" and diag.hint == "did you mean `lam`?" and diag.span is None
    assert first(base, overrides={"w": "[1, 2]"}).code == "E301"
    assert first(base, overrides={"w": "[[1, 2, 3]]"}).code in ("E301", "E305")
    assert first(base, overrides={"lam": "[1]"}).code == "E305"
    assert first(base, overrides={"S": "1"}).code == "E201"
    assert first(base, overrides={"lam": "1 +"}).code == "E100"


# ------------------------------------------------------------------ variables and lets


def test_var_errors():
    assert codes("brl 1\nvar x[2] in [1, 0]") == ["E701"]
    assert codes("brl 1\nvar x[2] in [[0, 2], [1, 1]]") == ["E701"]
    assert codes("brl 1\nvar x[2] in [[0, 0, 0], 1]") == ["E301"]
    assert codes("brl 1\nvar x[2] = [1, 2, 3]") == ["E301"]
    assert codes("brl 1\nvar x[2] = log(0)") == ["E305"]
    diag = first("brl 1\nvar x[2]\nvar y[2]")
    assert diag.code == "E202" and "array" in diag.hint


@pytest.mark.parametrize(("bounds", "column", "message"), [
    ("[0/0, 1]", 18, "the lower bound of `x` is NaN (not a number)"),
    ("[0, [1, 0/0]]", 21, "the upper bound of `x` is NaN (not a number)"),
    ("[inf, inf]", 18, "the lower bound of `x` is inf, which no number is above"),
    ("[-inf, -inf]", 24, "the upper bound of `x` is -inf, which no number is below"),
])
def test_a_bound_no_number_can_meet_is_located(bounds, column, message):
    """(it passed the check, and a solve then blamed the reward, NaN at the projected x0)"""
    diag = first(f"brl 1\nvar x[2] = 0 in {bounds}")
    assert (diag.code, diag.message, diag.span.line, diag.span.column) == ("E701", message, 2,
                                                                          column)
    assert compile_ok("brl 1\nvar x[2] = 0 in [-inf, inf]").var.lower is not None


@pytest.mark.parametrize(("define", "message"), [
    ({"lam": "1/0"}, "-D lam: the value is not finite (lam is inf)"),
    ({"x": "[0/0, 1]"}, "-D x: the start is not finite (NaN or infinity)"),
])
def test_a_define_that_is_not_finite_is_placed_at_its_declaration(define, message):
    diag = first("brl 1\nparam lam = 0.05\nvar x[2] = 0 in [-1, 1]", overrides=define)
    name = next(iter(define))
    assert (diag.code, diag.message) == ("E305", message)
    assert (diag.span.line, diag.span.column) == ((2, 7) if name == "lam" else (3, 5))


def test_a_define_using_a_later_name_says_so():
    diag = first("brl 1\nparam lam = 0.05\nparam later = 2", overrides={"lam": "later"})
    assert (diag.code, diag.message) == ("E203", "-D lam: `later` is declared on line 3, "
                                                 "after `lam`")
    assert first("brl 1\nparam lam = 0.05", overrides={"lam": "nowhere"}).code == "E201"


def test_bounds_error_names_the_entry():
    diag = first("brl 1\nvar x[2, 2] = 0 in [[[0, 0], [0, 5]], 1]")
    assert diag.code == "E701" and "x[1, 1]" in diag.message and "5" in diag.message


def test_params_cannot_use_the_variable_but_lets_can():
    diag = first("brl 1\nvar x[2] = [1, 2]\nparam p = x[0]")
    assert diag.code == "E305" and "let" in diag.hint
    checked = compile_ok("brl 1\nvar x[2] = [1, 2]\nlet p = x[0] + x[1]\ncheck p == 3")
    assert checked.checks == 1


def test_let_tables_and_errors():
    checked = compile_ok(MDP + "let r[s in M.S, a in M.A] = s + 10 * a\ncheck r[2, 1] == 12")
    assert checked.checks == 1
    assert codes("brl 1\nlet r[s in 0..1] = t") == ["E201"]


# ------------------------------------------------------------------ MDPs


def test_table_parts():
    checked = compile_ok(
        "brl 1\nset Cell = 0..2\nset Move = {stay, go}\nmdp T = table {\n"
        "  states = Cell\n  actions = Move\n  discount = 0.5\n"
        "  initial[s] = if s == 0 then 1 else 0\n"
        "  transition[s, a, t] = if a == go then (if t == min(s + 1, 2) then 1 else 0)\n"
        "                        else (if t == s then 1 else 0)\n"
        "  reward[s, a, t] = if t == 2 then 1 else 0\n  terminal = {2}\n}\n")
    mdp = checked.names["T"]
    assert (mdp.states.size, mdp.actions.members, mdp.discount) == (3, ("stay", "go"), 0.5)
    assert mdp.initial.tolist() == [1.0, 0.0, 0.0]
    assert mdp.terminal.tolist() == [False, False, True]
    # reward[s, a, t] is averaged over the next state
    assert mdp.reward.tolist() == [[0.0, 0.0], [0.0, 1.0], [1.0, 1.0]]


def test_table_parts_may_name_the_tables_own_sets():
    """An inline action set's members, and `T.S` and `T.A`, are usable in the table's own
    parts; its other parts are not defined yet and say so."""
    table = ("brl 1\nmdp T = table {{\n  states = {{lo, hi}}\n  actions = {{hold, buy}}\n"
             "  transition[s, a, t] = if a == {} then (if t == hi then 1 else 0)\n"
             "                        else (if t == s then 1 else 0)\n"
             "  reward[s, a] = if s == T.S.hi then 1 else 0\n}}")
    for buy in ("buy", "T.A.buy"):
        mdp = compile_ok(table.format(buy)).names["T"]
        assert mdp.transitions.dense()[:, 1, 1].tolist() == [1.0, 1.0]
        assert mdp.reward.tolist() == [[0.0, 0.0], [1.0, 1.0]]
    assert first(table.format("T.A.bye")).hint == "did you mean `buy`?"
    diag = first(table.format("T.R[s, a]"))
    assert diag.code == "E203" and "own definition" in diag.message
    after = compile_ok(table.format("buy") + "\nparam b = T.A.buy").names  # the MDP by then
    assert float(after["b"].t) == 1.0 and after["T"].reward.shape == (2, 2)


def test_table_defaults():
    mdp = compile_ok("brl 1\nmdp T = table { states = 4  actions = 2 "
                     "transition[s, a, t] = 0.25 }").names["T"]
    assert mdp.discount == 0.9 and mdp.initial.tolist() == [0.25] * 4
    assert mdp.reward.abs().sum() == 0 and not mdp.terminal.any()


def test_table_errors():
    table = "brl 1\nmdp T = table {{ states = 2  actions = 1  {} }}"
    assert codes(table.format("transition[s, a, t] = 0.4")) == ["E401"]
    assert codes(table.format("transition[s, a, t] = 0.5  initial[s] = 0.3")) == ["E401"]
    assert codes(table.format("transition[s, a, t] = 0.5  discount = 1")) == ["E402"]
    assert codes(table.format("transition[s, a] = 0.5")) == ["E302"]
    assert codes(table.format("transition[s, a, t] = 0.5  rewrd[s, a] = 1")) == ["E404"]
    assert codes(table.format("transition[s, a, t] = 0.5  transition[s, a, t] = 0.5")) == [
        "E202"]
    assert codes(table.format("")) == ["E404"]
    assert codes(table.format("transition[s, a, t] = 0.5  terminal = {7}")) == ["E201"]
    assert first(table.format("transition[s, a, t] = 0.5  terminal = {7}")).hint == \
        "the states run from 0 to 1"
    assert codes(table.format("transition[s, a, t] = 0.5  terminal = [1]")) == ["E301"]
    assert codes(table.format("transition[s, a, t] = 0.5  reward[s, a] = log(0)")) == ["E305"]
    assert first(table.format("transition[s, a, t] = 0.5  rewrd[s, a] = 1")).hint == \
        "did you mean `reward`?"


def test_terminal_states_may_have_empty_rows():
    good = ("brl 1\nmdp T = table { states = 3  actions = 1\n"
            "  transition[s, a, t] = if s == 2 then 0 else 1 / 3\n  terminal = {2} }")
    assert compile_ok(good).names["T"].terminal.tolist() == [False, False, True]
    assert codes(good.replace("terminal = {2}", "")) == ["E401"]
    vector = good.replace("terminal = {2}", "terminal = [0, 0, 1]")
    assert compile_ok(vector).names["T"].terminal.tolist() == [False, False, True]


def test_default_initial_leaves_terminal_states_out():
    """An episode cannot run from a terminal state, so the default start is uniform over the
    others: a terminal state's own reward must not enter value(M, policy) by default."""
    table = ("brl 1\nmdp T = table {{ states = 3  actions = 1\n"
             "  transition[s, a, t] = if s == 2 then 0 else 1 / 3\n  {} }}")
    assert compile_ok(table.format("terminal = {2}")).names["T"].initial.tolist() == [
        0.5, 0.5, 0.0]
    everything = table.format("terminal = {0, 1, 2}").replace("if s == 2 then 0 else 1 / 3", "0")
    assert compile_ok(everything).names["T"].initial.tolist() == [1 / 3] * 3


def test_row_error_reports_the_first_bad_row():
    diag = first("brl 1\nset S = {a, b, c}\nmdp T = table { states = S  actions = 2\n"
                 "  transition[s, x, t] = if s == b and x == 1 then 0.25 else 1 / 3 }")
    assert diag.code == "E401"
    assert "(s = b, a = 1)" in diag.message and "0.75" in diag.message
    assert "more" not in diag.message


def test_generators_options():
    assert codes("brl 1\nmdp M = random_mdp(4, 2)") == ["E404"]
    assert codes("brl 1\nmdp M = random_mdp(states = 4)") == ["E404"]
    assert codes("brl 1\nmdp M = random_mdp(states = 4, actions = 2, succesors = 2)") == [
        "E404"]
    assert codes("brl 1\nmdp M = random_mdp(states = 2.5, actions = 2)") == ["E305"]
    assert codes("brl 1\nmdp M = random_mdp(states = 0, actions = 2)") == ["E301"]
    assert codes("brl 1\nmdp M = random_mdp(states = 4, actions = 2, successors = 5)") == [
        "E301"]
    assert codes("brl 1\nmdp M = random_mdp(states = 600, actions = 2)") == ["E404"]
    assert codes("brl 1\nmdp M = random_mdp(states = 600, actions = 2, successors = 300)") == [
        "E301"]
    assert codes("brl 1\nmdp M = random_mdp(states = 4, actions = 2, discount = 1)") == ["E402"]
    # every unknown option is reported, and a bad discount does not hide later errors
    assert codes("brl 1\nmdp M = random_mdp(state = 4, actions = 2, gamma = 0.5)") == [
        "E404", "E404"]
    assert codes("brl 1\nmdp M = random_mdp(states = 4, actions = 2, gamma = 0.5)\n"
                 "param p = M.Q") == ["E404", "E201"]
    assert codes("brl 1\nmdp M = random_mdp(states = 4, actions = 2, discount = 1)\n"
                 "var x[M.S] in [1, 0]") == ["E402", "E701"]
    assert codes('brl 1\nmdp M = gridworld(map = "S#G", slip = 2)') == ["E405", "E405"]
    assert codes("brl 1\nmdp M = mazeworld(map = \"S.G\")") == ["E404"]
    assert first("brl 1\nmdp M = gridwrld(map = \"S.G\")").hint == "did you mean `gridworld`?"
    assert codes("brl 1\nmdp M = table(states = 2)") == ["E404"]
    assert codes("brl 1\nmdp M = gridworld { map = \"S.G\" }") == ["E404"]


def test_gridworld_map_errors():
    grid = 'brl 1\nmdp M = gridworld(map = {})'
    assert codes(grid.format('"S#G"')) == ["E405"]  # unreachable goal
    assert codes(grid.format('"SSG"')) == ["E405"]
    assert codes(grid.format('"S.."')) == ["E405"]
    assert codes(grid.format('""')) == ["E405"]
    assert codes(grid.format('"S.G", slip = 1.5')) == ["E405"]
    assert codes(grid.format("3")) == ["E305"]
    assert codes("brl 1\nmdp M = gridworld()") == ["E404"]
    diag = first('brl 1\nmdp M = gridworld(map = """\n  S..\n  ..G.\n""")')
    assert diag.code == "E405" and (diag.span.line, diag.span.column) == (4, 3)
    diag = first('brl 1\nmdp M = gridworld(map = "S.?G")')
    assert (diag.span.line, diag.span.column) == (2, 28)  # under the `?`


def test_mdp_parts():
    checked = compile_ok(MDP + "check card(M.S) == 3 and card(M.A) == 2\n"
                         "check M.discount == 0.8\ncheck sum {t in M.S} M.P[0, 1, t] == 1\n"
                         "check sum {s in M.S} M.initial[s] == 1\ncheck sum(M.terminal) == 0\n"
                         "check sum(M.R) == 0")
    assert checked.checks == 6
    diag = first(MDP + "param r = M.reward")
    assert diag.code == "E201" and diag.hint.startswith("its parts are S, A, P, R,")
    assert first(MDP + "param r = M.initail").hint == "did you mean `initial`?"


# ------------------------------------------------------------------ the bilevel blocks


def test_lower_block_checks():
    assert codes(MDP + "var x[M.S, M.A] = 0\nlower M { temperature = 0  reward[s, a] = 0 }") == [
        "E403"]
    assert codes(MDP + "lower M { temperature = -1  reward[s, a] = 0 }") == ["E403"]
    assert codes(MDP + "lower M { temperature = 1 }") == ["E404"]
    assert codes(MDP + "lower M { reward[s, a] = 0 }") == ["E404"]
    assert codes(MDP + "lower M { temperature = 1  reward[s, a] = 0  bonus = 1 }") == ["E404"]
    assert codes(MDP + "lower M { temperature = 1  reward[s, a, t, u] = 0 }") == ["E302"]
    assert codes(MDP + "lower M { temperature = 1  reward[s] = 0 }") == ["E302"]
    assert codes(MDP + "lower M { temperature = 1  reward[s, s] = 0 }") == ["E202"]
    assert codes(MDP + "lower N { temperature = 1  reward[s, a] = 0 }") == ["E201"]
    assert codes(MDP + "set S = 0..1\nlower S { temperature = 1  reward[s, a] = 0 }") == ["E305"]
    assert codes(MDP + "lower M { temperature = [1, 2]  reward[s, a] = 0 }") == ["E301"]
    assert codes(MDP + "lower M { temperature[s] = 1  reward[s, a] = 0 }") == ["E302"]


def test_errors_point_at_the_mistake_and_suggest_the_fix():
    """A policy let used in a reward is reported where the reward uses it (not at the let,
    which is legal); a misspelt bare member or reward index gets a suggestion."""
    text = FOLLOWER.replace("var x", "let pol = policy\nvar x").replace(
        "x[s, a] }", "x[s, a] + pol[s, a] }")
    diag = first(text)
    assert diag.code == "E501" and diag.span.line == 5 and "`pol`" in diag.message
    members = "brl 1\nset Colors = {red, green, blue}\nparam c[Colors] = [1, 2, 3]\n"
    assert first(members + "param b = c[bleu]").hint == "did you mean `blue`?"
    next_state = FOLLOWER.replace("x[s, a] }", "x[s, a] + M.R[t, a] }")
    assert first(next_state).hint.startswith("if `t` is the next state, name it: "
                                             "`reward[s, a, t] = ...`")
    swapped = FOLLOWER.replace("reward[s, a] = x[s, a]", "reward[a, s] = x[s, a]")
    assert first(swapped).hint == ("the reward's indices are positional: `a` ranges over the "
                                   "states, `s` ranges over the actions")


def test_independent_errors_are_all_reported():
    """Reversed bounds, a bad temperature, a bad initial distribution or discount no longer
    hide the errors after them."""
    text = (MDP + "var x[M.S, M.A] = 0 in [1, -1]\n"
            "lower M { temperature = -1  reward[s, a] = x[s, a] + nosuch }\n"
            "upper minimize norm2(x) - vallue(M, policy)\n")
    assert codes(text) == ["E701", "E403", "E201", "E201"]
    table = ("brl 1\nmdp T = table { states = 3  actions = 2\n"
             "  transition[s, a, t] = if t == s then 1 else 0\n"
             "  initial = [0.5, 0.5]\n  discount = 1 }\n"
             "var x[T.S, T.A] = 0\nlower T { temperature = 0  reward[s, a] = x[s, a] }\n")
    assert codes(table) == ["E301", "E402", "E403"]
    # every misspelt part of a block, every unknown option of a gym MDP
    assert codes(MDP + "var x[M.S, M.A] = 0\nlower M { temprature = 1  rewards[s, a] = 0 }") == [
        "E404", "E404"]
    assert codes('brl 1\nmdp env = gym("CartPole-v1", entry_point = "x", render_mode = "h")'
                 ) == ["E404", "E404"]


def test_recovery_never_reports_a_cascade_or_judges_a_stand_in():
    """A part that uses a failed declaration is not an error of its own (no `E000 cascade`),
    and a `check` that reads a stand-in (the discount replaced after E402) is not judged."""
    table = ("brl 1\nparam p0[3] = [0.5, 0.5]\nmdp m = table {{ states = 3  actions = 2\n"
             "  transition[s, a, t] = if t == s then 1 else 0\n  {} }}\n")
    assert codes(table.format("initial[s] = p0[s]")) == ["E301"]
    assert codes(table.format("initial[s] = 1 / 3") + "var x[m.S] = 0",
                 overrides={"x": "p0"}) == ["E301"]
    assert codes(table.format("discount = 1") + "check m.discount >= 0.95") == ["E301", "E402"]
    assert codes(table.format("discount = 0.5") + "check m.discount >= 0.95") == ["E301",
                                                                                 "E702"]


def test_a_failing_check_shows_values_that_differ():
    diag = first("brl 1\nparam p[3] = [0.2, 0, 0.4]\ncheck sum(p) == 0.6")
    assert diag.notes == ("left side = 0.6000000000000001", "right side = 0.6")
    assert "tolerance" in diag.hint


def test_reward_shape_and_index_errors():
    assert codes(FOLLOWER.replace("x[s, a] }", "x[s] }")) == ["E301"]
    # the hint names the index that is missing and writes the expression out
    assert first(FOLLOWER.replace("x[s, a] }", "x[s] }")).hint.startswith(
        "index its last dimension with `a` too: `x[s, a]`")
    assert first(FOLLOWER.replace("x[s, a] }", "x }")).hint.startswith(
        "index it with `s`, `a`: `x[s, a]`")
    assert first(FOLLOWER.replace("x[s, a] }", "2 * x[s] }")).hint.startswith(
        "index its last dimension with `a` too, or")
    assert codes(FOLLOWER.replace("x[s, a] }", "x[a, s] }")) == ["E303"]
    assert codes(FOLLOWER.replace("x[s, a] }", "x[s, b] }")) == ["E201"]
    assert codes(FOLLOWER.replace("x[s, a] }", "log(x[s, a]) }")) == ["E305"]


def test_policy_outside_the_upper_objective():
    assert codes(MDP + "param p[M.S, M.A] = policy") == ["E501"]
    assert codes(FOLLOWER + "let e = entropy(policy)\ncheck e[0] > 0") == ["E501"]
    diag = first(MDP + "var x[M.S, M.A] = 0\nupper maximize value(M, policy)")
    assert diag.code == "E501" and (diag.span.line, diag.span.column) == (4, 16)
    assert codes(MDP + "lower M { temperature = 1  reward[s, a] = policy[s, a] }") == ["E501"]


def test_upper_objective_checks():
    assert codes(FOLLOWER + "upper minimize x") == ["E306"]
    assert codes(FOLLOWER + "upper minimize policy") == ["E306"]
    assert codes(FOLLOWER + "upper maximize value(M, x)") == ["E305"]
    assert codes(FOLLOWER + "upper maximize value(M, policy, x[0])") == ["E301"]
    assert codes(FOLLOWER + "upper maximize value(M, policy, reward = M.R, horizon = 3)") == [
        "E305"]
    assert codes(FOLLOWER + "upper maximize expected_return(M, policy)") == ["E305"]
    assert codes(FOLLOWER + "upper maximize expected_return(M, policy, horizon = 0)") == [
        "E305"]
    assert codes(FOLLOWER + "upper minimize preference_loss(M, policy, horizon = 3)") == [
        "E305"]
    assert codes(FOLLOWER + "upper minimize preference_loss(M, policy, truth = M.R, "
                 "horizon = 3, noise = 0.9)") == ["E305"]
    assert codes(FOLLOWER + "mdp K = random_mdp(states = 4, actions = 2)\n"
                 "upper maximize value(K, policy)") == ["E301"]


def test_upper_objective_forms_compile():
    for objective in (
        "value(M, policy)",
        "value(M, policy, M.R + 1)",
        "value(M, policy, reward = x)",
        "sum {s in M.S, a in M.A} occupancy(M, policy)[s, a] * x[s, a]",
        "sum {s in M.S} entropy(policy)[s]",
        "sum {s in M.S, a in M.A} policy[s, a]^2",
        "expected_return(M, policy, horizon = 5, reward = M.R)",
        "preference_loss(M, policy, truth = M.R, horizon = 4, pairs = 8, scale = 1, "
        "noise = 0.1, model = x)",
    ):
        checked = compile_ok(FOLLOWER + f"upper maximize {objective}")
        assert checked.upper.sense == "maximize"


def test_upper_may_come_before_what_it_uses():
    checked = compile_ok("brl 1\nupper minimize norm2(x) - value(M, policy)\n"
                         "solve exact\nmdp M = random_mdp(states = 3, actions = 2)\n"
                         "var x[M.S, M.A] = 0\n"
                         "lower M { temperature = 1  reward[s, a] = x[s, a] }")
    assert checked.upper is not None and checked.solve.solver == "exact"


def test_checks_see_the_variable_at_its_initial_value():
    checked = compile_ok("brl 1\nvar x[2] = [3, 4] in [0, 3]\nlet n = norm2(x)\ncheck n == 18")
    assert checked.checks == 1
    diag = first("brl 1\nvar x[2] = [3, 4]\ncheck x[0] > x[1], \"ordered\"")
    assert diag.code == "E702" and diag.message == "check failed: ordered"
    assert diag.notes == ("left side = 3", "right side = 4")


def test_checks_of_arrays_count_failures():
    diag = first("brl 1\nparam w[4] = [1, -2, 3, -4]\ncheck w >= 0")
    assert diag.notes[-1] == "2 of 4 elements are false"
    assert compile_ok("brl 1\nparam w[2] = [1, 2]\ncheck w > 0").checks == 1


def test_solve_statement_without_a_catalog_is_not_validated():
    checked = compile_ok(FOLLOWER + "upper minimize norm2(x)\nsolve whatever(speed = fast)")
    assert checked.solve.solver == "whatever" and checked.solve.options == {"speed": "fast"}


def test_solve_options_are_validated_with_a_catalog():
    from bilevel_dsl.cli import solver_catalog

    base = FOLLOWER + "upper minimize norm2(x)\n"
    found = diagnostics(base + "solve m_sobirl(outr = 1, beta = \"x\")",
                        solver_catalog=solver_catalog)
    assert [d.code for d in found] == ["E802", "E803"]
    assert [d.span.column for d in found] == [16, 26]
    diag = first(base + "solve m_sobrl", solver_catalog=solver_catalog)
    assert diag.code == "E801" and "\n" not in diag.message
    assert "did you mean `m_sobirl`" in diag.message
    assert first(base + "solve exact on tpu").code == "E305"


def test_solve_options_out_of_range_point_at_the_value():
    from bilevel_dsl.cli import solver_catalog

    base = FOLLOWER + "upper minimize norm2(x)\n"
    found = diagnostics(base + "solve exact(outer = 2 - 3, inner_tol = 0, beta = -(1))",
                        solver_catalog=solver_catalog)
    assert [(d.code, d.span.column, d.span.end_column) for d in found] == [
        ("E805", 21, 26), ("E805", 40, 41), ("E805", 50, 53)]
    assert found[1].message == "option `inner_tol` must be greater than 0, got 0"
    assert found[1].hint == "`inner_tol` takes a number in (0, inf)"
    # the ends of the ranges: x held still, no tolerance, one step
    checked = compile_ok(base + "solve m_sobirl(outer = 1, beta = 0, tol = 0, time_limit = 0)",
                         solver_catalog=solver_catalog)
    assert checked.solve.options == {"outer": 1, "beta": 0, "tol": 0, "time_limit": 0}


def test_reward_is_differentiable_through_lets():
    checked = compile_ok(FOLLOWER.replace("x[s, a] }", "bonus[s, a] }").replace(
        "lower M", "let bonus[s in M.S, a in M.A] = 2 * x[s, a]^2\nlower M"))
    from bilevel_dsl.elaborate import lower_reward

    x = torch.ones(3, 2, dtype=torch.float64, requires_grad=True)
    reward = lower_reward(checked.lower, checked.scope(torch.device("cpu"), x=x))
    (grad,) = torch.autograd.grad(reward.sum(), x)
    assert torch.allclose(grad, torch.full((3, 2), 4.0, dtype=torch.float64))


@pytest.mark.parametrize("word", ["sum", "prod", "max", "min", "mean", "logsumexp"])
def test_reducers_as_functions_of_one_array(word: str):
    expected = {"sum": 6.0, "prod": 6.0, "max": 3.0, "min": 1.0, "mean": 2.0,
                "logsumexp": float(torch.logsumexp(torch.tensor([1.0, 2.0, 3.0]), 0))}[word]
    assert value(f"{word}([1, 2, 3])") == pytest.approx(expected)


# ------------------------------------------------------------------ resource limits


def test_huge_declarations_are_refused_before_allocation():
    diag = first("brl 1\nparam x[100000, 100000, 100000] = 0")
    assert diag.code == "E301" and "at most 100,000,000 numbers" in diag.message
    assert (diag.span.column, diag.span.end_column) == (9, 31)  # under the dimensions
    assert codes("brl 1\nvar x[100000, 100000]") == ["E301"]
    assert codes("brl 1\nparam x[100000, 100000] ~ normal(0, 1)") == ["E301"]
    assert codes("brl 1\nlet x[i in 0..99999, j in 0..99999] = i") == ["E301"]


def test_huge_reductions_are_refused_not_run():
    diag = first("brl 1\nparam x = sum {i in 0..99999, j in 0..99999} 1")
    assert diag.code == "E301" and "10,000,000,000 terms" in diag.message
    assert (diag.span.column, diag.span.end_column) == (11, 47)  # under the reduction
    # an element-wise product over two large index sets is refused before it is allocated
    diag = first("brl 1\nparam x = sum {i in 0..99999} sum {j in 0..99999} i * j")
    assert diag.code == "E301" and "would hold 10,000,000,000 numbers" in diag.message
    assert (diag.span.column, diag.span.end_column) == (51, 56)  # under `i * j`


def test_horizon_is_bounded():
    diag = first(FOLLOWER + "upper maximize expected_return(M, policy, horizon = 100000000)")
    assert diag.code == "E305" and "at most 100,000" in diag.message


def test_a_definition_cannot_use_itself():
    diag = first("brl 1\nlet a = a + 1")
    assert diag.code == "E203" and diag.message == "`a` is defined in terms of itself"
    assert (diag.span.line, diag.span.column) == (2, 9)
    assert codes("brl 1\nlet a[i in 0..2] = a[i] + 1") == ["E203"]
    assert codes("brl 1\nparam a = a + 1") == ["E203"]
    assert codes("brl 1\nset S = S") == ["E203"]
    # a cycle through lets that use the policy is found where the objective uses it
    diag = first(FOLLOWER + "let v = w + value(M, policy)\nlet w = v\nupper minimize v")
    assert diag.code == "E203" and "through `w`" in diag.message


def test_lets_that_use_policy_lets_are_checked_in_the_objective():
    checked = compile_ok(FOLLOWER + "let v = 2 * value(M, policy)\nlet w = v + v\n"
                         "upper minimize w + v")
    assert checked.upper.features == ("policy", "value")  # found through the lets
    assert codes(FOLLOWER + "let v = value(M, policy)\nlet w = v\ncheck w > 0") == ["E501"]


def test_escaped_newlines_in_a_one_line_map_point_at_the_string():
    diag = first('brl 1\nmdp m = gridworld(map = "S.\\n.X")\nparam after = 1')
    assert diag.code == "E405"
    assert (diag.span.line, diag.span.column, diag.span.end_column) == (2, 25, 33)


def test_features_and_form_count_what_lets_use():
    checked = compile_ok(FOLLOWER + "let d = occupancy(M, policy)\n"
                         "upper maximize sum {s in M.S, a in M.A} d[s, a] * x[s, a]")
    assert checked.upper.features == ("occupancy", "policy")
    assert checked.upper.form == "policy_functional"
    checked = compile_ok(FOLLOWER + "let loss = preference_loss(M, policy, truth = M.R, "
                         "horizon = 3)\nlet total = loss + norm2(x)\nupper minimize total")
    assert checked.upper.form == "trajectory"
    assert "preference_loss" in checked.upper.features
    # the IR records them too, so `brl compile` and solvers see the same
    from bilevel_dsl import ir

    assert checked.program.first(ir.UpperDecl).form == "trajectory"


def test_policy_through_a_let_without_a_follower():
    diag = first(MDP + "var x[M.S, M.A] = 0\nlet v = value(M, policy)\nupper minimize v")
    assert diag.code == "E501" and "no `lower` block" in diag.message
    assert (diag.span.line, diag.span.column, diag.span.end_column) == (5, 16, 17)


def test_a_let_with_dimensions_has_exactly_its_declared_shape():
    """As a param: `let g[I] = a` is `a`, not `a` repeated along I, and a wrong size is E301
    (it used to append the value's own dimensions: sum(entropy) counted S times)."""
    prelude = "set I = 0..2\nparam a[I] = [1, 2, 3]\nlet g[I] = a\nlet c[I] = 2\n"
    assert value("sum(g)", prelude) == 6.0
    assert value("sum(c)", prelude) == 6.0
    assert value("sum {i in I} g[i] * g[i]", prelude) == 14.0
    assert codes("brl 1\nparam a[3] = [1, 2, 3]\nlet h[2] = a\nparam z = sum(h)\n") == ["E301"]
    assert codes("brl 1\nset I = 0..2\nparam a[I] = [1, 2, 3]\n"
                 "let h[i in I, j in I] = a\nparam z = sum(h)\n") == ["E301"]
    text = ("brl 1\nmdp M = random_mdp(states = 3, actions = 2, discount = 0.5)\n"
            "var x[M.S, M.A] = 0\nlower M { temperature = 1  reward[s, a] = x[s, a] }\n"
            "let H[M.S] = entropy(policy)\nupper maximize sum(H)\n")
    from bilevel_dsl import lower

    problem = lower(compile_ok(text))
    pi = torch.full((3, 2), 0.5, dtype=torch.float64)
    assert -float(problem.objective(problem.x0, pi)) == pytest.approx(3 * math.log(2))


def test_a_member_of_one_set_cannot_index_or_match_another_set():
    prelude = "set S = {a1, a2}\nset A = {l, r}\nparam q[s in S, c in A] = 10 * s + c\n"
    assert value("q[a2, r]", prelude) == 11.0
    assert value("q[S.a2, A.r]", prelude) == 11.0
    assert codes(f"brl 1\n{prelude}param z = q[r, a1]\n") == ["E303"]
    assert codes(f"brl 1\n{prelude}param z = q[A.l, A.r]\n") == ["E303"]
    both = "set Dir = {north, east}\nset Act = {east, north}\n"
    assert value("sum {a in Act : a == Act.east} a", both) == 0.0
    assert codes(f"brl 1\n{both}param z = sum {{a in Act : a == Dir.east}} a\n") == ["E303"]
    # a set declared once and used as an MDP's states is the same set
    assert value("q[M.S.a2, r]", prelude + "mdp M = table { states = S  actions = A  "
                 "discount = 0.5  transition[s, a, t] = (t == s) }\n") == 11.0


def test_set_members_are_names_and_checks_fail_on_nan():
    assert codes("brl 1\nset P = {1, 3, 5}\n") == ["E305"]
    found = diagnostics('brl 1\ncheck 0/0, "never true"\n')
    assert [d.code for d in found] == ["E702"] and "NaN" in found[0].notes[0]
    assert "NaN" in diagnostics("brl 1\ncheck sqrt(-1) == sqrt(-1)\n")[0].hint


def test_terminal_flags_are_zero_or_one():
    table = ("brl 1\nmdp T = table {{ states = 3  actions = 2  discount = 0.5  "
             "transition[s, a, t] = 1/3  terminal = {} }}\n")
    assert codes(table.format("[0, 0.5, 0]")) == ["E305"]
    compile_ok(table.format("[0, 0, 1]"))
    grid = 'brl 1\nmdp G = gridworld(map = "S.G", discount = 0.9, terminal_goal = {})\n'
    assert codes(grid.format("2")) == ["E305"]
    compile_ok(grid.format("false"))


def test_reductions_over_empty_sets_and_filters_on_outer_indices():
    assert codes("brl 1\nset E = 1..0\nparam z = max {i in E} i\n") == ["E301"]
    assert codes("brl 1\nparam w[1..0] = 0\nparam z = min(w)\n") == ["E301"]
    assert value("sum {i in 1..0} i") == 0.0
    # the filter uses the outer index `a`, the body does not
    assert value("sum {a in 0..2} sum {b in 0..2 : b < a} 1") == 3.0
    assert value("sum {a in 0..2} (sum {b in 0..2 : b != a} b) * a") == 0 * 3 + 1 * 2 + 2 * 1


SUMMED = ("brl 1\nset S = 0..3\nset A = 0..1\nparam P[S, A, S] ~ uniform(0, 1)\n"
          "param c[S] ~ normal(0, 1)\nparam v[2] = [1, -2]\n")


@pytest.mark.parametrize("body", [
    "sum {t in S} P[s, a, t] * c[t]",
    "sum {t in S} c[t] * P[s, a, t] * 2",
    "sum {t in S, u in S} P[s, a, t] * P[t, a, u] * c[u]",
    "sum {t in S} (c[t] * s) * ((a + 1) * P[s, a, t])",  # factors without `t`; nested
    "sum {t in S} s * a",  # no factor uses `t`: |S| equal terms
    "sum {t in S} (t == s) * c[t] * t",  # a comparison and an index as factors
    "sum {t in 1..0} c[s] * a",  # an empty set
    "sum {t in S} c[t] * P[s, a, t] * norm(v * c[t])",
    "sum {t in S} sum {u in S} P[s, a, t] * c[u] * c[t]",
    "sum {t in S} c[t] * v[a]",
])
def test_a_sum_of_a_product_equals_the_product_summed(body: str):
    """A sum of a product is contracted without building the product (one einsum): it must
    equal the same terms summed one by one (`(0 + ...)` is not a product)."""
    reference = body.replace("} ", "} (0 + ", 1) + ")"
    checked = compile_ok(SUMMED + f"param got[s in S, a in A] = {body}\n"
                         f"param want[s in S, a in A] = {reference}\n")
    got, want = checked.names["got"].t, checked.names["want"].t
    assert got.shape == want.shape == (4, 2)
    assert torch.allclose(got, want, rtol=1e-14, atol=1e-14)


def test_a_sum_of_a_product_with_infinities_is_summed_term_by_term():
    """An einsum sums an index out of one factor before multiplying by the others: `0 * inf`
    would never be formed. Factors that are not finite keep the term-by-term sum."""
    prelude = "brl 1\nparam z[4] = [0, 1, 0, 2]\nparam c[3] = [1, -1, 2]\n"
    # NaN fails a check whichever way it is compared (inf and -inf would pass these)
    assert codes(prelude + "check sum {i in 0..3} z[i] * inf > 0") == ["E702"]
    assert codes(prelude + "check sum {i in 0..3, j in 0..2} log(z[i]) * c[j] < 0") == ["E702"]
    assert value("sum {i in 0..3, j in 0..2} z[i] * c[j]", prelude[6:]) == 6


def test_a_sum_of_a_product_of_arrays_is_still_checked_link_by_link():
    diag = first("brl 1\nparam a[2] = [1, 2]\nparam b[3] = [1, 2, 3]\n"
                 "param z = sum {i in 0..1} a * b * i\n")
    assert diag.code == "E301" and "shapes do not match" in diag.message
    assert (diag.span.line, diag.span.column, diag.span.end_column) == (4, 27, 32)  # `a * b`
    # an array factor: summed as before
    assert param("param result[2] = sum {i in 0..2} [1, 2] * i * 2").tolist() == [6, 12]
    # a chain of 3,000 factors, scalars and arrays: no recursion as deep as the chain
    chain = " * ".join(["a"] * 3000)
    assert param("param a[2] = [1, 1]\nparam result[2] = sum {i in 0..2} " + chain
                 ).tolist() == [3, 3]
    assert value("sum {i in 0..1} " + " * ".join(["i"] * 3000)) == 1  # one einsum


def test_a_range_from_an_mdp_or_a_set_was_meant_as_a_part_or_a_member():
    diag = first("brl 1\nmdp M = random_mdp(states = 3, actions = 2)\nparam n = card(M..S)")
    assert diag.code == "E305" and diag.message == "`M..S` is a range of numbers, and `M` is " \
        "no number"
    assert diag.hint.endswith("`M.S`") and (diag.span.column, diag.span.end_column) == (16, 20)
    diag = first("brl 1\nset C = {red, blue}\nparam n = sum {i in C..red} 1")
    assert diag.hint.endswith("`C.red`")
    assert first("brl 1\nset C = {red, blue}\nset T = C..C").hint is None  # C.C means nothing
    assert value("sum {i in 1..n} i", "param n = 3") == 6  # a param's range is fine



    text = "brl 1\nset S = 0..2\nparam R[s in S, a in 0..1] = s + a\n"
    checked = compile_ok(text, overrides={"R": "[[0, 1], [2, 3], [4, 9]]"})
    assert checked.names["R"].t[2, 1] == 9.0
    assert codes(text, overrides={"R": "[[0, 1], [2, 3]]"}) == ["E301"]


def test_messages_for_arities_auto_and_an_infinite_temperature():
    found = diagnostics("brl 1\nparam z = max(1, 2, 3)\n")
    assert "1 argument (an array) or 2" in found[0].message
    text = ("brl 1\nmdp M = random_mdp(states = 3, actions = 2, discount = 0.5)\n"
            "var x[M.S, M.A] = 0\nlower M {{ temperature = {}  reward[s, a] = x[s, a] }}\n"
            "upper minimize norm2(x)\n")
    assert "must be finite, got inf" in diagnostics(text.format("inf"))[0].message
    assert "must be positive, got -1" in diagnostics(text.format("-1"))[0].message


def test_an_index_used_past_the_end_of_its_reduction_gets_a_hint():
    found = diagnostics("brl 1\nparam a[3] = [1, 2, 3]\nparam t = sum {k in 0..2} a[k] + a[k]\n")
    assert found[0].code == "E201" and "belongs to the `sum` at 3:11" in found[0].hint


def test_an_index_hiding_a_declaration_and_an_empty_dimension_are_explained():
    found = diagnostics("brl 1\nparam a[4] = [1, 2, 3, 4]\n"
                        "mdp M = random_mdp(states = 4, actions = 2, discount = 0.5)\n"
                        "var x[M.S, M.A] = 0\n"
                        "lower M { temperature = 1  reward[s, a] = x[s, a] + a[s] }\n"
                        "upper minimize norm2(x)\n")
    assert found[0].code == "E302" and "hides the declared `a`" in found[0].hint
    found = diagnostics("brl 1\nvar x[1..0] = 0\n")
    assert found[0].code == "E301" and "is empty" in found[0].message


def test_a_filter_that_keeps_nothing_has_no_max():
    assert codes("brl 1\nparam a = max {x in 0..3 : x > 5} x\n") == ["E301"]
    assert value("max {i in 0..3 : i > 1} i") == 3.0
    assert value("sum {x in 0..3 : x > 5} x") == 0.0


def test_an_empty_group_that_an_outer_filter_drops_is_no_error():
    assert value("sum {j in 1..2 : j < 2} max {i in 1..3 : i > j + 1} i") == 3.0
    assert value("sum {j in 1..2} (if j < 2 then max {i in 1..3 : i > j + 1} i else 0)") == 3.0


def test_a_param_holds_infinities_only_where_it_writes_inf():
    """Bounds written as params (`[1, inf]`) are accepted; an overflow, a NaN or an infinity
    that the expression does not ask for is E305."""
    assert param("param hi[2] = [1, inf]", "hi").tolist() == [1.0, math.inf]
    assert param("param lo[i in 0..1] = if i == 0 then -inf else 0", "lo").tolist() == [
        -math.inf, 0.0]
    compile_ok("brl 1\nparam hi[2] = [1, inf]\nvar x[2] = 0 in [-hi, hi]")
    for text in ("[exp(1000), 1]", "inf - inf", "[0 * inf, 1]"):
        diag = first(f"brl 1\nparam p[2] = {text}")
        assert diag.code == "E305" and "not finite" in diag.message, text


def test_indexing_a_large_p_entry_by_entry_is_refused_with_a_way_out():
    diag = first("brl 1\nmdp M = random_mdp(states = 4000, actions = 4, successors = 2)\n"
                 "var x[M.S] = 0\nlower M { temperature = 1  reward[s, a] = x[s] }\n"
                 "upper minimize norm2(x) + sum {s in M.S, a in M.A, t in M.S} M.P[s, a, t]")
    assert diag.code == "E301"
    assert diag.message == "`M.P` has 64,000,000 entries: too many to index one by one"
    assert "in a `lower` block" in diag.hint and "policy functionals" in diag.hint


def test_a_let_used_inside_sums_is_evaluated_once_per_evaluation(monkeypatch):
    """Soft value iteration unrolled with lets: each level's lets are used inside the next
    level's sums, and every sum started an empty let cache, so a level cost twice the one
    before (12 levels: 15 s to check) and a chain of 100 such lets ran out of stack."""
    from bilevel_dsl import evaluate, lower

    levels = ["let V0[s in M.S] = 0"]
    for k in range(1, 13):
        levels += [f"let Q{k}[s in M.S, a in M.A] = x[s, a] + 0.8 * sum {{t in M.S}} "
                   f"M.P[s, a, t] * V{k - 1}[t]",
                   f"let pi{k}[s in M.S, a in M.A] = exp(Q{k}[s, a] - logsumexp {{b in M.A}} "
                   f"Q{k}[s, b])",
                   f"let V{k}[s in M.S] = sum {{a in M.A}} pi{k}[s, a] * (Q{k}[s, a] - "
                   f"log(pi{k}[s, a]))"]
    text = FOLLOWER + "\n".join(levels) + "\nupper maximize sum {s in M.S} V12[s]\n"
    problem = lower(compile_ok(text))
    fitted = []
    fit = evaluate.fit_declared
    monkeypatch.setattr(evaluate, "fit_declared", lambda *a: fitted.append(a[3]) or fit(*a))
    x = torch.rand(3, 2, dtype=torch.float64)
    got = -float(problem.objective(x, torch.full((3, 2), 0.5, dtype=torch.float64)))
    assert sorted(fitted) == sorted(line.split()[1].split("[")[0] for line in levels)
    P = problem.transitions.dense()
    V = torch.zeros(3, dtype=torch.float64)
    for _ in range(12):  # the same iteration, in torch
        Q = x + 0.8 * P @ V
        V = torch.logsumexp(Q, 1)  # sum_a pi (Q - log pi) with pi = softmax(Q)
    assert got == pytest.approx(float(V.sum()), rel=1e-12)
    chain = "".join(f"let l{k} = 0.5 * sum {{i in 0..1}} l{k - 1}\n" for k in range(1, 400))
    problem = lower(compile_ok(FOLLOWER + "let l0 = sum(x) + 1\n" + chain
                               + "upper minimize l399\n"))
    assert float(problem.objective(torch.ones(3, 2, dtype=torch.float64),
                                   torch.full((3, 2), 0.5, dtype=torch.float64))) == 7.0


def test_an_automatic_temperature_on_a_table_says_where_it_belongs():
    diag = first("brl 1\nmdp M = random_mdp(states = 2, actions = 2)\nvar x[2] = 0\n"
                 "lower M { temperature = auto  reward[s, a] = x[s] }")
    assert diag.code == "E403" and "for a follower on a gym environment" in diag.message
    assert (diag.span.line, diag.span.column) == (4, 25)


def test_a_leader_who_cannot_move_the_follower_is_warned():
    """Legal, so not refused, but a slip (M.R written for x): W401 at the reward, W501 at an
    objective that nothing moves; none for a reward that uses x through a let."""
    base = ("brl 1\nmdp M = random_mdp(states = 3, actions = 2)\nvar x[M.S, M.A] = 0\n"
            "let r[s in M.S, a in M.A] = 2 * x[s, a]\n")
    checked = compile_ok(base + "lower M { temperature = 1  reward[s, a] = M.R[s, a] }\n"
                         "upper minimize 3\n")
    assert [(w.code, w.severity, w.span.line, w.span.column) for w in checked.warnings] == [
        ("W401", "warning", 5, 43), ("W501", "warning", 6, 16)]
    checked = compile_ok(base + "lower M { temperature = 1  reward[s, a] = r[s, a] }\n"
                         "upper minimize - value(M, policy)\n")
    assert checked.warnings == []
    # an index that follows x: whole at x0, fractional a step later (a run then fails)
    checked = compile_ok(base + "param w[3] = [1, 2, 3]\n"
                         "lower M { temperature = 1  reward[s, a] = r[s, a] }\n"
                         "upper minimize w[if x[0, 0] > 1 then x[0, 0] else 0] - "
                         "value(M, policy)\n")
    assert [(w.code, w.span.line, w.span.column) for w in checked.warnings] == [("W402", 7, 18)]


NOT_FINITE = ("brl 1\nmdp M = random_mdp(states = 3, actions = 2, discount = 0.8)\n"
              "var x[M.S] = 0\nparam c[M.S] = [1, 0, 2]\nlet w[s in M.S] = {let}\n"
              "lower M {{ temperature = 1  reward[s, a] = {reward} }}\n"
              "upper minimize {objective}\n")


@pytest.mark.parametrize("let, reward, at, said", [
    ("x[s]", "log(x[s] - 1)", (6, 43, 56), "`log` is -inf at 0"),  # the whole reward
    ("x[s] / c[s]", "2 * x[s] + sum {t in M.S} M.P[s, a, t] * w[t] * 0 + 1", (5, 19, 30),
     "a division by 0"),  # inside a let, inside a sum whose product is contracted
    ("sqrt(x[s] - c[s])", "x[s] + w[s]", (5, 19, 36), "`sqrt` is NaN below 0"),
    ("x[s] * c[s]", "x[s] + sum {t in M.S : t > 5} log(w[t])", None, None),  # all filtered out
])
def test_a_reward_that_is_not_finite_at_the_start_points_where_it_first_is(let, reward, at,
                                                                             said):
    text = NOT_FINITE.format(let=let, reward=reward, objective="norm2(x)")
    if at is None:
        compile_ok(text)
        return
    diag = first(text)
    assert diag.code == "E305" and diag.message.startswith("the follower's reward is NaN")
    assert (diag.span.line, diag.span.column, diag.span.end_column) == at
    assert said in diag.hint


def test_an_objective_that_is_not_finite_at_the_start_is_warned_where_it_first_is():
    text = NOT_FINITE.format(let="x[s]", reward="x[s]",
                             objective="value(M, policy) + sum {s in M.S} log(w[s] - c[s])")
    [warning] = compile_ok(text).warnings
    assert warning.code == "W502" and warning.severity == "warning"
    assert warning.message == ("the objective is NaN at the initial `x` with the uniform "
                               "policy, first here: a solve stops at its first iteration")
    assert (warning.span.line, warning.span.column, warning.span.end_column) == (7, 50, 66)
    assert "`log` is -inf at 0" in warning.hint
    text = NOT_FINITE.format(let="x[s]", reward="x[s]", objective="1 / norm2(x)")
    [warning] = compile_ok(text).warnings
    assert warning.message.startswith("the objective is infinite at the initial `x`: ")
    assert (warning.span.column, warning.span.end_column) == (16, 28)  # the whole objective
    # a NaN made of infinities is placed at the operation, not at the infinity
    text = NOT_FINITE.format(let="x[s]", reward="x[s]", objective="norm2(x) + 0 * inf")
    [warning] = compile_ok(text).warnings
    assert (warning.span.column, warning.span.end_column) == (27, 34)
    assert warning.hint == "0 times inf is NaN"
    # a filter that leaves a NaN out: the division is blamed, not the log that it filters
    text = NOT_FINITE.format(let="x[s]", reward="x[s] + sum {i in M.S : c[i] > 0} "
                             "(log(c[i] - 0.5) + 1 / c[1])", objective="norm2(x)")
    diag = first(text)
    assert diag.code == "E305" and diag.hint.startswith("a division by 0")
    assert text.split("\n")[diag.span.line - 1][diag.span.column - 1:].startswith("1 / c[1]")
    # an `if` that keeps log's NaN out, and log(0) = -inf that it lets through: the log
    text = NOT_FINITE.format(let="x[s]", reward="x[s] + (if c[s] < 0 then 0 else log(c[s]))",
                             objective="norm2(x)")
    assert first(text).hint.startswith("`log` is -inf at 0")
