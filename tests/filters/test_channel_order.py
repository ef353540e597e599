"""Chains that treat the colour channels alike run on OpenCV's B, G, R frames: no swap
when decoding or encoding, the same output bytes as on R, G, B."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from imgpipe.bench import work
from imgpipe.core.errors import ImageTooLarge
from imgpipe.filters import (
    REGISTRY,
    EncodeParams,
    apply_chain,
    decode,
    decode_reduced,
    encode,
    output_format,
    parse_chain,
)
from tests.filters.images import Pixels, photo
from tests.filters.test_filter_chain_properties import steps

# Filters with at least some order-free uses, and the ones that weigh the channels.
ORDER_FREE = sorted(name for name, spec in REGISTRY.items() if spec.order_free)
ORDER_BOUND = ("contrast:factor=1.5", "saturation:factor=0.5", "grayscale", "sepia", "equalize",
               "edges", "denoise")
SMALL = 200_000  # pixels: a drawn resize larger than this is skipped


def swap(img: Pixels) -> Pixels:
    return np.ascontiguousarray(img[:, :, ::-1]) if img.shape[2] == 3 else img


frames = hnp.arrays(np.uint8, st.tuples(st.integers(1, 40), st.integers(1, 40), st.just(3)))


def test_the_declared_filters() -> None:
    assert set(ORDER_FREE) == {"resize", "crop", "rotate", "flip", "blur", "sharpen", "emboss",
                               "median", "pixelate", "brightness", "invert"}
    assert not set(ORDER_FREE) & {spec.split(":")[0] for spec in ORDER_BOUND}


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(ORDER_FREE).flatmap(steps), frames)
def test_order_free_steps_commute_with_swapping_r_and_b(spec: str, img: Pixels) -> None:
    chain = parse_chain(spec)
    assume(chain.order_free)  # resize and crop by smart gravity weigh skin tones
    try:
        out = apply_chain(img, chain, max_pixels=SMALL)
    except ImageTooLarge:
        assume(False)
    assert np.array_equal(apply_chain(swap(img), chain, max_pixels=SMALL), swap(out))


@pytest.mark.parametrize("spec", ORDER_BOUND)
def test_order_bound_filters_do_depend_on_the_order(spec: str) -> None:
    # The property above would catch a wrong declaration: these give other pixels.
    img = photo(48, 64)
    chain = parse_chain(spec)
    assert not chain.order_free
    assert not np.array_equal(apply_chain(swap(img), chain), swap(apply_chain(img, chain)))


@pytest.mark.parametrize("spec", ["resize:w=32,h=32,fit=cover,gravity=smart",
                                  "crop:w=16,h=16,gravity=smart", "blur|grayscale"])
def test_smart_gravity_and_any_order_bound_step_make_a_chain_order_bound(spec: str) -> None:
    assert not parse_chain(spec).order_free
    assert parse_chain(spec.replace("smart", "north").replace("|grayscale", "")).order_free


def _png(img: Pixels, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.fromarray(img if mode != "L" else img[:, :, 0], mode).save(out, format="PNG")
    return out.getvalue()


def _saved(fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(photo(90, 120)).save(out, format=fmt)
    return out.getvalue()


@pytest.mark.parametrize(("data", "reduce"), [
    (encode(photo(600, 800), "jpeg"), 1),
    (encode(photo(600, 800), "jpeg"), 2),
    (encode(photo(600, 800), "webp"), 1),
    (_png(photo(90, 120)), 1),
    (_saved("GIF"), 1),  # decoded by Pillow, then swapped
    (_saved("BMP"), 1),
])
def test_a_bgr_decode_is_the_rgb_decode_swapped(data: bytes, reduce: int) -> None:
    rgb = decode(data, reduce=reduce)
    assert np.array_equal(decode(data, reduce=reduce, bgr=True), swap(rgb))


@pytest.mark.parametrize("data", [_png(photo(40, 50, channels=4), "RGBA"),
                                  _png(photo(40, 50), "L"), encode(photo(300, 80)[:, :, :1],
                                                                   "jpeg")])
def test_gray_and_rgba_frames_do_not_change(data: bytes) -> None:
    img, _ = decode_reduced(data, lambda _w, _h: 1, bgr=True)
    assert img.shape[2] in (1, 4)
    assert np.array_equal(img, decode(data))


@pytest.mark.parametrize(("fmt", "height", "threads"), [
    ("jpeg", 120, 1), ("jpeg", 600, 1), ("jpeg", 600, 3), ("png", 120, 1), ("webp", 120, 1),
    ("avif", 64, 1),
])
def test_a_bgr_frame_encodes_to_the_same_bytes(fmt: str, height: int, threads: int) -> None:
    img = photo(height, 160)
    assert encode(swap(img), fmt, 80, threads=threads, bgr=True) == \
        encode(img, fmt, 80, threads=threads)


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_bgr_leaves_gray_and_rgba_frames_alone(fmt: str) -> None:
    for img in (photo(300, 40, channels=4), photo(300, 40)[:, :, :1]):
        img = np.ascontiguousarray(img)
        assert encode(img, fmt, bgr=True) == encode(img, fmt)


@pytest.mark.parametrize("spec", [work.DEFAULT_OPS, "resize:w=320|encode:format=webp",
                                  "grayscale|encode:format=png"])
def test_the_bench_reference_gives_the_rgb_path_bytes(spec: str) -> None:
    data = encode(photo(480, 640), "jpeg")
    chain = parse_chain(spec)
    img, info = decode_reduced(data, chain.reduce_factor)
    out = apply_chain(img, chain)
    enc = chain.encode or EncodeParams()
    assert work.imgpipe_one(data, spec) == encode(out, output_format(info.format, enc.format),
                                                  enc.quality)
