"""The IR's JSON form: a lossless round trip (IR -> JSON -> IR) and a JSON Schema, both derived
from the dataclass definitions in `ir.py`, so they cannot drift apart."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from . import ir
from .parser import MAX_CHAIN, MAX_DEPTH

# An expression chain (`a1 + ... + an`) is a tree as deep as it is long, and its JSON nests as
# deep: writing and reading it takes a few Python frames per level, more than the default
# recursion limit of 1,000 allows for the longest chains the parser accepts.
_FRAMES = 4 * (MAX_CHAIN + MAX_DEPTH + 100)

_NODES: dict[str, type] = {
    cls.__name__: cls
    for cls in vars(ir).values()
    if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls is not ir.Span
}
_HINTS = {name: typing.get_type_hints(cls, vars(ir)) for name, cls in _NODES.items()}


class IRFormatError(ValueError):
    """The JSON is not a brl IR document of a version this library reads."""


def to_dict(node: Any) -> Any:
    if isinstance(node, ir.Span):
        return [node.line, node.column, node.end_line, node.end_column]
    if dataclasses.is_dataclass(node):
        out: dict[str, Any] = {"node": type(node).__name__}
        for f in dataclasses.fields(node):
            out[f.name] = to_dict(getattr(node, f.name))
        return out
    if isinstance(node, tuple):
        if node and type(node[0]) is float:  # a NumberArray's numbers
            return list(node)
        return [to_dict(item) for item in node]
    return node


@contextmanager
def _frames() -> Iterator[None]:
    """Room for _FRAMES more Python frames while the block runs (a C stack of the default
    8 MiB holds them; a deeper document is refused with a RecursionError, not a crash)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + _FRAMES)
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


def to_json(program: ir.Program, indent: int | None = 2) -> str:
    if not isinstance(program, ir.Program):  # a CheckedProgram holds one: `.program`
        raise TypeError(f"to_json takes an ir.Program, not {type(program).__name__}"
                        + (" (use its .program)" if hasattr(program, "program") else ""))
    with _frames():
        data = to_dict(program)
        if indent is None:
            return json.dumps(data, allow_nan=False)
        return _indented(data, indent)


def _indented(data: Any, indent: int) -> str:
    """``json.dumps(data, indent=indent, allow_nan=False)`` with a list of plain values on one
    line, in one pass over a stack: the standard encoder nests a generator per level, which
    makes a long chain's JSON quadratic."""
    out: list[str] = []
    stack: list[Any] = [(data, 0)]  # (value, depth) to write, or text to copy
    while stack:
        item = stack.pop()
        if type(item) is str:
            out.append(item)
            continue
        value, depth = item
        if type(value) is dict or type(value) is list:
            is_dict = type(value) is dict
            if not value:
                out.append("{}" if is_dict else "[]")
                continue
            if not is_dict and not any(type(v) is dict or type(v) is list for v in value):
                out.append("[" + ", ".join(map(_leaf, value)) + "]")  # a span, a shape, numbers
                continue
            out.append("{" if is_dict else "[")
            pad = "\n" + " " * (indent * (depth + 1))
            stack.append("\n" + " " * (indent * depth) + ("}" if is_dict else "]"))
            entries = list(value.items()) if is_dict else list(enumerate(value))
            for n, (key, child) in enumerate(reversed(entries)):
                stack.append((child, depth + 1))
                label = f"{_encode_string(key)}: " if is_dict else ""
                stack.append(("," if n < len(entries) - 1 else "") + pad + label)
        else:
            out.append(_leaf(value))
    return "".join(out)


_encode_string = json.encoder.encode_basestring_ascii


def _leaf(value: Any) -> str:
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if type(value) is str:
        return _encode_string(value)
    if type(value) is float and not math.isfinite(value):
        raise ValueError(f"Out of range float values are not JSON compliant: {value!r}")
    return repr(value)


def from_json(text: str) -> ir.Program:
    with _frames():
        return _from_json(text)


def _from_json(text: str) -> ir.Program:
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise IRFormatError(f"not JSON: {exc}") from None
    except RecursionError:
        raise IRFormatError("not a brl IR document (nested too deeply)") from None
    if not isinstance(data, dict) or data.get("node") != "Program":
        raise IRFormatError("not a brl IR document (the top node must be a Program)")
    version = data.get("ir_version")
    if type(version) is not int or version not in ir.READABLE_IR_VERSIONS:
        raise IRFormatError(
            f"IR version {version!r} is not supported (this library reads versions "
            + " and ".join(map(str, ir.READABLE_IR_VERSIONS)) + ")")
    try:
        program = _build(data, ir.Program, "$")
    except RecursionError:
        raise IRFormatError("not a brl IR document (nested too deeply)") from None
    assert isinstance(program, ir.Program)
    if version < 2 and any(type(node) is ir.NumberArray for node in ir.walk(program)):
        raise IRFormatError("a NumberArray in an IR document of version 1, which has none")
    return ir.with_features(program)  # what the objective uses, recomputed


def _finite(value: int | float, path: str) -> float:
    """A number of the IR: finite, as brl's literals are (`inf` is a name)."""
    try:
        number = float(value)
    except OverflowError:  # an integer of hundreds of digits
        number = math.inf
    if not math.isfinite(number):
        raise IRFormatError(f"{path}: {str(value)[:20]} is not a finite number")
    return number


def _no_constant(name: str) -> None:
    """Python's json reads NaN and Infinity, which are not JSON (nor brl numbers)."""
    raise IRFormatError(f"{name} is not a JSON number")


def _build(data: Any, hint: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is ir.Span:
        if not (isinstance(data, list) and len(data) == 4 and all(type(v) is int
                                                                   for v in data)):
            raise IRFormatError(f"{path}: a span is [line, column, end_line, end_column]")
        return ir.Span(*data)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if data is None and type(None) in options:
            return None
        if isinstance(data, dict) and "node" in data:
            cls = _NODES.get(data["node"])
            if cls is None or cls not in options:
                raise IRFormatError(f"{path}: unexpected node {data.get('node')!r}")
            return _build(data, cls, path)
        for option in options:
            if option is not type(None):
                return _build(data, option, path)
    if origin is tuple:
        (item_hint, _ellipsis) = typing.get_args(hint)
        if not isinstance(data, list):
            raise IRFormatError(f"{path}: expected a list")
        if item_hint is float:  # a NumberArray's numbers: one check for all of them
            if not all(type(v) is float or type(v) is int for v in data):
                raise IRFormatError(f"{path}: expected a list of numbers")
            return tuple(_finite(v, path) for v in data)
        return tuple(_build(item, item_hint, f"{path}[{i}]") for i, item in enumerate(data))
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(data, dict) or data.get("node") != hint.__name__:
            raise IRFormatError(f"{path}: expected a {hint.__name__} node")
        hints = _HINTS[hint.__name__]
        unknown = sorted(set(data) - set(hints) - {"node"})
        if unknown:  # as the schema's additionalProperties: false
            raise IRFormatError(f"{path}: {hint.__name__} has no field {unknown[0]!r}")
        kwargs = {}
        for f in dataclasses.fields(hint):
            if f.name not in data:
                raise IRFormatError(f"{path}: {hint.__name__} lacks field {f.name!r}")
            kwargs[f.name] = _build(data[f.name], hints[f.name], f"{path}.{f.name}")
            words = _WORDS.get((hint.__name__, f.name))
            if words is not None:
                value = kwargs[f.name]
                for word in value if isinstance(value, tuple) else (value,):
                    if word not in words:
                        raise IRFormatError(f"{path}.{f.name}: {word!r} is not one of "
                                            + ", ".join(repr(w) for w in words))
        if hint is ir.NumberArray and (
                not kwargs["shape"] or min(kwargs["shape"]) < 1
                or math.prod(kwargs["shape"]) != len(kwargs["values"])):
            raise IRFormatError(f"{path}: a NumberArray's shape {list(kwargs['shape'])} does "
                                f"not hold its {len(kwargs['values'])} values")
        if hint in (ir.Number, ir.NumberArray) and kwargs["is_integer"] and not all(
                v.is_integer() for v in (kwargs.get("values") or (kwargs.get("value"),))):
            raise IRFormatError(f"{path}: is_integer, but a value is not a whole number")
        return hint(**kwargs)
    if hint is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            raise IRFormatError(f"{path}: expected a number")
        return _finite(data, path)
    if hint in (int, str, bool):
        if type(data) is not hint:
            raise IRFormatError(f"{path}: expected {hint.__name__}")
        return data
    raise IRFormatError(f"{path}: cannot read {hint!r}")  # pragma: no cover


# String fields that hold one of a few words: anything else would be computed as something.
_WORDS: dict[tuple[str, str], tuple[str, ...]] = {
    ("Unary", "op"): ir.UNARY_OPS,
    ("Binary", "op"): ir.BINARY_OPS,
    ("Reduction", "op"): ir.REDUCERS,
    ("UpperDecl", "sense"): ir.SENSES,
    ("UpperDecl", "form"): ir.FORMS,
    ("UpperDecl", "features"): ("policy", *ir.POLICY_FUNCTIONALS, *ir.TRAJECTORY_FUNCTIONALS),
    ("MdpDecl", "kind"): ir.MDP_KINDS,
}


def json_schema() -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) for the IR's JSON form."""
    defs: dict[str, Any] = {
        "Span": {
            "type": "array",
            "items": {"type": "integer"},
            "minItems": 4,
            "maxItems": 4,
            "description": "[line, column, end_line, end_column], 1-based, end exclusive",
        }
    }
    for name, cls in _NODES.items():
        props: dict[str, Any] = {"node": {"const": name}}
        for f in dataclasses.fields(cls):
            props[f.name] = _schema_of(_HINTS[name][f.name])
            words = _WORDS.get((name, f.name))
            if words is not None:
                target = props[f.name]["items"] if props[f.name].get("type") == "array" \
                    else props[f.name]
                target["enum"] = list(words)
        defs[name] = {
            "type": "object",
            "properties": props,
            "required": ["node", *(f.name for f in dataclasses.fields(cls))],
            "additionalProperties": False,
        }
        if cls.__doc__ and not cls.__doc__.startswith(name + "("):
            defs[name]["description"] = " ".join(cls.__doc__.split())
    defs["Program"]["properties"]["ir_version"] = {"const": ir.IR_VERSION}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://brl.dev/schema/ir-v{ir.IR_VERSION}.json",
        "title": f"brl IR, version {ir.IR_VERSION}",
        "$ref": "#/$defs/Program",
        "$defs": defs,
    }


def _schema_of(hint: Any) -> dict[str, Any]:
    origin = typing.get_origin(hint)
    if hint is ir.Span or (isinstance(hint, type) and hint.__name__ in _NODES):
        return {"$ref": f"#/$defs/{hint.__name__}"}
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_schema_of(option) for option in typing.get_args(hint)]}
    if origin is tuple:
        return {"type": "array", "items": _schema_of(typing.get_args(hint)[0])}
    return {
        float: {"type": "number"},
        int: {"type": "integer"},
        str: {"type": "string"},
        bool: {"type": "boolean"},
        type(None): {"type": "null"},
    }[hint]
