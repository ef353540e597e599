"""Filter parameters, declared once.

A filter's parameters are a frozen dataclass whose fields are made with ``param()``.
The field metadata (type, bounds, choices, doc) is the single source for validation
(on construction, whoever builds the instance), for parsing the text of a chain, for
writing the canonical chain back out, and for ``describe_filters()`` and the docs.

Every parameter is bounded: a number has both ``lo`` and ``hi``, a string has a fixed
set of ``choices``. ``None`` is allowed only as a default meaning "not given".
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from imgpipe.core.errors import FilterError

Value = int | float | bool | str | None

_META_KEY = "imgpipe.param"
_INT_RE = re.compile(r"[+-]?\d+")
_FLOAT_RE = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d{1,3})?")
_TRUE = frozenset({"true", "1"})
_FALSE = frozenset({"false", "0"})


class ParamError(FilterError):
    """A parameter value is missing, mistyped or out of range; ``param`` names it."""

    def __init__(self, param: str, detail: str) -> None:
        super().__init__(detail, field="ops")
        self.param = param


@dataclass(frozen=True)
class ParamInfo:
    """One declared parameter: what it accepts and what it means."""

    name: str
    kind: type  # int, float, bool or str
    default: Value
    lo: float | None
    hi: float | None
    choices: tuple[str, ...] | None
    doc: str

    @property
    def type_name(self) -> str:
        return self.kind.__name__

    def check(self, value: Any) -> Value:
        """Return ``value`` normalised (an int given for a float becomes a float) or raise."""
        if value is None:
            if self.default is None:
                return None
            raise ParamError(self.name, f"{self.name} needs a value")
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ParamError(
                    self.name, f"{self.name} must be true or false, got {quote(value)}"
                )
            return value
        if self.kind is str:
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                allowed = "|".join(self.choices or ())
                raise ParamError(
                    self.name, f"{self.name} must be one of {allowed}, got {quote(value)}"
                )
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ParamError(
                self.name, f"{self.name} must be {_a(self.type_name)}, got {quote(value)}"
            )
        if self.kind is int and not isinstance(value, int):
            raise ParamError(self.name, f"{self.name} must be an integer, got {quote(value)}")
        if not math.isfinite(value):
            raise ParamError(self.name, f"{self.name} must be a finite number, got {quote(value)}")
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            raise ParamError(self.name, self._range_msg(_fmt_num(value)))
        return float(value) if self.kind is float else value

    def _range_msg(self, shown: str) -> str:
        return f"{self.name}={shown} is out of range ({_fmt_num(self.lo)} to {_fmt_num(self.hi)})"

    def parse(self, text: str) -> Value:
        """Convert the text of a chain (``radius=3``) to a checked value."""
        text = text.strip()
        if not text:
            raise ParamError(self.name, f"{self.name} needs a value ({self.name}=VALUE)")
        word = text.lower()
        if self.kind is bool:
            if word in _TRUE:
                return True
            if word in _FALSE:
                return False
            raise ParamError(self.name, f"{self.name} must be true or false, got {quote(text)}")
        if self.kind is str:
            return self.check(text)
        if word.lstrip("+-") in ("nan", "inf", "infinity"):
            raise ParamError(self.name, f"{self.name} must be a finite number, got {quote(text)}")
        if self.kind is int:
            if not _INT_RE.fullmatch(text):
                raise ParamError(self.name, f"{self.name} must be an integer, got {quote(text)}")
            if len(text) > 20:  # far outside any bound; spares int() a huge conversion
                raise ParamError(self.name, self._range_msg(quote(text)[1:-1]))
            return self.check(int(text))
        if not _FLOAT_RE.fullmatch(text):
            raise ParamError(self.name, f"{self.name} must be a number, got {quote(text)}")
        return self.check(float(text))

    def format(self, value: Value) -> str:
        """The canonical text of ``value``: parsing it gives ``value`` back."""
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float):
            return _fmt_num(value)
        return str(value)

    def _bound(self, value: float | None) -> float | None:
        if value is None:
            return None
        return int(value) if self.kind is int else float(value)

    def describe(self) -> dict[str, Any]:
        """JSON-able description for ``GET /api/filters``."""
        return {
            "name": self.name,
            "type": self.type_name,
            "default": self.default,
            "min": self._bound(self.lo),
            "max": self._bound(self.hi),
            "choices": list(self.choices) if self.choices else None,
            "doc": self.doc,
        }


def param(
    default: Value,
    *,
    lo: float | None = None,
    hi: float | None = None,
    choices: tuple[str, ...] | None = None,
    kind: type | None = None,
    doc: str = "",
) -> Any:
    """Declare a dataclass field as a filter parameter.

    ``kind`` is taken from the default unless the default is ``None``. Numbers need both
    bounds and strings need choices, so nothing a user sends is unbounded.
    """
    if kind is None:
        if default is None:
            raise TypeError("param(None) needs kind=")
        kind = type(default)
    if kind not in (int, float, bool, str):
        raise TypeError(f"unsupported parameter type {kind!r}")
    if kind in (int, float) and (lo is None or hi is None):
        raise TypeError("numeric parameters need lo= and hi=")
    if kind is str and not choices:
        raise TypeError("string parameters need choices=")
    meta = {"kind": kind, "lo": lo, "hi": hi, "choices": choices, "doc": doc}
    return field(default=default, metadata={_META_KEY: meta})


@dataclass(frozen=True)
class Params:
    """Base of every parameter dataclass: validates on construction.

    Subclasses override ``check()`` for rules that involve several fields and raise
    ``ParamError`` naming the field at fault.
    """

    def __post_init__(self) -> None:
        for info in infos(type(self)):
            value = info.check(getattr(self, info.name))
            object.__setattr__(self, info.name, value)
        self.check()

    def check(self) -> None:
        """Cross-field rules; the default has none."""

    def non_defaults(self) -> list[tuple[ParamInfo, Value]]:
        """Parameters that differ from their default, in declaration order."""
        out = []
        for info in infos(type(self)):
            value = getattr(self, info.name)
            if value != info.default:
                out.append((info, value))
        return out


_INFOS: dict[type, tuple[ParamInfo, ...]] = {}


def infos(cls: type[Params]) -> tuple[ParamInfo, ...]:
    """The declared parameters of ``cls`` in declaration order (read once per class)."""
    cached = _INFOS.get(cls)
    if cached is not None:
        return cached
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(_META_KEY)
        if meta is None:
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with param()")
        default = f.default if f.default is not dataclasses.MISSING else None
        if meta["kind"] is float and isinstance(default, int):
            default = float(default)
        out.append(ParamInfo(name=f.name, default=default, **meta))
    _INFOS[cls] = tuple(out)
    return _INFOS[cls]


def _fmt_num(value: float | None) -> str:
    """Shortest text that parses back to the same number (``3.0`` is written ``3``)."""
    if value is None:
        return "none"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def quote(value: object) -> str:
    """``repr`` of a user's value, cut short so an error never echoes a whole upload."""
    text = repr(value)
    return text if len(text) <= 42 else text[:40] + "…" + text[-1]


def _a(type_name: str) -> str:
    return {"int": "an integer", "float": "a number"}.get(type_name, type_name)
