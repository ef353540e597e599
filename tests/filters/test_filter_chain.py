"""The chain grammar: valid and invalid specs, canonical form, cost and reduced decode."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from imgpipe.core.errors import FilterError, ImageTooLarge
from imgpipe.filters import (
    REGISTRY,
    Chain,
    EncodeParams,
    ParamError,
    Params,
    apply_chain,
    describe_filters,
    format_filters_text,
    param,
    parse_chain,
    register,
)
from tests.filters.images import photo

VALID = [
    # spec, canonical
    ("blur", "blur"),
    ("blur:radius=3", "blur:radius=3"),
    ("blur:radius=3.0", "blur:radius=3"),
    ("blur:radius=2", "blur"),
    ("blur:radius=.5", "blur:radius=0.5"),
    ("blur:radius=1e1", "blur:radius=10"),
    ("blur:radius=+2.25", "blur:radius=2.25"),
    (" resize : w = 1920 | blur ", "resize:w=1920|blur"),
    ("resize:h=1080,w=1920,fit=cover", "resize:w=1920,h=1080,fit=cover"),
    ("resize:w=800,fit=contain", "resize:w=800"),
    ("rotate:deg=-90,expand=false", "rotate:deg=-90,expand=false"),
    ("rotate:expand=0", "rotate:expand=false"),
    ("rotate:expand=TRUE", "rotate"),
    ("flip:dir=both", "flip:dir=both"),
    ("sharpen:amount=1.5", "sharpen"),
    ("median:size=7", "median:size=7"),
    ("edges:low=10,high=10", "edges:low=10,high=10"),
    ("encode:format=webp,quality=80", "encode:format=webp,quality=80"),
    ("encode:quality=85", "encode"),
    ("resize:w=1920|encode:format=png", "resize:w=1920|encode:format=png"),
    ("|".join(["invert"] * 12), "|".join(["invert"] * 12)),
    ("|".join(["invert"] * 12) + "|encode", "|".join(["invert"] * 12) + "|encode"),
]

INVALID = [
    # spec, words the message must contain
    ("", ["empty"]),
    ("   ", ["empty"]),
    ("blurr:radius=3", ["unknown filter", "blurr", "blur"]),
    ("Resize:w=10", ["unknown filter", "Resize", "resize"]),
    ("xyzzy", ["unknown filter", "xyzzy", "filters are"]),
    ("blur:radius", ["blur", "radius", "needs a value"]),
    ("blur:radius=", ["blur", "radius", "needs a value"]),
    ("blur:", ["blur", "key=value"]),
    ("blur:radius=3,", ["blur", "empty parameter"]),
    ("blur:3", ["blur", "unknown parameter", "radius"]),
    ("blur:sigma=3", ["blur", "sigma", "radius"]),
    ("invert:x=1", ["invert", "unknown parameter", "nothing"]),
    ("blur:radius=1,radius=2", ["blur", "radius", "twice"]),
    ("blur:radius=101", ["blur", "radius", "out of range"]),
    ("blur:radius=-1", ["blur", "radius", "out of range"]),
    ("blur:radius=nan", ["blur", "radius", "finite"]),
    ("blur:radius=NaN", ["blur", "radius", "finite"]),
    ("blur:radius=inf", ["blur", "radius", "finite"]),
    ("blur:radius=-Infinity", ["blur", "radius", "finite"]),
    ("blur:radius=1e999", ["blur", "radius", "finite"]),
    ("blur:radius=abc", ["blur", "radius", "number"]),
    ("blur:radius=1_0", ["blur", "radius", "number"]),
    ("resize:w=1.5", ["resize", "w", "integer"]),
    ("resize:w=ten", ["resize", "w", "integer"]),
    ("resize:w=16385", ["resize", "w", "out of range"]),
    ("resize:w=99999999999999999999999999", ["resize", "w", "out of range"]),
    ("resize", ["resize", "w or h"]),
    ("resize:fit=cover", ["resize", "w or h"]),
    ("resize:w=10,fit=squash", ["resize", "fit", "contain|cover|fill"]),
    ("rotate:expand=yes", ["rotate", "expand", "true or false"]),
    ("median:size=4", ["median", "size", "odd"]),
    ("edges:low=200,high=100", ["edges", "low", "high"]),
    ("encode:format=tiff", ["encode", "format", "jpeg|png|webp"]),
    ("encode:quality=0", ["encode", "quality", "out of range"]),
    ("blur||invert", ["step 2", "empty"]),
    ("blur|", ["step 2", "empty"]),
    ("|blur", ["step 1", "empty"]),
    ("encode|blur", ["encode", "last", "blur"]),
    ("encode|encode", ["encode", "twice"]),
    ("|".join(["invert"] * 13), ["too many", "13", "12"]),
    ("|".join(["invert"] * 40), ["too many", "12"]),
    ("blur:radius=" + "9" * 5000, ["too long"]),
]


@pytest.mark.parametrize(("spec", "canonical"), VALID)
def test_valid_specs_parse_to_their_canonical_form(spec: str, canonical: str) -> None:
    chain = parse_chain(spec)
    assert chain.canonical() == canonical
    assert str(chain) == canonical
    assert parse_chain(canonical) == chain


@pytest.mark.parametrize(("spec", "words"), INVALID, ids=[s[:40] or "empty" for s, _ in INVALID])
def test_invalid_specs_name_what_is_wrong(spec: str, words: list[str]) -> None:
    with pytest.raises(FilterError) as info:
        parse_chain(spec)
    assert info.value.field == "ops"
    assert info.value.status == 400
    for word in words:
        assert word in str(info.value)


def test_parsed_values_are_typed() -> None:
    chain = parse_chain("resize:w=100,fit=cover|blur:radius=3|rotate:expand=false")
    resize, blur, rotate = (step.params for step in chain.steps)
    assert (resize.w, resize.h, resize.fit) == (100, 0, "cover")  # type: ignore[attr-defined]
    assert blur.radius == 3.0 and isinstance(blur.radius, float)  # type: ignore[attr-defined]
    assert rotate.expand is False  # type: ignore[attr-defined]


def test_encode_is_kept_apart_from_the_steps() -> None:
    chain = parse_chain("invert|encode:format=jpeg,quality=70")
    assert [step.name for step in chain.steps] == ["invert"]
    assert chain.encode == EncodeParams(format="jpeg", quality=70)
    assert parse_chain("invert").encode is None
    assert parse_chain("encode").encode == EncodeParams()
    assert parse_chain("encode").steps == ()


def test_max_filters_is_configurable() -> None:
    parse_chain("invert|invert", max_filters=2)
    with pytest.raises(FilterError, match="too many"):
        parse_chain("invert|invert|invert", max_filters=2)


def test_params_check_themselves_when_built_directly() -> None:
    from imgpipe.filters.effects import BlurParams

    with pytest.raises(ParamError) as info:
        BlurParams(radius=500)
    assert info.value.param == "radius"
    with pytest.raises(ParamError):
        BlurParams(radius=float("nan"))
    with pytest.raises(ParamError):
        BlurParams(radius="3")  # type: ignore[arg-type]
    assert BlurParams(radius=3).radius == 3.0


def test_cost_is_heavy_when_any_step_is() -> None:
    assert parse_chain("resize:w=100|blur").cost == "light"
    assert parse_chain("resize:w=100|denoise|invert").cost == "heavy"
    assert parse_chain("encode:format=png").cost == "light"


@pytest.mark.parametrize(
    ("spec", "cost"),
    [
        ("median", "light"),
        ("median:size=5", "light"),
        ("median:size=7", "heavy"),
        ("rotate", "light"),
        ("rotate:deg=-270", "light"),
        ("rotate:deg=45", "heavy"),
        ("denoise", "heavy"),
    ],
)
def test_parameters_can_make_a_step_heavy(spec: str, cost: str) -> None:
    assert parse_chain(spec).steps[0].cost == cost
    assert parse_chain(spec).cost == cost


@pytest.mark.parametrize(
    ("spec", "size", "factor"),
    [
        ("resize:w=480", (3840, 2160), 8),
        ("resize:w=960", (3840, 2160), 4),
        ("resize:w=1920", (3840, 2160), 2),
        ("resize:w=1921", (3840, 2160), 1),
        ("resize:w=1000,h=1000", (3840, 2160), 2),
        ("resize:w=1000,h=1000,fit=cover", (3840, 2160), 2),
        ("resize:w=500,h=500,fit=fill", (4000, 1000), 2),
        ("resize:w=5000", (3840, 2160), 1),
        ("blur|resize:w=100", (3840, 2160), 1),
        ("invert", (3840, 2160), 1),
    ],
)
def test_reduce_factor(spec: str, size: tuple[int, int], factor: int) -> None:
    assert parse_chain(spec).reduce_factor(*size) == factor


def test_reduce_factor_only_when_the_output_size_is_the_same() -> None:
    chain = parse_chain("resize:w=100")
    width, height = 1003, 1001
    factor = chain.reduce_factor(width, height)
    reduced = (-(-width // factor), -(-height // factor))
    assert chain.output_size(*reduced) == chain.output_size(width, height)


def test_output_size_follows_the_geometry() -> None:
    chain = parse_chain("crop:w=1000,h=500|rotate|resize:w=100")
    assert chain.output_size(3840, 2160) == (100, 200)


def test_a_step_over_the_pixel_limit_is_refused_before_it_runs() -> None:
    chain = parse_chain("resize:w=16384,h=16384,fit=fill")
    with pytest.raises(ImageTooLarge) as info:
        apply_chain(photo(4, 4), chain, max_pixels=1_000_000)
    assert "resize" in str(info.value)
    assert info.value.field == "ops"
    with pytest.raises(ImageTooLarge):
        chain.output_size(4, 4, max_pixels=1_000_000)


def test_describe_filters_is_json_and_complete() -> None:
    described = describe_filters()
    json.dumps(described)
    assert [f["name"] for f in described] == sorted(REGISTRY)
    blur = next(f for f in described if f["name"] == "blur")
    assert blur["cost"] == "light"
    assert blur["doc"]
    assert blur["params"] == [
        {
            "name": "radius",
            "type": "float",
            "default": 2.0,
            "min": 0,
            "max": 100.0,
            "choices": None,
            "doc": "Gaussian σ in px",
        }
    ]
    for spec in described:
        for p in spec["params"]:
            assert set(p) == {"name", "type", "default", "min", "max", "choices", "doc"}
            assert (
                p["choices"]
                or (p["min"] is not None and p["max"] is not None)
                or (p["type"] == "bool")
            )


def test_format_filters_text_lists_every_filter_and_parameter() -> None:
    text = format_filters_text()
    for name, spec in REGISTRY.items():
        assert f"{name}  [{spec.cost}]" in text
    assert "radius" in text and "0..100" in text and "contain|cover|fill" in text


def test_registering_a_name_twice_is_an_error() -> None:
    @dataclass(frozen=True)
    class Nothing(Params):
        level: int = param(1, lo=0, hi=2)

    with pytest.raises(ValueError, match="already registered"):
        register("blur", params=Nothing)(lambda img, p: img)
    assert REGISTRY["blur"].params is not Nothing


def test_a_parameter_must_be_bounded() -> None:
    with pytest.raises(TypeError):
        param(1.0)
    with pytest.raises(TypeError):
        param("a")
    with pytest.raises(TypeError):
        param(None)


def test_chain_is_frozen() -> None:
    chain = parse_chain("blur")
    with pytest.raises(AttributeError):
        chain.steps = ()  # type: ignore[misc]
    assert isinstance(chain, Chain)


def test_a_parsed_chain_is_shared_and_a_refusal_is_not_kept() -> None:
    spec = "resize:w=640|blur:radius=1.5|encode:format=webp"
    chain = parse_chain(spec)
    assert parse_chain(spec) is chain  # the same text: the same immutable object
    assert parse_chain(spec, max_filters=3) is not chain  # the limit is part of the key
    assert chain.canonical() == "resize:w=640|blur:radius=1.5|encode:format=webp"
    assert chain.canonical() is chain.canonical()  # computed once
    for _ in range(2):  # refused each time, with the same words
        with pytest.raises(FilterError, match="too many filters"):
            parse_chain(spec, max_filters=1)
        with pytest.raises(FilterError, match="unknown filter"):
            parse_chain("blurr")
    with pytest.raises(FilterError, match="must be text"):
        parse_chain(["blur"])  # type: ignore[arg-type]


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_the_last_step_writes_into_what_it_is_offered_unless_it_overlaps_its_input(
        channels: int) -> None:
    img = photo(48, 64, channels)
    target = np.zeros((48, 64, channels), np.uint8)
    asked: list[tuple[int, ...]] = []

    def into(shape: tuple[int, ...]) -> np.ndarray | None:
        asked.append(shape)
        return target if shape == target.shape else None

    for spec in ("blur:radius=2|brightness:factor=1.2", "brightness:factor=1.2|blur:radius=1"):
        chain = parse_chain(spec)
        out = apply_chain(img, chain, into=into)
        assert out is target  # written in place, the same values as without
        assert np.array_equal(out, apply_chain(img, chain))
    assert asked == [target.shape, target.shape]  # offered to the last step only
    # The offered array is the input: the step allocates instead of overwriting it.
    inplace = img.copy()
    out = apply_chain(inplace, parse_chain("brightness:factor=1.2"), into=lambda _s: inplace)
    assert out is not inplace and np.array_equal(inplace, img)
    # No room: allocated as usual.
    out = apply_chain(img, parse_chain("blur:radius=2"), into=lambda _s: None)
    assert np.array_equal(out, apply_chain(img, parse_chain("blur:radius=2")))


def test_a_step_whose_helpers_work_on_copies_still_leaves_its_input_alone() -> None:
    # RGBA sharpen blurs a copy of the colour channels: the offer must still not be
    # the step's own input, nor be handed to two helpers of one step.
    img = photo(48, 64, 4)
    inplace = img.copy()
    chain = parse_chain("sharpen:radius=2,amount=1")
    # As the filter process does: any shape that fits, over the same memory.
    out = apply_chain(inplace, chain, into=lambda s: np.ndarray(s, np.uint8, buffer=inplace))
    assert np.array_equal(inplace, img)
    assert np.array_equal(out, apply_chain(img, chain))
    spare = np.zeros((48, 64, 3), np.uint8)
    out = apply_chain(img, parse_chain("invert|sharpen:radius=2,amount=1"),
                      into=lambda s: spare if s == spare.shape else None)
    assert np.array_equal(out, apply_chain(img, parse_chain("invert|sharpen:radius=2,amount=1")))
