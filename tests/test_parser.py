"""The parser on every construct of docs/language.md, and operator precedence.

Each construct is checked twice where it matters: the IR the parser builds (its shape, written as
an S-expression) and the numbers the interpreter computes from it.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re

import pytest
import torch
from conftest import DOCS, PROBLEMS, brl_blocks, codes, compile_ok, diagnostics, param, value
from lark import Lark, Token
from lark.exceptions import UnexpectedCharacters, UnexpectedToken

from bilevel_dsl import BrlError, compile_source, ir, parse_expression, parse_source
from bilevel_dsl.diagnostics import SourceFile
from bilevel_dsl.parser import (
    MAX_CHAIN,
    _bad_character,
    _syntax_diagnostic,
    _SyntaxErrors,
    _tables,
    decode,
    grammar_text,
)


def parse(text: str) -> ir.Program:
    return parse_source(SourceFile("test.brl", text))


def stmt(body: str, kind: type | None = None):
    """The last statement of `brl 1` + body (or the first of `kind`)."""
    program = parse("brl 1\n" + body)
    if kind is None:
        return program.statements[-1]
    found = program.first(kind)
    assert found is not None, f"no {kind.__name__} in {program.statements}"
    return found


def sx(node) -> str:
    """An expression as a compact S-expression: `-x^2` is `(- (^ x 2))`."""
    if isinstance(node, ir.Number):
        return str(int(node.value)) if node.is_integer else repr(node.value)
    if isinstance(node, ir.String):
        return repr(node.value)
    if isinstance(node, ir.Name):
        return node.id
    if isinstance(node, ir.Unary):
        return f"({node.op} {sx(node.operand)})"
    if isinstance(node, ir.Binary):
        return f"({node.op} {sx(node.left)} {sx(node.right)})"
    if isinstance(node, ir.Conditional):
        return f"(if {sx(node.condition)} {sx(node.then)} {sx(node.otherwise)})"
    if isinstance(node, ir.Index):
        return f"{sx(node.base)}[{', '.join(sx(i) for i in node.indices)}]"
    if isinstance(node, ir.Attribute):
        return f"{sx(node.base)}.{node.attr}"
    if isinstance(node, ir.Call):
        args = [sx(a) for a in node.args] + [f"{k.name}={sx(k.value)}" for k in node.keywords]
        return f"{node.function}({', '.join(args)})"
    if isinstance(node, ir.Range):
        return f"({sx(node.start)}..{sx(node.stop)})"
    if isinstance(node, ir.Members):
        return "{" + ", ".join(m.name for m in node.members) + "}"
    if isinstance(node, ir.ArrayLiteral):
        return "[" + ", ".join(sx(i) for i in node.items) + "]"
    if isinstance(node, ir.NumberArray):
        texts = [str(int(v)) if node.is_integer else repr(v) for v in node.values]
        for size in reversed(node.shape):  # innermost rows first
            texts = ["[" + ", ".join(texts[i:i + size]) + "]" for i in range(0, len(texts), size)]
        return texts[0]
    if isinstance(node, ir.Reduction):
        binders = ", ".join(f"{b.name} in {sx(b.domain)}" for b in node.binders)
        where = f" : {sx(node.where)}" if node.where is not None else ""
        return f"({node.op} {{{binders}{where}}} {sx(node.body)})"
    raise AssertionError(f"unexpected node {node!r}")


def ex(text: str) -> str:
    return sx(parse_expression(text))


# ------------------------------------------------------------------ statements


FULL = '''brl 1
problem demo "A \\"demo\\"\\n"
seed 42
set S = 0..4
set C = {red, green}
set T = S
param lam = 0.05
param w[3] = [1, 2.5, -1]
param r[s in S] = s / 4
param n[S, 3] ~ normal(0, 1)
param c[S, S] ~ uniform(0, 1) * uniform(0, 1)
param d = load("d.npy")
var x[S] = 0 in [-1, 1]
let q[s in S, t in S] = x[s] * x[t]
mdp M = random_mdp(states = 5, actions = 2, discount = 0.9)
mdp K = table { states = S  actions = C  transition[s, a, t] = if t == s then 1 else 0 }
lower M { temperature = 0.5  reward[s, a] = x[s] }
upper maximize value(M, policy)
solve m_sobirl(outer = 10, adjoint = lsq) on cpu
check lam > 0, "positive"
'''


def test_every_statement_kind_in_order():
    program = parse(FULL)
    assert program.language_version == 1
    assert program.ir_version == ir.IR_VERSION
    assert program.source == "test.brl"
    kinds = [type(s).__name__ for s in program.statements]
    assert kinds == [
        "ProblemDecl", "SeedDecl", "SetDecl", "SetDecl", "SetDecl", "ParamDecl", "ParamDecl",
        "ParamDecl", "ParamDecl", "ParamDecl", "ParamDecl", "VarDecl", "LetDecl", "MdpDecl",
        "MdpDecl", "LowerDecl", "UpperDecl", "SolveDecl", "CheckDecl",
    ]
    assert program.name == "demo"


def test_problem_title_escapes_and_seed():
    problem = stmt('problem demo "A \\"demo\\"\\n\\t\\\\"', ir.ProblemDecl)
    assert (problem.name, problem.title) == ("demo", 'A "demo"\n\t\\')
    assert stmt("problem bare", ir.ProblemDecl).title is None
    assert stmt("seed 42", ir.SeedDecl).seed == 42


def test_triple_quoted_string_keeps_lines_verbatim():
    problem = stmt('problem p """line one\n  line "two" \\n"""', ir.ProblemDecl)
    assert problem.title == 'line one\n  line "two" \\n'


def test_program_name_defaults_to_the_file_stem():
    assert parse_source(SourceFile("dir/maze.brl", "brl 1\nseed 1")).name == "maze"


def test_spans_locate_names_and_statements():
    program = parse(FULL)
    lam = program.statements[5]
    assert isinstance(lam, ir.ParamDecl) and lam.name == "lam"
    assert (lam.span.line, lam.span.column, lam.span.end_column) == (7, 1, 17)
    assert (lam.name_span.line, lam.name_span.column, lam.name_span.end_column) == (7, 7, 10)
    solve = program.first(ir.SolveDecl)
    line = FULL.split("\n")[solve.span.line - 1]
    assert line[solve.solver_span.column - 1 : solve.solver_span.end_column - 1] == "m_sobirl"
    assert line[solve.device_span.column - 1 : solve.device_span.end_column - 1] == "cpu"


def test_sets_range_members_alias():
    program = parse("brl 1\nset S = 0..9\nset Colors = {red, green, blue}\nset T = S\n"
                    "set Steps = 1..card(S)")
    s, colors, alias, steps = program.statements
    assert sx(s.value) == "(0..9)"
    assert sx(colors.value) == "{red, green, blue}"
    assert isinstance(alias.value, ir.Name) and alias.value.id == "S"
    assert sx(steps.value) == "(1..card(S))"


def test_set_values():
    checked = compile_ok(
        "brl 1\nset S = 0..9\nset Colors = {red, green, blue}\nset T = S\n"
        "set Steps = 1..card(S)\nset Empty = 1..0\n"
        "check card(S) == 10 and card(Colors) == 3 and card(Steps) == 10\n"
        "check card(Empty) == 0\n"
        "check Colors.green == 1 and green == 1 and blue == 2\n"
        "check card(1..5) == 5\n")
    assert checked.checks == 4
    # an alias is the same set: indexes over T are accepted where S is declared
    assert checked.names["T"] is checked.names["S"]
    assert value("sum {t in T} a[t]", "set S = 0..3\nset T = S\nparam a[S] = 2") == 8
    # a range's elements are their own values
    assert value("sum {i in Steps} i", "set Steps = 1..4") == 10


def test_params_ir():
    assert sx(stmt("param lam = 0.05").value) == "0.05"
    w = stmt("param w[3] = [1, 2.5, -1]")
    assert [sx(d.domain) for d in w.dims] == ["3"] and sx(w.value) == "[1.0, 2.5, -1.0]"
    g = stmt("param g[2, 2] = [[1, 0], [0, 1]]")
    assert sx(g.value) == "[[1, 0], [0, 1]]" and len(g.dims) == 2
    r = stmt("set S = 0..4\nparam r[s in S] = s / 4")
    assert (r.dims[0].index, sx(r.dims[0].domain), sx(r.value)) == ("s", "S", "(/ s 4)")
    noise = stmt("set S = 0..4\nparam noise[S, 3] ~ normal(0, 1)")
    assert noise.random and sx(noise.value) == "normal(0, 1)"
    c = stmt("param c[2] ~ uniform(0, 1) * uniform(0, 1)")
    assert c.random and sx(c.value) == "(* uniform(0, 1) uniform(0, 1))"
    assert not stmt("param k = 1").random
    load = stmt('param d[2, 3] = load("data/d.npy")')
    assert isinstance(load.value, ir.Call) and load.value.function == "load"
    assert load.value.args[0] == ir.String(load.value.args[0].span, "data/d.npy")


def test_arrays_written_in_numbers_are_folded_into_one_node():
    """A pasted table is one NumberArray (a node per number cost 2 KiB and tens of
    microseconds each); anything else in it keeps the item-by-item ArrayLiteral."""
    table = stmt("param t[2, 3] = [[1, -2, +3], [-(4), --5, 6]]").value
    assert isinstance(table, ir.NumberArray) and table.is_integer
    assert (table.shape, table.values) == ((2, 3), (1.0, -2.0, 3.0, -4.0, 5.0, 6.0))
    assert table.span == ir.Span(2, 17, 2, 46)
    assert not stmt("param r[2] = [1, 0.5]").value.is_integer
    for text in ("[1, [2]]", "[[1], [2, 3]]", "[1, inf]", "[1, true]", "[1, a]", "[2 * 3]",
                 "[[1], [a]]"):
        assert isinstance(parse_expression(text), ir.ArrayLiteral), text
    assert isinstance(parse_expression("[[1], [a]]").items[0], ir.NumberArray)


@pytest.mark.parametrize("text", [
    "[1, 2.5, -1]", "[[1, 0], [0, 1]]", "[[[1, -0.0]], [[-2, 3e-3]]]", "[-0, +0]", "[1, [2]]",
    "[[1], [2, 3]]", "[[1, 2], [a, 3]]", "[1, inf]", "[1.5, true]", "[[1, 2], [3, 4]] * 2",
])
def test_a_folded_array_has_the_value_kind_and_errors_of_item_by_item_evaluation(text):
    """The folded node against the same text with its numbers hidden from the folding (each
    written `(n + 0)`, which the parser keeps as an expression)."""
    prelude = "param a = 7\n"
    unfolded = re.sub(r"(?<![\w.])([0-9][0-9.e-]*)", r"(\1 + 0)", text)
    mine, theirs = (_value_or_error(prelude + f"param p = {t}\n") for t in (text, unfolded))
    assert mine == theirs


def _value_or_error(body: str):
    try:
        v = compile_source("brl 1\n" + body, "test.brl").names["p"]
    except BrlError as exc:
        return [(d.code, d.message, d.hint) for d in exc.diagnostics]
    return v.t.tolist(), [math.copysign(1, e) for e in v.t.reshape(-1).tolist()], v.kind


def test_param_values():
    checked = compile_ok(
        "brl 1\nseed 42\nset S = 0..4\nparam lam = 0.05\nparam n = 10\n"
        "param w[3] = [1, 2.5, -1]\nparam grid[2, 2] = [[1, 0], [0, 1]]\n"
        "param ramp[s in S] = s / 4\nparam noise[S, 3] ~ normal(0, 1)\n"
        "param coin[S] ~ bernoulli(0.5)\nparam sz[n] = 1\n")
    names = checked.names
    assert names["lam"].kind == "real" and names["n"].kind == "int"
    assert names["w"].t.tolist() == [1.0, 2.5, -1.0]
    assert names["grid"].t.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert names["ramp"].t.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert names["noise"].t.shape == (5, 3)
    assert set(names["coin"].t.tolist()) <= {0.0, 1.0}
    assert names["sz"].t.shape == (10,)
    assert names["noise"].dims[0] is names["S"]


def test_draws_are_per_element_and_independent():
    t = param("seed 1\nparam result[200, 200] ~ uniform(0, 1) * uniform(0, 1)")
    assert t.shape == (200, 200)
    assert 0 <= float(t.min()) and float(t.max()) <= 1
    # the product of two independent U(0,1) has mean 1/4; a square of one draw has mean 1/3
    assert abs(float(t.mean()) - 0.25) < 0.01
    assert len(torch.unique(t)) > 39_000  # one draw per element
    normal = param("seed 1\nparam result[100, 100] ~ normal(2, 3)")
    assert abs(float(normal.mean()) - 2) < 0.1 and abs(float(normal.std()) - 3) < 0.1


def test_draws_are_reproducible_and_seeded_per_declaration():
    first = compile_ok("brl 1\nseed 7\nparam a[5] ~ normal(0, 1)\nparam b[5] ~ normal(0, 1)")
    again = compile_ok("brl 1\nseed 7\nparam a[5] ~ normal(0, 1)\nparam b[5] ~ normal(0, 1)")
    assert torch.equal(first.names["a"].t, again.names["a"].t)
    # two declarations draw different numbers
    assert not torch.equal(first.names["a"].t, first.names["b"].t)
    # adding a declaration does not change the numbers of another
    more = compile_ok("brl 1\nseed 7\nparam z[5] ~ normal(0, 1)\nparam b[5] ~ normal(0, 1)")
    assert torch.equal(first.names["b"].t, more.names["b"].t)
    other = compile_ok("brl 1\nseed 8\nparam a[5] ~ normal(0, 1)")
    assert not torch.equal(first.names["a"].t, other.names["a"].t)
    overridden = compile_ok("brl 1\nseed 8\nparam a[5] ~ normal(0, 1)", seed=7)
    assert torch.equal(first.names["a"].t, overridden.names["a"].t)


def test_var_forms():
    plain = stmt("var x[3]", ir.VarDecl)
    assert plain.value is None and plain.lower is None and plain.upper is None
    bounded = stmt("var x[3] = 0.5 in [-1, inf]", ir.VarDecl)
    assert (sx(bounded.value), sx(bounded.lower), sx(bounded.upper)) == ("0.5", "(- 1)", "inf")
    drawn = stmt("var x[100] ~ normal(0, 1)", ir.VarDecl)
    assert drawn.random and drawn.lower is None
    scalar = stmt("var y = 2", ir.VarDecl)
    assert scalar.dims == () and sx(scalar.value) == "2"

    assert compile_ok("brl 1\nvar x[3]").var.x0.tolist() == [0.0, 0.0, 0.0]
    var = compile_ok("brl 1\nvar x[3] = [-5, 0.5, 5] in [-1, 1]").var
    assert var.x0.tolist() == [-1.0, 0.5, 1.0]  # projected onto the box
    assert var.lower.tolist() == [-1.0] * 3 and var.upper.tolist() == [1.0] * 3
    var = compile_ok("brl 1\nvar x[2] = 0 in [[0, -1], inf]").var
    assert var.lower.tolist() == [0.0, -1.0] and math.isinf(float(var.upper[0]))
    var = compile_ok("brl 1\nseed 3\nvar x[100] ~ normal(0, 1)").var
    assert var.x0.shape == (100,) and float(var.x0.std()) > 0.5
    grid = compile_ok('brl 1\nmdp maze = gridworld(map = "S.G")\n'
                      "var g[2] = maze.goal_pos in [0, 2]").var
    assert grid.x0.tolist() == [0.0, 2.0]


def test_let_with_and_without_dims():
    let = stmt("set S = 0..2\nlet r[s in S, t in S] = s * t", ir.LetDecl)
    assert [d.index for d in let.dims] == ["s", "t"] and sx(let.value) == "(* s t)"
    assert stmt("let k = 1 + 2", ir.LetDecl).dims == ()
    checked = compile_ok("brl 1\nset S = 0..2\nlet r[s in S, t in S] = s * t\n"
                         "let k = sum {s in S, t in S} r[s, t]\ncheck k == 9\n"
                         "check r[2, 2] == 4")
    assert checked.checks == 2


def test_mdp_generator_and_table_ir():
    gen = stmt("mdp M = random_mdp(states = 5, actions = 2, discount = 0.9)")
    assert (gen.kind, gen.block, gen.items) == ("random_mdp", False, ())
    assert [(k.name, sx(k.value)) for k in gen.keywords] == [
        ("states", "5"), ("actions", "2"), ("discount", "0.9")]
    table = stmt("mdp chain = table {\n  states = 0..3\n  actions = {left, right}\n"
                 "  transition[s, a, t] = if t == s then 1 else 0\n  terminal = {3}\n}")
    assert (table.kind, table.block, table.keywords) == ("table", True, ())
    assert [i.key for i in table.items] == ["states", "actions", "transition", "terminal"]
    assert sx(table.items[0].value) == "(0..3)"
    assert sx(table.items[1].value) == "{left, right}"
    assert [n.id for n in table.items[2].indices] == ["s", "a", "t"]
    assert sx(table.items[2].value) == "(if (== t s) 1 0)"
    assert sx(table.items[3].value) == "{3}"


def test_lower_upper_solve_check_ir():
    program = parse("brl 1\nlower M {\n  temperature = 0.1\n  reward[s, a, t] = -t\n}\n"
                    "upper minimize norm2(x)\nsolve m_sobirl(outer = 200, beta = 0.1, "
                    'adjoint = fixed_point, name = "s") on cpu\ncheck x > 0, "x must be positive"'
                    "\ncheck 1 == 1")
    low, up, solve, check, bare = program.statements
    assert low.mdp == "M" and [i.key for i in low.items] == ["temperature", "reward"]
    assert [n.id for n in low.items[1].indices] == ["s", "a", "t"]
    assert (up.sense, sx(up.objective), up.form, up.features) == (
        "minimize", "norm2(x)", "policy_functional", ())
    assert solve.solver == "m_sobirl" and solve.device == "cpu"
    assert [(k.name, sx(k.value)) for k in solve.options] == [
        ("outer", "200"), ("beta", "0.1"), ("adjoint", "fixed_point"), ("name", "'s'")]
    assert check.message == "x must be positive" and sx(check.condition) == "(> x 0)"
    assert bare.message is None
    assert stmt("upper maximize value(M, policy)").sense == "maximize"
    assert stmt("solve exact").options == () and stmt("solve exact").device is None
    assert stmt("solve exact()").solver == "exact"
    assert stmt("solve exact on auto").device == "auto"


def test_upper_form_and_features():
    up = stmt("upper minimize - value(M, policy) + sum {s in M.S} entropy(policy)[s]")
    assert up.form == "policy_functional" and up.features == ("entropy", "policy", "value")
    up = stmt("upper minimize preference_loss(M, policy, truth = M.R, horizon = 3)")
    assert up.form == "trajectory" and "preference_loss" in up.features


def test_solve_options_and_device_are_checked():
    base = ("brl 1\nmdp M = random_mdp(states = 3, actions = 2)\nvar x[M.S, M.A]\n"
            "lower M { temperature = 1  reward[s, a] = x[s, a] }\nupper minimize norm2(x)\n")
    checked = compile_ok(base + "solve m_sobirl(outer = 5, beta = 0.5, adjoint = lsq) on cpu")
    assert checked.solve.options == {"outer": 5, "beta": 0.5, "adjoint": "lsq"}
    assert isinstance(checked.solve.options["outer"], int)
    assert checked.solve.device == "cpu"
    assert codes(base + "solve m_sobirl on gpu") == ["E305"]
    # an unknown device does not hide an unknown solver, and `gpu` is pointed to `cuda`
    from bilevel_dsl.cli import solver_catalog
    found = diagnostics(base + "solve msobirll(outer = 5) on gpu", solver_catalog=solver_catalog)
    assert [d.code for d in found] == ["E801", "E305"]
    assert found[1].hint == "an NVIDIA GPU is `cuda`"


def test_comments_whitespace_and_layout():
    one_line = compile_ok("brl 1 param a = 1 param b = a + 1 check b == 2  # trailing")
    assert one_line.checks == 1
    spread = compile_ok("# heading\nbrl 1\n\nparam a =\n   1 +\n   2   # comment\n\n"
                        "check a\n  == 3\n")
    assert float(spread.names["a"].t) == 3
    crlf = compile_ok("brl 1\r\nparam a = 2\r\ncheck a == 2\r\n")
    assert crlf.checks == 1


def test_numbers_and_constants():
    assert value("3") == 3 and value("0.5") == 0.5
    assert value("1e-3") == 1e-3 and value("2.5E4") == 25000.0 and value("1E+2") == 100
    assert value("true") == 1 and value("false") == 0
    assert math.isinf(value("inf")) and value("-inf") == -math.inf
    assert value("999999999999999999999999999999") == 1e30


def test_keywords_are_not_names():
    for word in ("in", "sum", "if", "check", "max", "on"):
        found = diagnostics(f"brl 1\nparam {word} = 1")
        assert [d.code for d in found] == ["E100"]
        assert found[0].span.line == 2 and found[0].span.column == 7


# ------------------------------------------------------------------ precedence


@pytest.mark.parametrize(
    ("text", "tree"),
    [
        ("-x^2", "(- (^ x 2))"),
        ("2^3^2", "(^ 2 (^ 3 2))"),
        ("2^-1", "(^ 2 (- 1))"),
        ("-2^-2", "(- (^ 2 (- 2)))"),
        ("a - b - c", "(- (- a b) c)"),
        ("a / b / c", "(/ (/ a b) c)"),
        ("a + b * c", "(+ a (* b c))"),
        ("a * b + c", "(+ (* a b) c)"),
        ("(a + b) * c", "(* (+ a b) c)"),
        ("2 * -3", "(* 2 (- 3))"),
        ("a + b < c * d", "(< (+ a b) (* c d))"),
        ("a == b + 1", "(== a (+ b 1))"),
        ("not a == b", "(not (== a b))"),
        ("not a and b", "(and (not a) b)"),
        ("a or b and c", "(or a (and b c))"),
        ("a and b or c", "(or (and a b) c)"),
        ("a or b or c", "(or (or a b) c)"),
        ("if a > 0 then a + 1 else -a", "(if (> a 0) (+ a 1) (- a))"),
        ("if a then b else if c then d else e", "(if a b (if c d e))"),
        ("(if a then b else c) * 2", "(* (if a b c) 2)"),
        ("sum {i in I} a[i] * b[i] + c", "(+ (sum {i in I} (* a[i] b[i])) c)"),
        ("sum {i in I} (a[i] + c)", "(sum {i in I} (+ a[i] c))"),
        ("- sum {i in I} a[i]", "(- (sum {i in I} a[i]))"),
        ("2 * sum {i in I} a[i]", "(* 2 (sum {i in I} a[i]))"),
        ("sum {i in I} a[i] * 2", "(sum {i in I} (* a[i] 2))"),
        ("c - sum {i in I} a[i] - d", "(- (- c (sum {i in I} a[i])) d)"),
        ("sum {i in I} sum {j in J} q[i, j]", "(sum {i in I} (sum {j in J} q[i, j]))"),
        ("sum {i in I, j in J : i != j} q[i, j]", "(sum {i in I, j in J : (!= i j)} q[i, j])"),
        ("sum {i in 0..2} i", "(sum {i in (0..2)} i)"),
        ("max {i in I : i > 0} a[i]^2", "(max {i in I : (> i 0)} (^ a[i] 2))"),
        ("M.P[s, a, t]", "M.P[s, a, t]"),
        ("f(x)[0].y", "f(x)[0].y"),
        ("-M.R[s, a]^2", "(- (^ M.R[s, a] 2))"),
        ("value(M, policy, reward = R)", "value(M, policy, reward=R)"),
        ("[1, -2, [3]]", "[1, (- 2), [3]]"),
        ("card(1..5)", "card((1..5))"),
    ],
)
def test_precedence_tree(text: str, tree: str):
    assert ex(text) == tree


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("-2^2", -4.0),
        ("2^3^2", 512.0),
        ("(2^3)^2", 64.0),
        ("2^-1", 0.5),
        ("-2 ^ -2", -0.25),
        ("10 - 3 - 2", 5.0),
        ("12 / 3 / 2", 2.0),
        ("1 + 2 * 3", 7.0),
        ("(1 + 2) * 3", 9.0),
        ("2 * -3", -6.0),
        ("1 + 2 == 3", 1.0),
        ("1 + 2 < 2 * 1", 0.0),
        ("not 1 == 2", 1.0),
        ("not 0 and 0", 0.0),
        ("1 or 0 and 0", 1.0),
        ("(1 or 0) and 0", 0.0),
        ("if 1 > 0 then 5 else 6", 5.0),
        ("if 0 then 1 else if 1 then 2 else 3", 2.0),
        ("(if 0 then 1 else 2) + 1", 3.0),
        ("sum {i in 0..2} i * 2 + 1", 7.0),
        ("sum {i in 0..2} (i * 2 + 1)", 9.0),
        ("- sum {i in 0..2} i", -3.0),
        ("2 * sum {i in 0..2} i", 6.0),
        ("1 - sum {i in 0..2} i * 2 - 1", -6.0),
        ("sum {i in 0..3} i / 2 * 2", 6.0),
        ("sum {i in 0..2} i ^ 2", 5.0),
        ("sum {i in 0..2} sum {j in 0..1} i * j", 3.0),
        ("sum {i in 1..3 : i > 1} i", 5.0),
        ("sum {i in 0..2, j in 0..2 : i != j} 1", 6.0),
        ("prod {i in 1..4} i", 24.0),
        ("max {i in 0..3} (i - 2) ^ 2", 4.0),
        ("min {i in 1..4 : i > 2} i", 3.0),
        ("mean {i in 1..4} i", 2.5),
        ("mean {i in 1..4 : i > 2} i", 3.5),
        ("logsumexp {i in 1..2} 0", math.log(2)),
        ("max(1, 2) + min(1, 2)", 3.0),
        ("abs(-2) + sqrt(9) + exp(0) + log(1)", 6.0),
        ("norm([3, 4]) + norm1([1, -2]) + norm2([1, 2])", 13.0),
        ("dot([1, 2], [3, 4])", 11.0),
        ("quad([1, 2], [[1, 0], [0, 1]])", 5.0),
    ],
)
def test_precedence_values(text: str, expected: float):
    assert value(text) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_reduction_semantics_over_arrays():
    prelude = "set S = 0..2\nparam a[S] = [1, 2, 3]\nparam b[S] = [4, 5, 6]\nparam c = 10"
    assert value("sum {i in S} a[i] * b[i] + c", prelude) == 42.0
    assert value("sum {i in S} (a[i] * b[i] + c)", prelude) == 62.0
    assert value("sum {i in S, j in S : i != j} a[i] * a[j]", prelude) == 22.0
    assert value("sum(a) + max(b) + min(a) + mean(b) + prod(a)", prelude) == 6 + 6 + 1 + 5 + 6
    assert value("sum {i in S : a[i] >= 2} a[i]", prelude) == 5.0


def test_max_min_elementwise_and_reduce():
    t = param("param result[3] = max([1, 5, 2], [4, 0, 3])")
    assert t.tolist() == [4.0, 5.0, 3.0]
    assert value("max([1, 5, 2])") == 5.0


def test_comparisons_are_not_chained():
    found = diagnostics("brl 1\ncheck 1 < 2 == 1")
    assert [d.code for d in found] == ["E100"] and found[0].span.column == 13


def test_conditional_needs_parentheses_inside_an_expression():
    found = diagnostics("brl 1\nparam x = 1 + if 1 then 2 else 3")
    assert found[0].code == "E100" and found[0].span.column == 15
    assert "parentheses" in found[0].hint


def test_parse_expression_errors_are_brl_errors():
    with pytest.raises(BrlError) as info:
        parse_expression("1 +", "-D x")
    assert info.value.diagnostics[0].code == "E100"
    assert info.value.render().startswith("-D x:1:")


def test_syntax_error_messages_are_one_line():
    found = diagnostics('brl 1\nparam a = 1 """first\nsecond"""')
    assert found[0].message == 'unexpected `"""first...`'
    assert (found[0].span.line, found[0].span.column) == (2, 13)


def test_huge_numbers_in_the_header_and_seed():
    assert codes("brl " + "9" * 5000) == ["E102"]
    assert codes("brl 1\nseed " + "9" * 5000) == ["E901"]
    assert codes("brl 1\nseed 9223372036854775808") == ["E901"]
    assert compile_ok("brl 1\nseed 9223372036854775807").seed == 2**63 - 1


@pytest.mark.parametrize(
    "text",
    [
        "sum {i in I} a[i]",
        "min {i in I : i > 0} i",
        "sum(x)",
        "max(a, b)",
        "f(x, k = 2)",
        "-x",
        "not a",
        "x.y",
        "a[0]",
        "[1, 2]",
        "1 + 2 * 3",
        "2 * sum {i in I} a[i]",
        "a == b",
        "a or b",
        "if a then b else c",
        "x ^ 2",
        "M.P[s, a, t]",
    ],
)
def test_expression_spans_cover_their_text(text: str):
    node = parse_expression(text)
    span = node.span
    assert (span.line, span.end_line) == (1, 1)
    assert text[span.column - 1 : span.end_column - 1] == text


# ------------------------------------------------------------------ long chains and deep nesting


@pytest.mark.parametrize(("op", "term", "expected"), [
    ("+", "a", 1000.0), ("-", "a", -998.0), ("*", "b", 1.0), ("/", "b", 1.0),
    ("and", "a", 1.0), ("or", "a", 1.0),
])
def test_flat_chains_of_a_thousand_terms_compile(op: str, term: str, expected: float):
    text = f" {op} ".join([term] * 1000)
    assert value(text, "param a = 1\nparam b = 1") == expected
    tree = parse_expression(text)
    for _ in range(999):  # left-associative: ((a op a) op a) ...
        assert isinstance(tree, ir.Binary) and tree.op == op and isinstance(tree.right, ir.Name)
        tree = tree.left
    assert isinstance(tree, ir.Name)


def test_chain_limit_counts_operators():
    assert value(" + ".join(["1"] * (MAX_CHAIN + 1))) == MAX_CHAIN + 1
    found = diagnostics("brl 1\nparam p = " + " + ".join(["1"] * (MAX_CHAIN + 2)))
    assert [d.code for d in found] == ["E902"]
    assert found[0].message == f"expression chain longer than {MAX_CHAIN:,} operators"
    assert (found[0].span.line, found[0].span.column) == (2, 11)


def test_chain_of_products_and_mixed_operators():
    assert value(" + ".join(["2 * 3"] * 1500)) == 9000.0
    assert value(" - ".join(["(1 + 1)"] * 1200)) == -2 * 1198.0


def test_parentheses_still_count_as_nesting_inside_a_chain():
    deep = "(" * 200 + "1" + ")" * 200
    assert codes(f"brl 1\nparam p = {deep} + 1 + 1") == ["E902"]
    assert value("(" * 150 + "1" + ")" * 150 + " + 1" * 1000) == 1001.0
    # a chain nested in parentheses, in a chain: each chain is flat
    inner = "(" + " + ".join(["1"] * 500) + ")"
    assert value(" + ".join([inner] * 4)) == 2000.0


def test_ten_thousand_parentheses_are_a_located_error():
    found = diagnostics("brl 1\nparam p = " + "(" * 10_000 + "1" + ")" * 10_000)
    assert [d.code for d in found] == ["E902"]
    assert found[0].message == "expression nested more than 200 levels deep"
    assert found[0].span.line == 2


# ------------------------------------------------------------------ byte-order mark


def test_a_byte_order_mark_is_ignored_without_shifting_columns():
    assert compile_ok("\ufeffbrl 1\nparam a = 1\n").names["a"].t == 1
    found = diagnostics("\ufeffbrl 1 param a = b")
    assert [(d.code, d.span.line, d.span.column) for d in found] == [("E201", 1, 17)]
    with pytest.raises(BrlError) as info:
        parse(" \ufeffbrl 1")  # only a leading mark is one
    assert info.value.diagnostics[0].message == (
        "unexpected invisible character U+FEFF (zero width no-break space)")
    with pytest.raises(BrlError) as info:
        parse("\ufeffbrl 2")
    assert info.value.render().split("\n")[:3] == [
        "test.brl:1:5: error[E102]: unsupported language version 2",
        "1 | brl 2",
        "  |     ^",
    ]
    assert parse_expression("\ufeff1 + x").span.column == 1
    # read from a file: the mark is three bytes, and a byte that is not UTF-8 is still located
    assert decode(b"\xef\xbb\xbfbrl 1\n", "f.brl").text == "brl 1\n"
    with pytest.raises(BrlError) as info:
        decode(b"\xef\xbb\xbfbrl 1 \xff", "f.brl")
    assert info.value.diagnostics[0].span.column == 7


# ------------------------------------------------------------------ the driver runs Lark's tables


def _lark_outcome(lark, text: str, start: str):
    """What Lark's own LALR parser says of `text`: None if it parses, else the diagnostic the
    compiler makes of its syntax error."""
    try:
        lark.parse(text, start=start)
    except UnexpectedCharacters as exc:
        return _bad_character(text, exc.pos_in_stream, (exc.line, exc.column))
    except UnexpectedToken as exc:
        token = exc.token
        loc = before = None
        if token.type != "$END":
            loc = (token.line, token.column, token.end_line, token.end_column)
            pos = token.start_pos
            if not text[text.rfind("\n", 0, pos) + 1:pos].strip():  # it opens its line
                previous = list(lark.lex(text[:pos]))
                if previous:
                    t = previous[-1]
                    before = (t.line, t.column, t.end_line, t.end_column)
        # the parse stack as the driver holds it: a token not yet reduced is its text
        stack = [str(v) if isinstance(v, Token) else v
                 for v in exc.interactive_parser.parser_state.value_stack]
        return _syntax_diagnostic(token.type, str(token), loc, set(exc.expected), text, before,
                                  stack)
    return None


def _mutants(count: int) -> list[str]:
    rng = random.Random(2)
    texts = [p.read_text(encoding="utf-8") for p in PROBLEMS]
    pieces = ["(", ")", "[", "]", "{", "}", ",", "=", "==", "+", "-", "*", "^", "..", ".", ":",
              "~", "<", "sum", "if", "then", "else", "not", "and", "in", "param", "x", "1",
              "2.5e3", '"s"', '"""a\nb"""', "\n", "#c\n", "$", "on", "solve"]
    out = []
    for _ in range(count):
        text = rng.choice(texts)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(text) + 1)
            if rng.random() < 0.5:
                text = text[:at] + text[at + rng.randint(1, 6):]
            else:
                text = text[:at] + rng.choice(pieces) + text[at:]
        out.append(text)
    return out


ARRAYS = """brl 1
param w[3] = [1, -2.5, +3e-2]
param t[2, 2, 2] = [[[1, 2], [3, 4]], [[-5, 6.0], [7, --8]]]
param m[2, 2] = [[1, 2],  # a comment
                 [3, 4]]
var x[2] = [0, 0] in [[-1, -2], inf]
let u = sum {i in [1, 2]} [[1, 2]][0, i - 1] + [1, 2][0] * x[[0][0]]
mdp M = table {
    states = 2
    actions = 1
    transition = [[[0.5, 0.5]], [[1, 0]]]
}
lower M { temperature = 0.5  reward[s, a] = [1, -1][s] + (if x[0] > 0 then [2, 3][s] else 0) }
upper minimize norm2(x - [1, 2])
solve m_sobirl(outer = 3)
"""


def _array_texts(count: int) -> list[str]:
    """Texts dense in arrays of numbers, broken at random, and arrays nested near MAX_DEPTH."""
    rng = random.Random(5)
    pieces = ["[", "]", ",", "-", "+", "1", "2.5", "1e999", "#c\n", "\n", "a", "(", ")", "[1, 2]",
              "[[1], [2, 3]]", "inf", " ", "."]
    out = [ARRAYS]
    for _ in range(count):
        text = ARRAYS
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(text) + 1)
            if rng.random() < 0.4:
                text = text[:at] + text[at + rng.randint(1, 4):]
            else:
                text = text[:at] + rng.choice(pieces) + text[at:]
        out.append(text)

    def array(depth: int) -> str:
        if depth == 0:
            return rng.choice(["", "-", "+", "- ", "--"]) + rng.choice(
                ["1", "2.5", "3e-2", "0", "12345678901234567890", "1.0E+3"])
        items = [array(depth - 1) for _ in range(rng.randint(1, 3))]
        return "[" + rng.choice([",", ", ", " ,\n "]).join(items) + rng.choice(["", "\n"]) + "]"

    for _ in range(40):
        written = array(rng.randint(1, 4))
        out += ["brl 1\nparam p = " + "-" * signs + written for signs in range(170, 205, 3)]
    out += ["brl 1\nparam p = " + "[" * levels + "-1" + "]" * levels
            for levels in (49, 50, 51, 99, 100, 101, 5000)]
    # integers of 309 digits and more are too large for the tables, whatever their value
    out += ["brl 1\nparam p = [" + "0" * 310 + "1]", "brl 1\nparam p = [1" + "0" * 308 + ", 2]",
            "brl 1\nparam p = [1" + "0" * 307 + ", 2]"]
    return out


def test_arrays_read_whole_parse_as_they_do_token_by_token():
    """The driver reads an array written in numbers with regular expressions, in one step: the
    IR, every syntax error and every nesting limit must be those of the tables, token by token."""
    def parse(text: str, fast: bool):
        try:
            return _tables().run(text, "start", fast_numbers=fast)
        except _SyntaxErrors as exc:
            return exc.diagnostics

    texts = [p.read_text(encoding="utf-8") for p in PROBLEMS]
    texts += [text for doc in DOCS for _, text in brl_blocks(doc.read_text(encoding="utf-8"))]
    for text in texts + _array_texts(400):
        assert parse(text, True) == parse(text, False), text
    assert isinstance(parse(ARRAYS, True), ir.Program)


def test_the_driver_accepts_and_rejects_exactly_what_lark_does():
    """The parser runs Lark's LALR tables with its own loop and tokeniser: on valid files and on
    broken ones, it must agree with Lark's parser on where the first syntax error is and what
    was expected there."""
    lark = Lark(grammar_text(), parser="lalr", strict=True, start=["start", "expr"],
                maybe_placeholders=False, lexer="basic")
    texts = [p.read_text(encoding="utf-8") for p in PROBLEMS]
    texts += [text for doc in DOCS for _, text in brl_blocks(doc.read_text(encoding="utf-8"))]
    texts += _mutants(400)
    checked = 0
    for text in texts:
        for start, source in (("start", text), ("expr", text.split("\n")[-2])):
            try:
                _tables().run(source, start)
                mine = None
            except _SyntaxErrors as exc:  # (its note on an unclosed bracket is the driver's)
                mine = dataclasses.replace(exc.diagnostics[0], notes=())
            if mine is not None and mine.code != "E100":
                continue  # a semantic error (too deep, too large) stops the parse first
            assert mine == _lark_outcome(lark, source, start), source
            checked += 1
    assert checked > 500


def test_misspelt_keywords_and_unterminated_strings():
    from conftest import diagnostics

    diag = diagnostics("brl 1\nlowr M { temperature = 1 }")[0]
    assert diag.code == "E100" and diag.hint.startswith("did you mean `lower`?")
    diag = diagnostics('brl 1\nmdp m = gridworld(map = """\nS.G\n')[0]
    assert "never closed" in diag.message and (diag.span.line, diag.span.column) == (2, 25)
    diag = diagnostics('brl 1\nproblem p "never closed\nparam a = 1\n')[0]
    assert "no closing quote" in diag.message and (diag.span.line, diag.span.column) == (2, 11)


def test_an_unknown_string_escape_is_an_error_at_the_escape():
    from conftest import diagnostics

    diag = diagnostics('brl 1\nproblem p "a\\qb"\n')[0]
    assert diag.code == "E100" and "unknown escape `\\q`" in diag.message
    assert (diag.span.line, diag.span.column, diag.span.end_column) == (2, 13, 15)
    text = 'brl 1\ncheck 1 == 1, "a \\\\ b \\n c \\" d \\t e"\n'
    program = parse_source(SourceFile("t.brl", text))
    assert program.statements[-1].message == 'a \\ b \n c " d \t e'


def test_every_broken_statement_is_reported_once():
    """After a syntax error the parser resumes at the next line that opens with a statement
    keyword: one diagnostic per broken statement, none for the sound ones between them."""
    text = ("brl 1\n"
            "param a = (1 +\n"                 # ends too early: reported at its end
            "param b = 2\n"
            "var x[2] = 0 in [0, 1] ]\n"       # a stray bracket
            "upper minimize norm2(x)\n"
            "set set = {p, q}\n"               # a keyword as a name, mid-line: no resync there
            "check b > 1 $\n")
    found = diagnostics(text)
    assert [(d.span.line, d.span.column) for d in found] == [(2, 15), (4, 24), (6, 5), (7, 13)]
    assert found[0].message == "this statement is incomplete"
    assert "before `param` on line 3" in found[0].hint
    assert "reserved word" in found[2].message


def test_a_broken_header_stops_the_parse_at_one_error():
    found = diagnostics("brl one\nparam a = 1 +\nparam b = (\n")
    assert len(found) == 1 and found[0].span.line == 1


def test_a_statement_cut_short_names_the_bracket_it_left_open():
    found = diagnostics("brl 1\nparam f = (\n  1 +\n  2\nparam g = [1, [2\n")
    assert [d.notes for d in found] == [
        ("the `(` at line 2, column 11 is not closed by `)`",),
        ("the `[` at line 5, column 15 is not closed by `]`",)]


def test_lone_carriage_returns_break_lines():
    found = diagnostics("brl 1\rparam a = 1\rparam b = (a +\r")
    assert (found[0].span.line, found[0].span.column) == (3, 15)


def test_two_values_in_a_row_suggest_a_missing_operator_or_comma():
    found = diagnostics("brl 1\nparm h = 1\nparam f = 3 4\nparam g[2] = [1 2]\n")
    assert ["two values in a row" in (d.hint or "") for d in found] == [False, True, True]
    assert "did you mean `param`" in found[0].hint


def test_a_statement_inside_a_block_is_reported_once_and_the_block_still_closes():
    found = diagnostics("brl 1\nmdp M = random_mdp(states = 3, actions = 2)\nvar x[M.S, M.A] = 0\n"
                        "lower M {\n    temperature = 0.5\n    let bonus = 1\n"
                        "    reward[s, a] = x[s, a] + bonus\n}\nupper maximize value(M, policy)\n"
                        "param p = (1\n")
    assert [(d.span.line, d.span.column) for d in found] == [(6, 5), (10, 13)]
    assert "cannot appear inside a block" in found[0].message
    found = diagnostics("brl 1\nmdp M = table {\n    states = 2\n    set = 3\n}\n")
    assert [d.message for d in found] == ["`set` is a reserved word and cannot be a name"]


def test_a_closed_bracket_waiting_for_a_body_is_not_called_open():
    found = diagnostics("brl 1\nparam a = sum {i in 1..3}\nparam b = (1 + [2, 3\n")
    assert found[0].notes == ()
    assert found[1].notes == ("the `[` at line 3, column 16 is not closed by `]`",)


def test_the_nesting_limit_counts_the_expression_alone_and_points_at_it():
    compile_ok("brl 1\nparam a = " + "(" * 200 + "1" + ")" * 200 + "\n")
    found = diagnostics("brl 1\nparam a = " + "(" * 201 + "1" + ")" * 201 + "\n")
    assert found[0].code == "E902" and (found[0].span.line, found[0].span.column) == (2, 11)


@pytest.mark.parametrize(("body", "message", "hint"), [
    ("param a = 2 ** 3", "unexpected `*`", "powers are written `^`"),
    ("param a = 2;", "unexpected character `;`", "no `;` is needed"),
    ("param a = 2   // the price", "unexpected `/`", "comments start with `#`"),
    ("param a = 1\ncheck a > 0 && a < 2", "unexpected character `&`", "write `and`"),
    ("param q = !1", "unexpected character `!`", "write `not`"),
    ("param q = 1 <> 2", "unexpected `>`", "`not equal` is written `!=`"),
    ("param q = 5 % 2", "unexpected character `%`", "no remainder operator"),
    ("mdp M = random_mdp(states = 2, actions = 2)\nlower M { temperature = 0.5, reward[s, a] "
     "= 0 }", "unexpected `,`", "separated by spaces or line breaks, not commas"),
    ("set S = 0..2\nparam a = sum(i in S) i", "unexpected `in`", "`sum {i in S} w[i]`"),
    ("param w[3] = [1, 2, 3,]", "unexpected `]`", "remove the comma"),
    ("param m = max(1, 2,)", "unexpected `)`", "remove the comma"),
    ('problem "my problem"', 'unexpected `"my problem"`', "`problem my_problem \"Title\"`"),
    ("problem p \u201cmy title\u201d", "unexpected character `\u201c`", "straight double quotes"),
    ("param \u03bb = 0.05", "unexpected character `\u03bb`", "ASCII letters, digits and `_`"),
    ("param a = \u22121", "unexpected character `\u2212`", "write the minus sign as `-`"),
    ("param lam\u200b = 0.05", "unexpected invisible character U+200B (zero width space)",
     "delete it"),
    ("param lam\u00a0= 0.05", "unexpected invisible character U+00A0 (no-break space)",
     "delete it"),
    ("seed -1", "unexpected `-`", "a seed is a whole number"),
    ("solve on cpu", "unexpected `on`", "`solve m_sobirl on cpu`"),
    ("set A = {on, off}", "`on` is a reserved word and cannot be a name", "`on_`"),
    ("param q = 'a'", "unexpected character `'`", 'double quotes: "like this"'),
    ("param q = 1)", "unexpected `)`: no `(` is open here", "remove it"),
    ("param q = [1, 2]]", "unexpected `]`: no `[` is open here", "remove it"),
    ("param q = M..S", "unexpected `..`", "written with one dot: `M.S`"),
    ("param q = []", "unexpected `]`", "an array has at least one entry"),
    ("param q = 1..5", "unexpected `..`", "where a set is expected: `set S = 1..5`"),
])
def test_habits_of_other_languages_get_a_hint(body, message, hint):
    diag = diagnostics("brl 1\n" + body)[0]
    assert diag.code == "E100" and diag.message == message and hint in diag.hint, diag
