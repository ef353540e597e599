"""Property tests of the chain parser: canonical round trip, and no crash on any text."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from imgpipe.core.errors import FilterError
from imgpipe.filters import REGISTRY, parse_chain
from imgpipe.filters.params import ParamInfo, infos
from tests.filters.images import DESIGN_FILTERS

NAMES = sorted(DESIGN_FILTERS - {"encode"})


def _value_text(draw: st.DrawFn, info: ParamInfo) -> tuple[Any, str]:
    if info.kind is bool:
        flag = draw(st.booleans())
        text = draw(st.sampled_from(["true", "True", "1"] if flag else ["false", "FALSE", "0"]))
        return flag, text
    if info.kind is str:
        assert info.choices
        choice = draw(st.sampled_from(info.choices))
        return choice, choice
    assert info.lo is not None and info.hi is not None
    if info.kind is int:
        number = draw(st.integers(int(info.lo), int(info.hi)))
        signed = f"+{number}" if number >= 0 else str(number)
        return number, draw(st.sampled_from([str(number), signed]))
    real = draw(st.floats(info.lo, info.hi, allow_nan=False, allow_infinity=False))
    return real, draw(st.sampled_from([repr(real), f"{real:.17g}", f"{real:e}"]))


# Rules across fields that random values would break too often to be useful.
def _fix(name: str, values: dict[str, tuple[Any, str]]) -> None:
    if name == "resize" and not any(values.get(k, (0, ""))[0] for k in ("w", "h")):
        values["w"] = (640, "640")
    if name == "resize" and values.get("gravity", ("center", ""))[0] != "center":
        values["w"], values["h"], values["fit"] = (64, "64"), (48, "48"), ("cover", "cover")
    if name == "crop" and "gravity" in values:
        values.pop("x", None)
        values.pop("y", None)
    if name == "median" and "size" in values and values["size"][0] % 2 == 0:
        size = values["size"][0] + 1
        values["size"] = (size, str(size))
    if name == "edges":
        low, high = values.get("low", (100.0, "100")), values.get("high", (200.0, "200"))
        if float(low[1]) > float(high[1]):  # the text is what is parsed: "%e" rounds
            values["low"], values["high"] = high, low


@st.composite
def steps(draw: st.DrawFn, name: str | None = None) -> str:
    name = name or draw(st.sampled_from(NAMES))
    values: dict[str, tuple[Any, str]] = {}
    for info in infos(REGISTRY[name].params):
        if draw(st.booleans()):
            values[info.name] = _value_text(draw, info)
    _fix(name, values)
    if name == "encode" and "format" not in values and draw(st.booleans()):
        values["format"] = ("png", "png")
    if not values:
        return name
    args = [f"{key}={text}" for key, (_, text) in values.items()]
    return name + ":" + ",".join(draw(st.permutations(args)))


@st.composite
def chains(draw: st.DrawFn) -> str:
    parts = draw(st.lists(steps(), min_size=1, max_size=12))
    if draw(st.booleans()):
        parts.append(draw(steps("encode")))
    return "|".join(parts)


@settings(max_examples=200, deadline=None)
@given(chains())
def test_canonical_form_round_trips(spec: str) -> None:
    chain = parse_chain(spec)
    canonical = chain.canonical()
    again = parse_chain(canonical)
    assert again == chain
    assert again.canonical() == canonical


TOKENS = list("|:=,. -+e0123456789") + sorted(DESIGN_FILTERS) + ["nan", "true", "radius", "w"]
GRAMMAR_TEXT = st.lists(st.sampled_from(TOKENS), max_size=30).map("".join)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=80), GRAMMAR_TEXT, chains().map(lambda s: s[: len(s) // 2])))
def test_any_text_is_a_chain_or_a_filter_error(spec: str) -> None:
    try:
        chain = parse_chain(spec)
    except FilterError as exc:
        assert exc.field == "ops"
        assert str(exc)
    else:
        assert parse_chain(chain.canonical()) == chain
