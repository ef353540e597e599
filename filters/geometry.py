"""Filters that move pixels: resize, crop, rotate, flip.

Each has a ``*_size`` function that gives the output size from the input size without
touching pixels; the chain checks it against the pixel limit before the work is done.
Sizes are (width, height); arrays are (height, width, channels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from imgpipe.filters.params import ParamError, Params, param
from imgpipe.filters.pixels import Image, as_image
from imgpipe.filters.registry import register
from imgpipe.filters.smartcrop import GRAVITIES, place

MAX_SIDE = 16384
"""Largest width or height resize accepts (WebP itself stops at 16383)."""
MAX_COORD = 65535
"""Largest crop coordinate or size (the largest JPEG side)."""


def _round(x: float) -> int:
    """Round half up, at least 1: a size in pixels."""
    return max(1, math.floor(x + 0.5))


@dataclass(frozen=True)
class ResizeParams(Params):
    w: int = param(0, lo=0, hi=MAX_SIDE, doc="target width in px; 0 = from h and the aspect ratio")
    h: int = param(0, lo=0, hi=MAX_SIDE, doc="target height in px; 0 = from w and the aspect ratio")
    fit: str = param(
        "contain",
        choices=("contain", "cover", "fill"),
        doc="with w and h: contain = fit inside keeping aspect, "
        "cover = fill the box keeping aspect and crop by gravity, fill = stretch",
    )
    gravity: str = param(
        "center",
        choices=GRAVITIES,
        doc="with fit=cover: the part kept; smart = the most detailed part "
        "(edges, skin tones, saturation), the centre on a flat image",
    )

    def check(self) -> None:
        if self.w == 0 and self.h == 0:
            raise ParamError("w", "w or h (or both) is required")
        if self.gravity != "center" and not (self.w and self.h and self.fit == "cover"):
            raise ParamError("gravity", "gravity needs w, h and fit=cover")


def resize_scale(width: int, height: int, p: ResizeParams) -> tuple[float, float]:
    """Scale factors (x, y) applied to the source, before any ``cover`` crop."""
    if p.w and p.h:
        sx, sy = p.w / width, p.h / height
        if p.fit == "fill":
            return sx, sy
        s = max(sx, sy) if p.fit == "cover" else min(sx, sy)
        return s, s
    s = p.w / width if p.w else p.h / height
    return s, s


def resize_size(width: int, height: int, p: ResizeParams) -> tuple[int, int]:
    if p.w and p.h and p.fit != "contain":
        return p.w, p.h
    if p.w and p.h:
        sx, sy = resize_scale(width, height, p)
        return _round(width * sx), _round(height * sy)
    if p.w:
        return p.w, _round(height * p.w / width)
    return _round(width * p.h / height), p.h


@register("resize", params=ResizeParams, geometry=resize_size,
          order_free=lambda p: p.gravity != "smart")
def resize(img: Image, p: ResizeParams) -> Image:
    """Resize to w×h: area averaging when shrinking, bicubic when enlarging.

    One side given keeps the aspect ratio. RGBA is resized premultiplied so that
    transparent pixels do not bleed their colour into the edges.
    """
    height, width = img.shape[:2]
    out_w, out_h = resize_size(width, height, p)
    cropped = False
    if p.w and p.h and p.fit == "cover":
        # Cut the centre with the box's aspect first, then scale only what is kept.
        s = max(p.w / width, p.h / height)
        cw, ch = min(width, _round(p.w / s)), min(height, _round(p.h / s))
        if (cw, ch) != (width, height):
            x, y = place(img, cw, ch, p.gravity)
            img, cropped = img[y : y + ch, x : x + cw], True
            height, width = ch, cw
    if (out_w, out_h) == (width, height):
        return np.array(img) if cropped else img
    if img.shape[2] == 4 and int(img[:, :, 3].min()) < 255:
        return _resize_premultiplied(img, (out_w, out_h))
    return as_image(_scale(img, (out_w, out_h)))


def _scale(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area averaging when shrinking (as Pillow's antialiased resize), bicubic when enlarging."""
    height, width = img.shape[:2]
    shrink = size[0] <= width and size[1] <= height
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def _resize_premultiplied(img: Image, size: tuple[int, int]) -> Image:
    f = img.astype(np.float32)
    alpha = f[:, :, 3:4]
    f[:, :, :3] *= alpha / 255.0
    r = _scale(f, size)
    a = np.clip(r[:, :, 3:4], 0.0, 255.0)
    rgb = np.divide(r[:, :, :3] * 255.0, a, out=np.zeros_like(r[:, :, :3]), where=a > 0.5)
    out = np.concatenate([rgb, a], axis=2)
    return as_image(np.clip(out + 0.5, 0, 255).astype(np.uint8))


@dataclass(frozen=True)
class CropParams(Params):
    x: int = param(0, lo=0, hi=MAX_COORD, doc="left edge in px")
    y: int = param(0, lo=0, hi=MAX_COORD, doc="top edge in px")
    w: int = param(0, lo=0, hi=MAX_COORD, doc="width in px; 0 = to the right edge")
    h: int = param(0, lo=0, hi=MAX_COORD, doc="height in px; 0 = to the bottom edge")
    gravity: str | None = param(
        None,
        kind=str,
        choices=GRAVITIES,
        doc="place the w×h window by gravity instead of x, y; smart = the most detailed "
        "part (edges, skin tones, saturation), the centre on a flat image",
    )

    def check(self) -> None:
        if self.gravity is not None and (self.x or self.y):
            raise ParamError("gravity", "give either x, y or gravity, not both")


def crop_box(width: int, height: int, p: CropParams) -> tuple[int, int, int, int]:
    """(x, y, w, h) clipped to the image; never empty (without gravity: before placing)."""
    if p.gravity is not None:
        w = width if p.w == 0 else min(p.w, width)
        h = height if p.h == 0 else min(p.h, height)
        return 0, 0, w, h
    x, y = min(p.x, width - 1), min(p.y, height - 1)
    w = width - x if p.w == 0 else min(p.w, width - x)
    h = height - y if p.h == 0 else min(p.h, height - y)
    return x, y, w, h


def crop_size(width: int, height: int, p: CropParams) -> tuple[int, int]:
    return crop_box(width, height, p)[2:]


@register("crop", params=CropParams, geometry=crop_size,
          order_free=lambda p: p.gravity != "smart")
def crop(img: Image, p: CropParams) -> Image:
    """Cut the rectangle x, y, w, h, or a w×h window placed by gravity; clipped to the image.

    A box that starts outside the image is moved to its last row or column, so the
    result is at least 1×1.
    """
    height, width = img.shape[:2]
    x, y, w, h = crop_box(width, height, p)
    if (w, h) == (width, height):
        return img
    if p.gravity is not None:
        x, y = place(img, w, h, p.gravity)
    return np.array(img[y : y + h, x : x + w])


@dataclass(frozen=True)
class RotateParams(Params):
    deg: float = param(90.0, lo=-360, hi=360, doc="angle in degrees, counter-clockwise")
    expand: bool = param(
        True, doc="grow the canvas to hold the whole rotated image (false: keep the size)"
    )


def rotate_size(width: int, height: int, p: RotateParams) -> tuple[int, int]:
    """As Pillow's ``rotate(expand=True)``: the box of the corners turned about the centre."""
    if not p.expand:
        return width, height
    rad = -math.radians(p.deg)
    c, s = round(math.cos(rad), 15), round(math.sin(rad), 15)
    cx, cy = width / 2, height / 2
    xs, ys = [], []
    for x, y in ((0, 0), (width, 0), (width, height), (0, height)):
        xs.append(c * (x - cx) + s * (y - cy) + cx)
        ys.append(-s * (x - cx) + c * (y - cy) + cy)
    nw = math.ceil(max(xs)) - math.floor(min(xs))
    nh = math.ceil(max(ys)) - math.floor(min(ys))
    return max(1, nw), max(1, nh)


_QUARTER_TURNS = {
    90: cv2.ROTATE_90_COUNTERCLOCKWISE,
    180: cv2.ROTATE_180,
    270: cv2.ROTATE_90_CLOCKWISE,
}


@register("rotate", params=RotateParams, geometry=rotate_size,
          heavy_when=lambda p: p.deg % 90 != 0, order_free=True)
def rotate(img: Image, p: RotateParams) -> Image:
    """Rotate counter-clockwise by deg (as Pillow); angles off multiples of 90° are heavy.

    Multiples of 90° are exact pixel moves; other angles are bilinear, and the
    uncovered corners are black (transparent for RGBA).
    """
    deg = p.deg % 360.0
    height, width = img.shape[:2]
    if deg == 0:
        return img
    if deg in _QUARTER_TURNS and (p.expand or deg == 180 or width == height):
        return as_image(cv2.rotate(img, _QUARTER_TURNS[int(deg)]))
    out_w, out_h = rotate_size(width, height, p)
    # OpenCV works on pixel centres: the image centre is ((w-1)/2, (h-1)/2).
    m = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), deg, 1.0)
    m[0, 2] += (out_w - width) / 2
    m[1, 2] += (out_h - height) / 2
    out = cv2.warpAffine(
        img,
        m,
        (out_w, out_h),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(0, 0, 0, 0),
    )
    return as_image(out)


@dataclass(frozen=True)
class FlipParams(Params):
    dir: str = param(
        "h", choices=("h", "v", "both"), doc="h = mirror left-right, v = upside down, both"
    )


_FLIP_CODES = {"h": 1, "v": 0, "both": -1}


@register("flip", params=FlipParams, order_free=True)
def flip(img: Image, p: FlipParams) -> Image:
    """Mirror the image horizontally, vertically or both."""
    return as_image(cv2.flip(img, _FLIP_CODES[p.dir]))
