"""The solver registry: which solvers exist, what they can solve, and their options.

Every solver module defines a module-level ``SPEC: SolverSpec``. The registry imports the
built-in modules on first use, in ``AUTO_ORDER``; ``--solver auto`` picks the first registered
solver capable of the problem, so that order is the documented preference:

    m_sobirl, exact, sobirl, stoc_sobirl, drlhf

(future: deep solvers). A built-in module that does not exist
yet is skipped, so the registry always imports. Error messages here are for the user: the
command line prints them without a traceback.
"""

from __future__ import annotations

import difflib
import importlib
import math
import re
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bilevel_dsl.diagnostics import did_you_mean
from bilevel_dsl.ir import TRAJECTORY

from .result import Monitor, SolveResult

if TYPE_CHECKING:
    from bilevel_dsl.instance import TabularProblem

AUTO_ORDER: tuple[str, ...] = ("m_sobirl", "exact", "sobirl", "stoc_sobirl", "drlhf", "sobirl_sac",
                               "drlhf_sac", "sac_true")
OPTION_TYPES: tuple[type, ...] = (int, float, str, bool)
_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


class SolverError(Exception):
    """A user-facing problem with choosing, configuring or running a solver."""


class UnknownSolverError(SolverError):
    """No solver has the requested name or alias."""


class IncapableSolverError(SolverError):
    """The requested solver cannot solve the declared problem."""


class NoCapableSolverError(SolverError):
    """``auto`` found no registered solver that can solve the declared problem."""


class OptionError(SolverError):
    """A solver option is unknown, has a value of the wrong type, or one out of its range."""


class OptionRangeError(OptionError):
    """A numeric solver option's value lies outside the option's valid range."""

    def __init__(self, option: Option, value: Any) -> None:
        valid = option.valid
        assert isinstance(valid, Interval)
        shown = f"{value:g}" if isinstance(value, float) else _show(value)
        need = valid.describe()
        if isinstance(value, float) and not math.isfinite(value):
            need = "a finite number" + ("" if valid.describe().startswith("in ")
                                        else f" {valid.describe()}")
        super().__init__(f"option `{option.name}` must be {need}, got {shown}")
        self.hint = f"`{option.name}` takes {_TYPE_WORDS[option.type]} in {valid}"


_INTERVAL = re.compile(r"\s*([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])\s*")


@dataclass(frozen=True)
class Interval:
    """The valid values of a numeric option, in interval notation: ``[1, inf)``, ``(0, 1]``."""

    low: float
    high: float
    low_closed: bool
    high_closed: bool

    @classmethod
    def parse(cls, text: str) -> Interval:
        """``[a, b]``, ``(a, b)``, ``[a, b)`` or ``(a, b]``; ``inf`` and ``-inf`` for no end."""
        match = _INTERVAL.fullmatch(text)
        try:
            if match is None:
                raise ValueError
            low, high = float(match[2]), float(match[3])
            if not low <= high:
                raise ValueError
        except ValueError:
            message = f"not an interval: {text!r} (write it like [1, inf) or (0, 1])"
            raise ValueError(message) from None
        return cls(low, high, match[1] == "[", match[4] == "]")

    def __contains__(self, value: float) -> bool:
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below  # NaN is in no interval

    def __str__(self) -> str:
        return (f"{'[' if self.low_closed else '('}{self.low:g}, "
                f"{self.high:g}{']' if self.high_closed else ')'}")

    def describe(self) -> str:
        """The interval in words, for an error message: "at least 1", "in (0, 1]"."""
        if self.high == math.inf:
            return f"at least {self.low:g}" if self.low_closed else f"greater than {self.low:g}"
        if self.low == -math.inf:
            return f"at most {self.high:g}" if self.high_closed else f"less than {self.high:g}"
        return f"in {self}"


@dataclass(frozen=True)
class Option:
    """One solver option; ``default=None`` makes it optional (``none`` is then a valid value).

    ``valid`` is the range of a numeric option, as an ``Interval`` or its notation
    (``"[1, inf)"``): a value outside it is an error where the user wrote it, not a failure deep
    inside the solver.
    """

    name: str
    type: type
    default: Any
    doc: str
    choices: tuple | None = None
    valid: Interval | str | None = None

    def __post_init__(self) -> None:
        # Fail where the solver is written, not when a user first runs it.
        if self.type not in OPTION_TYPES:
            raise TypeError(f"option {self.name!r}: type must be one of int, float, str, bool")
        if isinstance(self.valid, str):
            object.__setattr__(self, "valid", Interval.parse(self.valid))
        if self.valid is not None and self.type not in (int, float):
            raise TypeError(f"option {self.name!r}: only a number has a valid range")
        if self.default is not None:
            _check_type(self, self.default)


@dataclass(frozen=True)
class Capabilities:
    """What a solver can solve; the registry matches these against ``ProblemFeatures``."""

    model_based: bool
    environments: frozenset[str]
    forms: frozenset[str]
    features: frozenset[str]
    devices: frozenset[str]
    # samples the objective's trajectory terms: needs a trajectory objective that is a linear
    # combination of them plus a policy-free rest (ProblemFeatures.linear_terms)
    needs_linear_terms: bool = False


@dataclass(frozen=True)
class SolverSpec:
    """A solver as the registry sees it: identity, capabilities, options and entry point."""

    name: str
    aliases: tuple[str, ...]
    summary: str
    capabilities: Capabilities
    options: tuple[Option, ...]
    run: Callable[[TabularProblem, dict, Monitor], SolveResult]
    # what the options must satisfy together: for the typed options, each broken rule as
    # (the options it involves, the message)
    rules: Callable[[dict[str, Any]], list[tuple[tuple[str, ...], str]]] | None = None


@dataclass(frozen=True)
class ProblemFeatures:
    """What a problem demands of a solver, independent of how it was lowered."""

    environment: str
    form: str
    features: frozenset[str]
    device: str
    # false for a trajectory objective that is not a linear combination of its trajectory
    # terms (``policy`` beside ``expected_return``, ``log(expected_return(...))``)
    linear_terms: bool = True

    @classmethod
    def of(cls, problem: TabularProblem) -> ProblemFeatures:
        """The demands of a lowered problem (tabular, or deep with ``environment``)."""
        linear = (problem.form != TRAJECTORY
                  or getattr(problem, "trajectory_terms", None) is not None)
        return cls(getattr(problem, "environment", "tabular"), problem.form,
                   frozenset(problem.features), problem.device.type, linear)


@dataclass(frozen=True)
class _Gap:
    """One thing a problem needs that a solver does not accept."""

    what: str
    needed: str
    accepted: frozenset[str]

    def __str__(self) -> str:
        return f"{self.what} `{self.needed}`"


class Registry:
    """Registered solvers in auto order, looked up by name or alias."""

    def __init__(self, builtin_modules: Sequence[str] = ()) -> None:
        self._builtin_modules = tuple(builtin_modules)
        self._loaded = not self._builtin_modules
        self._specs: list[SolverSpec] = []
        self._by_name: dict[str, SolverSpec] = {}

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for module_name in self._builtin_modules:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as error:
                if error.name == module_name:  # not written yet; a broken import still raises
                    continue
                raise
            self.register(module.SPEC)

    def register(self, spec: SolverSpec) -> None:
        """Add a solver after those already registered (so it comes later in auto order)."""
        self._ensure_loaded()
        # An alias that only differs from the name in case or `-` is harmless; a clash is a bug.
        keys = set(map(_normalise, (spec.name, *spec.aliases)))
        taken = sorted(key for key in keys if key in self._by_name)
        if taken:
            raise ValueError(f"solver {spec.name!r}: name or alias already used: {taken}")
        self._specs.append(spec)
        self._by_name.update(dict.fromkeys(keys, spec))

    def names(self) -> list[str]:
        """Canonical solver names, in auto order."""
        self._ensure_loaded()
        return [spec.name for spec in self._specs]

    def specs(self) -> list[SolverSpec]:
        """Registered solvers, in auto order."""
        self._ensure_loaded()
        return list(self._specs)

    def get(self, name: str) -> SolverSpec:
        """The solver with this name or alias (case and ``-``/``_`` do not matter)."""
        self._ensure_loaded()
        spec = self._by_name.get(_normalise(name))
        if spec is None:
            known = ", ".join(f"`{n}`" for n in self.names()) or "(none registered)"
            # matched against names and aliases, named by the solver's own name
            close = difflib.get_close_matches(_normalise(name), list(self._by_name), n=1)
            hint = f"; did you mean `{self._by_name[close[0]].name}`?" if close else ""
            raise UnknownSolverError(
                f"unknown solver `{name}`{hint}\nknown solvers: {known} (or `auto`)"
            )
        return spec

    def missing(self, spec: SolverSpec, features: ProblemFeatures) -> list[str]:
        """What the problem needs that the solver lacks, in words; empty when capable."""
        return [str(gap) for gap in _gaps(spec, features)]

    def check_capable(self, spec: SolverSpec, features: ProblemFeatures) -> None:
        """Raise ``IncapableSolverError`` with a table of what ``spec`` lacks, if anything."""
        gaps = _gaps(spec, features)
        if not gaps:
            return
        rows = [("", "problem needs", f"{spec.name} accepts")]
        rows += [(gap.what, gap.needed, ", ".join(sorted(gap.accepted)) or "-") for gap in gaps]
        capable = [s.name for s in self.specs() if not _gaps(s, features)]
        hint = (
            "solvers that can: " + ", ".join(f"`{n}`" for n in capable)
            if capable
            else "no registered solver can solve this problem"
        )
        raise IncapableSolverError(
            f"solver `{spec.name}` cannot solve this problem:\n{_table(rows)}\n{hint}"
        )

    def auto(self, features: ProblemFeatures) -> SolverSpec:
        """The first capable solver in auto order."""
        for spec in self.specs():
            if not _gaps(spec, features):
                return spec
        rows = [("solver", "lacks")]
        rows += [(spec.name, ", ".join(self.missing(spec, features))) for spec in self.specs()]
        raise NoCapableSolverError(
            "no registered solver can solve this problem"
            + (f":\n{_table(rows)}" if len(rows) > 1 else " (none registered)")
        )

    def validate_options(self, spec: SolverSpec, options: dict[str, Any]) -> dict[str, Any]:
        """Every option of ``spec``, typed: given values checked, the rest at their defaults."""
        by_name = {option.name: option for option in spec.options}
        for name in options:
            if name not in by_name:
                known = ", ".join(f"`{n}`" for n in by_name) or "(none)"
                hint = self.option_hint(spec, name)
                raise OptionError(
                    f"solver `{spec.name}` has no option `{name}`"
                    f"{f'; {hint}' if hint else ''}\noptions: {known}"
                )
        return {
            option.name: _check_type(option, options[option.name])
            if option.name in options
            else option.default
            for option in spec.options
        }

    def option_hint(self, spec: SolverSpec, name: str) -> str | None:
        """What to say of an option that ``spec`` lacks: the solvers that take it, where some
        do (the option of another solver is no typo, and the closest of ``spec``'s own names
        would mislead), else the closest of ``spec``'s options."""
        owners = [other.name for other in self.specs()
                  if any(option.name == name for option in other.options)]
        if owners:
            return f"`{name}` is an option of {', '.join(owners)}"
        return did_you_mean(name, [option.name for option in spec.options])

    def capability_matrix(self) -> str:
        """The table printed by ``brl solvers``: one row per solver, in auto order."""
        specs = self.specs()
        if not specs:
            return "no solvers registered"
        rows = [("solver", "model", "environments", "forms", "features", "devices", "aliases")]
        for spec in specs:
            caps = spec.capabilities
            rows.append(
                (
                    spec.name,
                    "based" if caps.model_based else "free",
                    _wrap(_join(caps.environments), 16),
                    _wrap(_join(caps.forms), 18),
                    _wrap(_join(caps.features), 26),
                    _join(caps.devices),
                    _wrap(_join(spec.aliases), 20) or "-",
                )
            )
        return f"{_table(rows)}\n\nauto order: {', '.join(self.names())}"


REGISTRY = Registry(tuple(f"solvers.{name}" for name in AUTO_ORDER))


_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _whole(value: float) -> int | None:
    """A float that is a whole number (written `1e4`, or `2.0`) as an int; else None."""
    if math.isfinite(value) and value == int(value) and abs(value) < 2**63:
        return int(value)
    return None


def parse_option_value(option: Option, text: str) -> Any:
    """Turn the text of ``--set name=value`` into a value of the option's type."""
    stripped = text.strip()
    if option.default is None and stripped.lower() == "none":
        return None
    value: Any
    try:
        if option.type is bool:
            if stripped.lower() not in _TRUE | _FALSE:
                raise ValueError(stripped)
            value = stripped.lower() in _TRUE
        elif option.type is str:
            value = stripped
        elif not _NUMBER.fullmatch(stripped) and stripped.lower().lstrip("+-") not in (
                "inf", "infinity", "nan"):  # int() and float() take `1_0` and `٣` too
            raise ValueError(stripped)
        elif option.type is int:  # `1e4` is a whole number too
            value = int(stripped) if stripped.lstrip("+-").isdigit() else _whole(float(stripped))
            if value is None:
                raise ValueError(stripped)
        else:
            value = option.type(stripped)
    except ValueError:
        raise OptionError(
            f"option `{option.name}` expects {_TYPE_WORDS[option.type]}, got `{text}`"
        ) from None
    return _check_type(option, value)


def describe(spec: SolverSpec) -> str:
    """A solver's capabilities and options with type, default and doc, for ``brl solvers NAME``."""
    caps = spec.capabilities
    aliases = f" (aliases: {_join(spec.aliases)})" if spec.aliases else ""
    lines = [
        f"{spec.name}{aliases}: {spec.summary}",
        "",
        f"  model:        {'model-based' if caps.model_based else 'model-free'}",
        f"  environments: {_join(caps.environments)}",
        f"  forms:        {_join(caps.forms)}",
        f"  features:     {_join(caps.features)}",
        f"  devices:      {_join(caps.devices)}",
        "",
    ]
    if not spec.options:
        return "\n".join([*lines, "no options"])
    rows = [("option", "type", "default", "valid", "description")]
    for option in spec.options:
        doc = option.doc
        if option.choices:
            doc += f" (one of: {', '.join(map(str, option.choices))})"
        rows.append((option.name, option.type.__name__, _show(option.default),
                     str(option.valid or "-"), _wrap(doc, 56)))
    return "\n".join([*lines, "options (set with --set name=value):", _table(rows)])


def _check_type(option: Option, value: Any) -> Any:
    """``value`` as the option's type, or ``OptionError``; ints are accepted where floats are."""
    if value is None and option.default is None:
        return None
    # bool is a subclass of int, but `outer=true` is a mistake, not 1.
    ok = isinstance(value, option.type) and not (option.type is not bool and type(value) is bool)
    if option.type is float and isinstance(value, int) and type(value) is not bool:
        value, ok = float(value), True
    if option.type is int and type(value) is float and _whole(value) is not None:
        value, ok = _whole(value), True  # `sac_steps = 1e4` in a file
    if not ok:
        given = {bool: "a truth value", int: "an integer", float: "a number",
                 str: "a string"}.get(type(value), type(value).__name__)
        raise OptionError(
            f"option `{option.name}` expects {_TYPE_WORDS[option.type]}, "
            f"got {_given(value)}, {given}"
        )
    if option.choices is not None and value not in option.choices:
        raise OptionError(
            f"option `{option.name}` must be one of {', '.join(map(_show, option.choices))}; "
            f"got {_given(value)}{_did_you_mean(str(value), map(str, option.choices))}"
        )
    if isinstance(option.valid, Interval) and value not in option.valid:
        raise OptionRangeError(option, value)
    return value


def _gaps(spec: SolverSpec, features: ProblemFeatures) -> list[_Gap]:
    caps = spec.capabilities
    gaps = []
    if features.environment not in caps.environments:
        gaps.append(_Gap("environment", features.environment, caps.environments))
    if features.form not in caps.forms:
        gaps.append(_Gap("objective form", features.form, caps.forms))
    elif caps.needs_linear_terms and not features.linear_terms:
        gaps.append(_Gap("objective form", f"{features.form}, not a sum of multiples of "
                         "trajectory terms and terms without the policy",
                         frozenset({f"{form}: constant multiples of its trajectory terms, plus "
                                    "terms without the policy" for form in caps.forms})))
    gaps += [
        _Gap("feature", feature, caps.features)
        for feature in sorted(features.features - caps.features)
    ]
    if features.device not in caps.devices:
        gaps.append(_Gap("device", features.device, caps.devices))
    return gaps


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _did_you_mean(name: str, candidates: Iterable[str]) -> str:
    hint = did_you_mean(name, candidates)
    return f"; {hint}" if hint else ""


def _join(items: Iterable[str]) -> str:
    return ", ".join(sorted(items)) if isinstance(items, frozenset | set) else ", ".join(items)


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _given(value: Any) -> str:
    """A value the user gave, in a message: a word in backticks, or the lack of one said."""
    if isinstance(value, str):
        return f"`{value}`" if value else "nothing (an empty value)"
    return _show(value)


def _table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, a rule under the header row.

    A cell may hold several lines (wrapped text); its row then continues on the next lines.
    """
    split = [[cell.split("\n") for cell in row] for row in rows]
    widths = [max(len(line) for row in split for line in row[i]) for i in range(len(rows[0]))]
    out = []
    for n, row in enumerate(split):
        if n == 1:
            out.append("  ".join("-" * w for w in widths))
        for k in range(max(len(cell) for cell in row)):
            cells = [cell[k] if k < len(cell) else "" for cell in row]
            out.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
    return "\n".join(out)


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False))
