"""Test images for the bench and stress commands: generated deterministically or loaded.

A flat or purely random image would lie about the codec: a flat one compresses to
nothing, white noise to a huge file that no camera makes. These are photo-like — a
sky gradient, soft low-frequency variation, hard-edged shapes, a textured ground and
mild sensor noise — so a 3840×2160 JPEG at quality 90 weighs about what a phone
photo does (1–3 MB) and decodes at a realistic cost. Same seed, same bytes.
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

INPUT_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


def parse_size(text: str) -> tuple[int, int]:
    """``"3840x2160"`` -> (3840, 2160); ValueError naming the expected form otherwise."""
    w, sep, h = text.lower().partition("x")
    if not sep or not w.strip().isdigit() or not h.strip().isdigit():
        raise ValueError(f"size {text!r}: use WIDTHxHEIGHT, e.g. 3840x2160")
    width, height = int(w), int(h)
    if not (8 <= width <= 16384 and 8 <= height <= 16384):
        raise ValueError(f"size {text!r}: each side must be 8..16384 pixels")
    return width, height


def photo(width: int, height: int, seed: int) -> np.ndarray:
    """A photo-like RGB image (uint8, H×W×3), the same for the same arguments."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    top, bottom = rng.uniform(60, 200, 3), rng.uniform(20, 140, 3)
    img = np.empty((height, width, 3), np.float32)
    tilt = rng.uniform(-0.3, 0.3)
    t = np.clip(y + tilt * (x - 0.5), 0.0, 1.0)
    for c in range(3):
        img[..., c] = top[c] * (1 - t) + bottom[c] * t
    # Soft, cloud-like variation: coarse noise blown up smoothly.
    coarse = rng.normal(0, 28, (max(2, height // 64), max(2, width // 64), 3)).astype(np.float32)
    img += cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    # Hard-edged shapes at several scales (buildings, objects, highlights).
    scale = min(width, height)
    for _ in range(40):
        colour = tuple(float(v) for v in rng.uniform(0, 255, 3))
        cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(scale * rng.uniform(0.01, 0.15))
        if rng.random() < 0.5:
            cv2.circle(img, (cx, cy), max(1, r), colour, -1, lineType=cv2.LINE_AA)
        else:
            cv2.rectangle(img, (cx - r, cy - r // 2), (cx + r, cy + r), colour, -1)
    # Textured ground in the lower third (grass, gravel): mid-frequency detail.
    ground = height * 2 // 3
    tex = rng.standard_normal((height - ground, width, 3), dtype=np.float32)
    tex *= 22.0
    img[ground:] += cv2.GaussianBlur(tex, (0, 0), 1.2)
    # Mild sensor noise everywhere.
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    noise *= 2.5
    img += noise
    return np.clip(img, 0, 255, out=img).astype(np.uint8)


def jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def generate(count: int, size: tuple[int, int], *, seed: int = 7, quality: int = 90,
             ) -> list[bytes]:
    """``count`` photo-like JPEGs of ``size`` (width, height), deterministic in ``seed``."""
    width, height = size
    return [jpeg(photo(width, height, seed + i), quality) for i in range(count)]


def load(folder: Path, count: int | None = None) -> list[bytes]:
    """The image files of ``folder`` in name order (at most ``count``), as bytes."""
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in INPUT_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no image files ({', '.join(INPUT_SUFFIXES)})")
    return [p.read_bytes() for p in files[:count]]
