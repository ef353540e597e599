"""Synthetic test images and image comparison, built in memory.

``photo()`` is smooth with edges and mild noise, like a photograph: reference checks
against Pillow compare on it, because noise-free flat images hide differences and pure
noise exaggerates them.
"""

from __future__ import annotations

import io
import math
from functools import cache
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

Pixels = npt.NDArray[np.uint8]

# The filters DESIGN.md promises. The registry may hold more (test hooks register
# ``crash`` and ``sleep`` in some processes), so tests draw from this set, not from it.
DESIGN_FILTERS = frozenset(
    [
        "resize",
        "crop",
        "rotate",
        "flip",
        "blur",
        "sharpen",
        "brightness",
        "contrast",
        "saturation",
        "grayscale",
        "sepia",
        "invert",
        "edges",
        "emboss",
        "median",
        "denoise",
        "equalize",
        "pixelate",
        "encode",
    ]
)


@cache
def _photo(height: int, width: int, channels: int, seed: int) -> Pixels:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    w, h = max(width, 2), max(height, 2)
    planes = [
        128 + 100 * np.sin(2.5 * x / w) * np.cos(3 * y / h),
        128 + 90 * np.cos(4 * (x + y) / (w + h)),
        128 + 80 * np.sin(6 * x * y / (w * h)),
    ]
    img = np.stack(planes, axis=-1)
    for _ in range(6):  # a few hard-edged discs
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.05, 0.25) * min(w, h)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(20, 235, 3)
    img += rng.normal(0, 2.0, img.shape)
    rgb = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    if channels == 1:
        gray = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
        return np.clip(gray + 0.5, 0, 255).astype(np.uint8)[..., None]
    if channels == 4:
        alpha = np.clip(255 * (x / w + 0.25), 0, 255).astype(np.uint8)[..., None]
        return np.concatenate([rgb, alpha], axis=2)
    return rgb


def photo(height: int = 360, width: int = 640, channels: int = 3, *, seed: int = 0) -> Pixels:
    """A fresh, writable copy of a deterministic photo-like image."""
    return _photo(height, width, channels, seed).copy()


def psnr(a: Any, b: Any) -> float:
    """Peak signal-to-noise ratio in dB between two uint8 images (inf when equal)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def to_pil(img: Pixels) -> Image.Image:
    return Image.fromarray(img[..., 0] if img.shape[2] == 1 else img)


def from_pil(im: Image.Image) -> Pixels:
    arr = np.array(im)
    return arr[..., None] if arr.ndim == 2 else arr


def save(im: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **options)
    return out.getvalue()
