"""Where crop and resize (fit=cover) put their window: gravity and smart.

Golden cases on images made here: a textured patch or a drawn object off centre on a
plain background stays inside a smart crop; a flat image crops the centre; every fixed
gravity puts the window where its name says; each smart placement reports whether the
interest score placed it or it fell back to the centre.
"""

from __future__ import annotations

import numpy as np
import pytest

from imgpipe.core.errors import FilterError
from imgpipe.filters import apply_chain, parse_chain
from imgpipe.filters.smartcrop import GRAVITIES, place

W, H = 800, 400


def plain(channels: int = 3, value: int = 200) -> np.ndarray:
    return np.full((H, W, channels), value, dtype=np.uint8)


def with_texture(x: int, y: int, size: int = 60, channels: int = 3) -> np.ndarray:
    """A plain image with a noisy size×size patch whose top-left corner is (x, y)."""
    img = plain(channels)
    rng = np.random.default_rng(1)
    img[y : y + size, x : x + size, :3] = rng.integers(0, 256, (size, size, min(3, channels)))
    return img


def with_disc(cx: int, cy: int, r: int = 40) -> np.ndarray:
    """A plain gray image with a saturated red disc centred on (cx, cy)."""
    img = plain()
    yy, xx = np.mgrid[0:H, 0:W]
    img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = (220, 30, 30)
    return img


def window_of(out: np.ndarray, img: np.ndarray) -> tuple[int, int]:
    """(x, y) where ``out`` (an exact cut of ``img``) was taken from."""
    h, w = out.shape[:2]
    for y, x in np.argwhere((img == out[0, 0]).all(axis=2)):
        if np.array_equal(img[y : y + h, x : x + w], out):
            return int(x), int(y)
    raise AssertionError("output is not a cut of the input")


@pytest.mark.parametrize(
    ("px", "py"), [(20, 20), (700, 300), (40, 320), (600, 10), (500, 200)]
)
def test_smart_crop_keeps_a_textured_patch(px: int, py: int) -> None:
    img = with_texture(px, py)
    x, y = place(img, 200, 150, "smart")
    assert x <= px and px + 60 <= x + 200, (x, y)
    assert y <= py and py + 60 <= y + 150, (x, y)


def test_smart_crop_filter_keeps_a_drawn_object() -> None:
    img = with_disc(680, 90)
    out = apply_chain(img, parse_chain("crop:w=240,h=240,gravity=smart"))
    assert out.shape == (240, 240, 3)
    red = (out[:, :, 0] == 220) & (out[:, :, 1] == 30)
    assert int(red.sum()) == int(((img[:, :, 0] == 220) & (img[:, :, 1] == 30)).sum())


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_flat_image_crops_the_centre(channels: int) -> None:
    img = plain(channels)
    assert place(img, 200, 100, "smart") == ((W - 200) // 2, (H - 100) // 2)


def test_evenly_busy_image_crops_the_centre() -> None:
    img = np.zeros((H, W, 3), dtype=np.uint8)
    img[:, ::2] = 255  # the same stripes everywhere
    assert place(img, 200, 100, "smart") == (300, 150)


GRAVITY_WINDOWS = {
    "center": (300, 150),
    "north": (300, 0),
    "south": (300, 300),
    "east": (600, 150),
    "west": (0, 150),
    "northeast": (600, 0),
    "northwest": (0, 0),
    "southeast": (600, 300),
    "southwest": (0, 300),
}


@pytest.mark.parametrize("gravity", sorted(GRAVITY_WINDOWS))
def test_each_gravity_puts_the_window_where_it_says(gravity: str) -> None:
    img = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    out = apply_chain(img, parse_chain(f"crop:w=200,h=100,gravity={gravity}"))
    assert window_of(out, img) == GRAVITY_WINDOWS[gravity]


def test_every_gravity_is_tested() -> None:
    assert set(GRAVITIES) == set(GRAVITY_WINDOWS) | {"smart"}


@pytest.mark.parametrize(
    ("gravity", "size", "expect"),
    [
        ("west", (400, 800), (64, 127)),
        ("center", (400, 800), (127, 127)),
        ("east", (400, 800), (191, 127)),
        ("north", (800, 400), (127, 64)),
        ("south", (800, 400), (127, 191)),
        ("southeast", (800, 400), (127, 191)),
    ],
)
def test_resize_cover_keeps_the_part_gravity_names(
    gravity: str, size: tuple[int, int], expect: tuple[int, int]
) -> None:
    # Channel 0 grows left to right, channel 1 top to bottom: the mean of what is kept
    # says which 400×400 square the cover crop took.
    h, w = size
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[:, :, 0] = np.linspace(0, 255, w).astype(np.uint8)[None, :]
    img[:, :, 1] = np.linspace(0, 255, h).astype(np.uint8)[:, None]
    out = apply_chain(img, parse_chain(f"resize:w=100,h=100,fit=cover,gravity={gravity}"))
    assert out.shape == (100, 100, 3)
    means = (float(out[:, :, 0].mean()), float(out[:, :, 1].mean()))
    assert abs(means[0] - expect[0]) < 3 and abs(means[1] - expect[1]) < 3, means


def test_resize_cover_smart_keeps_the_object() -> None:
    img = with_disc(90, 200)
    out = apply_chain(img, parse_chain("resize:w=200,h=200,fit=cover,gravity=smart"))
    # The 400×400 square kept is the left one: the disc is in it, halved.
    red = (out[:, :, 0] > 150) & (out[:, :, 1] < 80)
    assert red.sum() > 0.8 * np.pi * 20 * 20


def test_default_gravity_is_not_written_in_the_canonical_chain() -> None:
    assert parse_chain("resize:w=10,h=10,fit=cover,gravity=center").canonical() == (
        "resize:w=10,h=10,fit=cover"
    )
    assert parse_chain("crop:w=5,gravity=smart").canonical() == "crop:w=5,gravity=smart"


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("crop:w=10,h=10,gravity=middle", "gravity must be one of center|north|"),
        ("crop:x=3,w=10,h=10,gravity=smart", "either x, y or gravity"),
        ("resize:w=10,h=10,gravity=smart", "gravity needs w, h and fit=cover"),
        ("resize:w=10,gravity=north", "gravity needs w, h and fit=cover"),
        ("resize:w=10,h=10,fit=cover,gravity=sm", "gravity must be one of"),
    ],
)
def test_bad_gravity_is_a_clear_error(spec: str, needle: str) -> None:
    with pytest.raises(FilterError, match=needle.replace("|", r"\|")):
        parse_chain(spec)


@pytest.mark.parametrize("spec", ["crop:w=200,h=150,gravity=smart",
                                  "resize:w=100,h=100,fit=cover,gravity=smart"])
def test_the_chain_reports_smart_on_detail_and_center_on_a_flat_image(spec: str) -> None:
    chain = parse_chain(spec)
    used: list[str] = []
    out = apply_chain(with_texture(620, 300), chain, gravities=used)
    assert used == ["smart"]
    flat: list[str] = []
    flat_out = apply_chain(plain(), chain, gravities=flat)
    assert flat == ["center"]
    assert out.shape == flat_out.shape


def test_the_report_has_one_entry_per_smart_placement_in_order() -> None:
    # The textured patch is placed by interest; after brightness 0 (black) the second
    # smart crop finds none; a fixed gravity adds nothing.
    chain = parse_chain("crop:w=300,h=200,gravity=smart|brightness:factor=0|"
                        "crop:w=50,h=50,gravity=smart|crop:w=40,h=40,gravity=north")
    used: list[str] = []
    apply_chain(with_texture(600, 250), chain, gravities=used)
    assert used == ["smart", "center"]


@pytest.mark.parametrize("spec", ["grayscale|crop:w=200,h=100,gravity=east",
                                  "crop:w=2000,h=1000,gravity=smart",
                                  "resize:w=80,h=40,fit=cover,gravity=smart"])
def test_no_smart_placement_reports_nothing(spec: str) -> None:
    # Fixed gravities place nothing by interest; a window as large as the image (a crop
    # larger than it, a cover box of the same aspect) is not placed at all.
    used: list[str] = []
    apply_chain(with_texture(100, 100), parse_chain(spec), gravities=used)
    assert used == []


def test_gravities_are_reported_only_to_the_chain_that_asked() -> None:
    img = with_texture(20, 20)
    assert place(img, 200, 150, "smart") == place(img, 200, 150, "smart")  # no recorder
    used: list[str] = []
    apply_chain(img, parse_chain("crop:w=200,h=150,gravity=smart"), gravities=used)
    apply_chain(img, parse_chain("crop:w=200,h=150,gravity=smart"))
    assert used == ["smart"]
