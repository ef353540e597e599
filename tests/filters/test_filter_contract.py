"""Every registered filter keeps the image contract on every kind of image.

Gray, RGB and RGBA × 1×1, 3×3 and 640×360, with the default parameters and with
parameters at or near their caps: the result is uint8, 3-D with 1, 3 or 4 channels,
has the size the filter's geometry announces, and the input is left untouched (it is
passed read-only, so an in-place write would raise).
"""

from __future__ import annotations

import numpy as np
import pytest

from imgpipe.filters import REGISTRY, apply_chain, parse_chain
from tests.filters.images import DESIGN_FILTERS, photo

# Chains run on every image kind; together they name every registered filter.
SPECS = [
    "resize:w=320",
    "resize:h=7",
    "resize:w=50,h=50,fit=cover",
    "resize:w=700,h=20,fit=fill",
    "resize:w=900,h=900",
    "crop:x=1,y=1,w=2,h=2",
    "crop:x=65535,y=9000",
    "crop:w=2,h=2,gravity=smart",
    "crop:w=300,h=1,gravity=southeast",
    "resize:w=50,h=20,fit=cover,gravity=smart",
    "resize:w=20,h=50,fit=cover,gravity=north",
    "rotate",
    "rotate:deg=180",
    "rotate:deg=-30",
    "rotate:deg=45,expand=false",
    "flip",
    "flip:dir=v",
    "flip:dir=both",
    "blur",
    "blur:radius=0",
    "blur:radius=7.5",
    "blur:radius=100",
    "sharpen",
    "sharpen:radius=40,amount=10,threshold=0",
    "brightness:factor=1.7",
    "brightness:factor=0",
    "contrast:factor=0.5",
    "contrast:factor=10",
    "saturation:factor=2",
    "saturation:factor=0",
    "grayscale",
    "sepia",
    "sepia:amount=0.3",
    "invert",
    "edges",
    "edges:low=0,high=0",
    "emboss",
    "emboss:strength=10",
    "median",
    "median:size=15",
    "denoise",
    "equalize",
    "pixelate",
    "pixelate:size=512",
]
SIZES = [(1, 1), (3, 3), (360, 640)]
CHANNELS = [1, 3, 4]
# Filters whose output channel count differs from the input's, by design.
CHANNEL_RULES = {
    "grayscale": {1: 1, 3: 1, 4: 4},
    "sepia": {1: 3, 3: 3, 4: 4},
    "edges": {1: 1, 3: 1, 4: 1},
}


def test_the_specs_cover_every_filter() -> None:
    assert set(REGISTRY) >= DESIGN_FILTERS
    named = {spec.split(":")[0] for spec in SPECS}
    assert named == DESIGN_FILTERS - {"encode"}


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[1]}x{s[0]}")
@pytest.mark.parametrize("channels", CHANNELS, ids=lambda c: f"c{c}")
@pytest.mark.parametrize("spec", SPECS)
def test_filter_keeps_the_contract(spec: str, channels: int, size: tuple[int, int]) -> None:
    height, width = size
    img = photo(height, width, channels)
    before = img.copy()
    img.flags.writeable = False
    chain = parse_chain(spec)

    out = apply_chain(img, chain)

    assert out.dtype == np.uint8
    assert out.ndim == 3
    assert out.flags.c_contiguous
    name = chain.steps[0].name
    assert out.shape[2] == CHANNEL_RULES.get(name, {}).get(channels, channels)
    assert (out.shape[1], out.shape[0]) == chain.output_size(width, height)
    assert np.array_equal(img, before)


@pytest.mark.parametrize(
    "spec",
    [
        "blur:radius=0",
        "brightness",
        "contrast:factor=1",
        "saturation",
        "sepia:amount=0",
        "sharpen:amount=0",
        "median:size=1",
        "pixelate:size=1",
        "rotate:deg=360",
        "crop",
        "denoise:strength=0",
    ],
)
def test_identity_cases_return_the_input(spec: str) -> None:
    img = photo(12, 10)
    assert apply_chain(img, parse_chain(spec)) is img


def test_a_chain_runs_in_the_given_order() -> None:
    img = photo(40, 60)
    first = apply_chain(img, parse_chain("crop:w=30,h=20|rotate"))
    second = apply_chain(img, parse_chain("rotate|crop:w=30,h=20"))
    assert first.shape == (30, 20, 3)
    assert second.shape == (20, 30, 3)


def test_apply_chain_refuses_a_non_image() -> None:
    chain = parse_chain("invert")
    with pytest.raises(ValueError):
        apply_chain(np.zeros((4, 4), np.uint8), chain)
    with pytest.raises(ValueError):
        apply_chain(np.zeros((4, 4, 3), np.float32), chain)
    with pytest.raises(ValueError):
        apply_chain(np.zeros((4, 4, 2), np.uint8), chain)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_copy_pixels_writes_every_pixel_into_the_given_array(
        channels: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from imgpipe.filters import pixels
    from imgpipe.filters.pixels import copy_pixels

    def numpy_copy(*_: object) -> None:
        raise AssertionError("OpenCV's copy should have written in place")

    monkeypatch.setattr(pixels.np, "copyto", numpy_copy)
    src = np.random.default_rng(channels).integers(0, 256, (37, 53, channels), np.uint8)
    backing = np.zeros(src.nbytes + 64, np.uint8)  # a segment larger than the frame
    dst = np.ndarray(src.shape, np.uint8, buffer=backing)
    copy_pixels(dst, src)
    assert np.array_equal(dst, src)
    assert not backing[src.nbytes:].any()  # nothing written past the frame


def test_copy_pixels_falls_back_where_opencv_would_not_write_in_place() -> None:
    from imgpipe.filters.pixels import copy_pixels

    src = np.random.default_rng(5).integers(0, 256, (20, 30, 3), np.uint8)
    strided = np.zeros((20, 60, 3), np.uint8)[:, ::2]  # not contiguous
    copy_pixels(strided, src)
    assert np.array_equal(strided, src)
    overlapping = np.zeros((21, 30, 3), np.uint8)
    overlapping[1:] = src
    copy_pixels(overlapping[:20], overlapping[1:])  # numpy's copy handles the overlap
    assert np.array_equal(overlapping[:20], src)
