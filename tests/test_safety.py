"""A .brl file is untrusted data: it cannot read outside its folder, unpickle, or run code."""

from __future__ import annotations

import ast
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, codes

from bilevel_dsl import BrlError, compile_file
from bilevel_dsl.cli import solver_catalog


def load_codes(folder: Path, line: str) -> list[str]:
    brl = folder / "p.brl"
    brl.write_text(f"brl 1\n{line}\n", encoding="utf-8")
    try:
        compile_file(brl)
    except BrlError as err:
        assert all(d.span is not None for d in err.diagnostics)
        return [d.code for d in err.diagnostics]
    return []


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """tmp/outside.npy (not readable) and tmp/project/ (the .brl file's folder)."""
    np.save(tmp_path / "outside.npy", np.arange(3.0))
    inside = tmp_path / "project"
    (inside / "data").mkdir(parents=True)
    np.save(inside / "ok.npy", np.arange(3.0))
    np.save(inside / "data" / "ok.npy", np.arange(3.0))
    return inside


def test_files_inside_the_folder_load(project):
    assert load_codes(project, 'param a[3] = load("ok.npy")') == []
    assert load_codes(project, 'param a[3] = load("data/ok.npy")') == []
    assert load_codes(project, 'param a[3] = load("./data/ok.npy")') == []


@pytest.mark.parametrize(
    "path",
    [
        "../outside.npy",
        "data/../../outside.npy",
        "data/../ok.npy",  # `..` is refused even when it stays inside
        "/etc/passwd",
        "/etc/passwd.npy",
        "//etc/passwd.csv",
    ],
)
def test_paths_that_leave_the_folder_are_refused(project, path):
    assert load_codes(project, f'param a = load("{path}")') == ["E603"]


def test_absolute_path_to_a_real_file_is_refused(project, tmp_path):
    assert load_codes(project, f'param a = load("{tmp_path / "outside.npy"}")') == ["E603"]


def test_symlinks_that_lead_outside_are_refused(project, tmp_path):
    os.symlink(tmp_path / "outside.npy", project / "link.npy")
    os.symlink(tmp_path, project / "escape")
    assert load_codes(project, 'param a = load("link.npy")') == ["E603"]
    assert load_codes(project, 'param a = load("escape/outside.npy")') == ["E603"]
    os.symlink(project / "ok.npy", project / "inner.npy")
    assert load_codes(project, 'param a[3] = load("inner.npy")') == []


def test_only_npy_and_csv_are_read(project):
    (project / "script.py").write_text("print('hi')\n")
    (project / "p.pkl").write_bytes(b"\x80\x04K\x01.")
    assert load_codes(project, 'param a = load("script.py")') == ["E602"]
    assert load_codes(project, 'param a = load("p.pkl")') == ["E602"]
    assert load_codes(project, 'param a = load("p.brl")') == ["E602"]


def test_pickled_npy_is_refused_without_unpickling(project, monkeypatch):
    np.save(project / "objects.npy", np.array([{"a": 1}, None], dtype=object),
            allow_pickle=True)
    import pickle

    def boom(*args, **kwargs):  # pragma: no cover - must never run
        raise AssertionError("brl unpickled a data file")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    brl = project / "p.brl"
    brl.write_text('brl 1\nparam a = load("objects.npy")\n', encoding="utf-8")
    with pytest.raises(BrlError) as info:
        compile_file(brl)
    (diag,) = info.value.diagnostics
    assert diag.code == "E602" and diag.span.line == 2
    assert "objects.npy" in diag.message and "pickle.load" not in info.value.render()


def test_bad_data_files_are_diagnostics(project):
    (project / "text.npy").write_text("not an array")
    (project / "letters.csv").write_text("1,2\nx,3\n")
    (project / "ragged.csv").write_text("1,2\n3\n")
    (project / "nan.csv").write_text("1,nan\n")
    (project / "empty.csv").write_text("")
    np.save(project / "strings.npy", np.array(["a", "b"]))
    for name in ("text.npy", "letters.csv", "ragged.csv", "nan.csv", "strings.npy"):
        assert load_codes(project, f'param a = load("{name}")') == ["E602"], name
    assert load_codes(project, 'param a = load("empty.csv")') == ["E602"]
    assert load_codes(project, 'param a = load("missing.npy")') == ["E601"]
    (project / "folder.npy").mkdir()
    assert load_codes(project, 'param a = load("folder.npy")') == ["E601"]


def load_message(folder: Path, line: str) -> str:
    brl = folder / "p.brl"
    brl.write_text(f"brl 1\n{line}\n", encoding="utf-8")
    with pytest.raises(BrlError) as info:
        compile_file(brl)
    return info.value.render()


def test_data_errors_say_what_is_wrong(project):
    """Lines counted from 1 as an editor does, a loop of links, a folder, a pipe and `..` are
    each named for what they are (a loop of links used to be an internal error)."""
    (project / "letters.csv").write_text("1,2\nx,3\n")
    (project / "ragged.csv").write_text("# a comment\n1,2\n3\n")
    assert "line 2, value 1 (`x`) is not a number" in load_message(
        project, 'param a = load("letters.csv")')
    assert "line 3 has 1 value, the first line 2" in load_message(
        project, 'param a = load("ragged.csv")')
    os.symlink(project / "loop2.npy", project / "loop1.npy")
    os.symlink(project / "loop1.npy", project / "loop2.npy")
    assert load_codes(project, 'param a = load("loop1.npy")') == ["E601"]
    assert "symbolic links form a loop" in load_message(project, 'param a = load("loop1.npy")')
    (project / "folder.npy").mkdir()
    assert "is a folder" in load_message(project, 'param a = load("folder.npy")')
    os.mkfifo(project / "pipe.csv")
    assert "not a regular file" in load_message(project, 'param a = load("pipe.csv")')
    assert "goes up a folder" in load_message(project, 'param a = load("data/../ok.npy")')


def npy_with_header(path: Path, header: str, payload: bytes) -> None:
    header = header + " " * (118 - len(header)) + "\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode()
                     + payload)


def test_crafted_npy_files_are_diagnostics(project, tmp_path):
    marker = tmp_path / "pwned"
    npy_with_header(project / "huge.npy",
                    "{'descr': '<f8', 'fortran_order': False, 'shape': (10**12,), }", b"\0" * 8)
    npy_with_header(project / "huge2.npy",
                    "{'descr': '<f8', 'fortran_order': False, 'shape': (1000000000000,), }",
                    b"\0" * 8)
    npy_with_header(project / "short.npy",
                    "{'descr': '<f8', 'fortran_order': False, 'shape': (3,), }", b"\0" * 8)
    npy_with_header(project / "evil.npy",
                    "{'descr': '<f8', 'fortran_order': False, 'shape': (1,), 'x': "
                    f"__import__('os').system('touch {marker}')}}", b"\0" * 8)
    np.savez(project / "archive.npz", a=np.zeros(3))
    (project / "archive.npz").rename(project / "archive.npy")
    np.save(project / "complex.npy", np.array([1 + 2j, 3]))
    for name in ("huge.npy", "huge2.npy", "short.npy", "evil.npy", "archive.npy",
                 "complex.npy"):
        assert load_codes(project, f'param a = load("{name}")') == ["E602"], name
    assert not marker.exists()


def test_loading_needs_a_file_on_disk():
    assert codes('brl 1\nparam a = load("x.npy")') == ["E603"]
    assert codes("brl 1\nparam a = load(1)") == ["E305"]


def test_names_from_a_file_are_never_code(tmp_path):
    marker = tmp_path / "pwned"
    for line in (
        f'param a = __import__("os").system("touch {marker}")',
        f'param a = eval("open(\'{marker}\', \'w\')")',
        f'param a = exec("open(\'{marker}\', \'w\')")',
        "param a = os.system",
    ):
        found = codes("brl 1\n" + line)
        assert found and set(found) <= {"E100", "E201", "E305"}, (line, found)
    assert not marker.exists()


def test_solver_names_are_not_imported():
    assert solver_catalog("exact", {}) == []  # loads the registry's own modules first
    before = set(sys.modules)
    for name in ("antigravity", "this", "os", "solvers.registry", "__main__", "../x"):
        problems = solver_catalog(name, {})
        assert [p[0] for p in problems] == ["E801"], name
    assert "antigravity" not in sys.modules and "this" not in sys.modules
    assert set(sys.modules) == before


# ------------------------------------------------------------------ the source code itself

FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve", "joblib", "cloudpickle"}


def sources() -> list[Path]:
    files = sorted((ROOT / "bilevel_dsl").rglob("*.py")) + sorted((ROOT / "solvers").rglob("*.py"))
    assert len(files) >= 10
    return files


def call_name(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return ""


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_source_has_no_dynamic_code_or_unpickling(path: Path):
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    for node in ast.walk(tree):
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Call):
            name = call_name(node)
            if isinstance(node.func, ast.Name):
                assert name not in FORBIDDEN_CALLS, f"{where}: calls {name}()"
            keywords = {k.arg: k.value for k in node.keywords}
            if "allow_pickle" in keywords:
                value = keywords["allow_pickle"]
                assert isinstance(value, ast.Constant) and value.value is False, where
            if name == "load" and isinstance(node.func, ast.Attribute):
                owner = node.func.value
                owner_name = owner.id if isinstance(owner, ast.Name) else ""
                assert owner_name != "pickle", f"{where}: pickle.load"
                if owner_name == "torch":  # checkpoints: tensors only, never arbitrary objects
                    value = keywords.get("weights_only")
                    assert isinstance(value, ast.Constant) and value.value is True, \
                        f"{where}: torch.load without weights_only=True"
                if owner_name in ("np", "numpy"):
                    assert "allow_pickle" in keywords, f"{where}: np.load without allow_pickle"
            if name == "import_module":
                # only the registry imports modules, by its fixed built-in list
                assert path.name == "registry.py", f"{where}: import_module"
        if isinstance(node, ast.Import):
            for alias in node.names:
                assert alias.name.split(".")[0] not in FORBIDDEN_MODULES, where
        if isinstance(node, ast.ImportFrom) and node.module:
            assert node.module.split(".")[0] not in FORBIDDEN_MODULES, where
    for word in ("eval(", "exec(", "__import__"):
        assert word not in text, f"{path.relative_to(ROOT)} contains {word}"


def test_registry_imports_only_its_fixed_list():
    import solvers.registry as registry

    tree = ast.parse(Path(registry.__file__).read_text(encoding="utf-8"))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and call_name(n) ==
             "import_module"]
    assert len(calls) == 1
    (arg,) = calls[0].args
    # the module name comes from the loop over the registry's built-in modules ...
    loops = [n for n in ast.walk(tree) if isinstance(n, ast.For) and calls[0] in ast.walk(n)]
    assert loops and isinstance(arg, ast.Name) and ast.unparse(loops[0].target) == arg.id
    assert ast.unparse(loops[0].iter) == "self._builtin_modules"
    # ... which is a constant tuple built from AUTO_ORDER, a tuple of string literals
    assert all(isinstance(name, str) for name in registry.AUTO_ORDER)
    assert registry.REGISTRY._builtin_modules == tuple(
        f"solvers.{name}" for name in registry.AUTO_ORDER)
    literal = next(n for n in ast.walk(tree) if isinstance(n, ast.AnnAssign)
                   and ast.unparse(n.target) == "AUTO_ORDER")
    assert isinstance(literal.value, ast.Tuple)
    assert all(isinstance(e, ast.Constant) for e in literal.value.elts)
