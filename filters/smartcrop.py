"""Where a crop window goes: a fixed gravity or ``smart``, scored by interest.

``smart`` works the way smartcrop.js does, on a copy whose longest side is at most
``ANALYSIS_SIDE`` px (so its cost barely depends on the input size): every pixel gets
an interest score from edge strength (Sobel on the luminance), skin-tone likeness and
saturation, and the window of the requested size with the most interest wins, ties
going to the one nearest the centre. An image with no interest anywhere (flat, or
interest spread evenly) falls back to the centre. No face detector is used: the
installed OpenCV ships no Haar cascades and nothing is downloaded.

Which of the two a ``smart`` placement did is kept for whoever asked inside
:func:`recording` (the chain, for the job document): ``"smart"`` when the interest
score placed the window, ``"center"`` when it fell back. Filters keep their
``(img, params) -> img`` shape; the note travels beside them in a context variable
and costs one list append.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import cv2
import numpy as np

from imgpipe.filters.pixels import Image

GRAVITIES = (
    "center",
    "north",
    "south",
    "east",
    "west",
    "northeast",
    "northwest",
    "southeast",
    "southwest",
    "smart",
)
ANALYSIS_SIDE = 256
"""Longest side in px of the copy ``smart`` scores."""
FLAT_INTEREST = 4.0
"""Below this peak interest (0..~255 scale) an image counts as flat: centre crop."""
_SKIN_RGB = np.array([0.78, 0.57, 0.44], dtype=np.float32)  # smartcrop.js skinColor
_SKIN_WEIGHT = 1.8
_SAT_WEIGHT = 0.3

_placements: ContextVar[list[str] | None] = ContextVar("smart_placements", default=None)


@contextmanager
def recording() -> Iterator[list[str]]:
    """Collect, in order, the gravity each ``smart`` placement in this context used:
    ``"smart"`` (placed by interest) or ``"center"`` (fell back: no interest). A
    window as large as the image is not placed, so it adds nothing."""
    used: list[str] = []
    token = _placements.set(used)
    try:
        yield used
    finally:
        _placements.reset(token)


def place(img: Image, cw: int, ch: int, gravity: str) -> tuple[int, int]:
    """Top-left (x, y) of a cw×ch window (each at most the image's side) by ``gravity``."""
    height, width = img.shape[:2]
    free_x, free_y = width - cw, height - ch
    if free_x <= 0 and free_y <= 0:
        return 0, 0
    if gravity == "smart":
        x, y, used = _smart(img, cw, ch)
        record = _placements.get()
        if record is not None:
            record.append(used)
        return x, y
    fx = 0.0 if "west" in gravity else 1.0 if "east" in gravity else 0.5
    fy = 0.0 if "north" in gravity else 1.0 if "south" in gravity else 0.5
    return int(free_x * fx), int(free_y * fy)


def interest(img: Image) -> np.ndarray:
    """Interest per pixel (float32, same height and width as ``img``)."""
    rgb = img[:, :, :3].astype(np.float32) if img.shape[2] >= 3 else None
    if rgb is None:
        lum = img[:, :, 0].astype(np.float32)
    else:
        lum = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    gx = cv2.Sobel(lum, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(lum, cv2.CV_32F, 0, 1, ksize=3)
    score = np.minimum(cv2.magnitude(gx, gy) / 4.0, 255.0)
    if rgb is not None:
        norm = rgb / (np.linalg.norm(rgb, axis=2, keepdims=True) + 1e-6)
        skin_dist = np.linalg.norm(norm - _SKIN_RGB / np.linalg.norm(_SKIN_RGB), axis=2)
        bright = (lum > 50) & (lum < 240)
        skin = np.clip(1.0 - skin_dist / 0.2, 0.0, 1.0) * bright * 255.0
        hi, lo = rgb.max(axis=2), rgb.min(axis=2)
        sat = np.where(hi > 0, (hi - lo) / np.maximum(hi, 1.0), 0.0) * 255.0
        # Saturation and skin count only where there is some structure nearby, so a
        # uniformly coloured background is as flat as a gray one.
        near_edges = cv2.blur(score, (9, 9)) > 1.0
        score = score + near_edges * (_SKIN_WEIGHT * skin + _SAT_WEIGHT * sat)
    if img.shape[2] == 4:
        score = score * (img[:, :, 3].astype(np.float32) / 255.0)
    return score.astype(np.float32)


def _smart(img: Image, cw: int, ch: int) -> tuple[int, int, str]:
    """(x, y, "smart") by interest, or the centre window with "center" when there is none."""
    height, width = img.shape[:2]
    s = min(1.0, ANALYSIS_SIDE / max(width, height))
    small: np.ndarray = img
    if s < 1.0:
        size = (max(1, round(width * s)), max(1, round(height * s)))
        small = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
        if small.ndim == 2:
            small = small[:, :, None]
    sh, sw = small.shape[:2]
    score = interest(small)
    cx = width // 2 - cw // 2
    cy = height // 2 - ch // 2
    if float(score.max()) < FLAT_INTEREST:
        return cx, cy, "center"
    # Window size on the small copy; every position scored from one summed-area table.
    ww = min(sw, max(1, round(cw * sw / width)))
    wh = min(sh, max(1, round(ch * sh / height)))
    sat = cv2.integral(score, sdepth=cv2.CV_64F)
    sums = sat[wh:, ww:] - sat[:-wh, ww:] - sat[wh:, :-ww] + sat[:-wh, :-ww]
    best = float(sums.max())
    if best - float(sums.min()) <= 1e-6 * max(best, 1.0):
        return cx, cy, "center"  # every window is as interesting as every other
    ys, xs = np.nonzero(sums >= best * (1 - 1e-6))
    ccx, ccy = (sw - ww) / 2, (sh - wh) / 2
    i = int(np.argmin((xs - ccx) ** 2 + (ys - ccy) ** 2))
    x = min(width - cw, max(0, round(int(xs[i]) * width / sw)))
    y = min(height - ch, max(0, round(int(ys[i]) * height / sh)))
    return x, y, "smart"
