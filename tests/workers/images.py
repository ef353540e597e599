"""Small deterministic test images for the worker tests, made with numpy and OpenCV."""

from __future__ import annotations

from functools import cache

import cv2
import numpy as np


def picture(width: int, height: int, seed: int = 0) -> np.ndarray:
    """An RGB image with gradients, shapes and mild noise (compresses like a photo)."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    img = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1)
    for _ in range(6):
        cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = max(1, int(min(width, height) * rng.uniform(0.05, 0.2)))
        colour = tuple(float(v) for v in rng.uniform(0, 255, 3))
        cv2.circle(img, (cx, cy), r, colour, -1)
    img += rng.standard_normal(img.shape, dtype=np.float32) * 6
    return np.clip(img, 0, 255).astype(np.uint8)


@cache
def jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    img = picture(width, height, seed)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


@cache
def png(width: int, height: int, seed: int = 0) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(picture(width, height, seed),
                                                cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()
