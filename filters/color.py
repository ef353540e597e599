"""Filters that change colours pixel by pixel: they keep the size and the alpha channel.

The enhance factors follow Pillow's ``ImageEnhance``: 0 gives the degenerate image
(black, mid gray or gray), 1 gives the input unchanged, above 1 exaggerates. Point
operations run as one 256-entry table lookup (``cv2.LUT``), the fastest path there is.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from imgpipe.filters.params import Params, param
from imgpipe.filters.pixels import Image, as_image, luma, lut, split_alpha, to_rgb, with_alpha
from imgpipe.filters.registry import register

MAX_FACTOR = 10.0

_LEVELS = np.arange(256, dtype=np.float64)


def _table(values: npt.NDArray[np.float64]) -> npt.NDArray[np.uint8]:
    return np.clip(np.floor(values + 0.5), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class FactorParams(Params):
    factor: float = param(
        1.0, lo=0, hi=MAX_FACTOR, doc="1 = unchanged, 0 = the flat extreme, above 1 = stronger"
    )


@register("brightness", params=FactorParams, order_free=True)
def brightness(img: Image, p: FactorParams) -> Image:
    """Scale every colour value by factor (0 = black, as Pillow's ImageEnhance.Brightness)."""
    if p.factor == 1:
        return img
    return lut(img, _table(_LEVELS * p.factor))


@register("contrast", params=FactorParams)
def contrast(img: Image, p: FactorParams) -> Image:
    """Move values away from the mean gray by factor (0 = flat gray, as ImageEnhance.Contrast)."""
    if p.factor == 1:
        return img
    mean = int(cv2.mean(luma(img))[0] + 0.5)
    return lut(img, _table(mean + p.factor * (_LEVELS - mean)))


@register("saturation", params=FactorParams)
def saturation(img: Image, p: FactorParams) -> Image:
    """Move colours away from their gray by factor (0 = grayscale, as ImageEnhance.Color)."""
    if p.factor == 1 or img.shape[2] == 1:
        return img
    rgb, alpha = split_alpha(img)
    gray = cv2.cvtColor(luma(rgb), cv2.COLOR_GRAY2RGB)
    return with_alpha(cv2.addWeighted(rgb, p.factor, gray, 1.0 - p.factor, 0.0), alpha)


@dataclass(frozen=True)
class NoParams(Params):
    """A filter without parameters."""


@register("grayscale", params=NoParams)
def grayscale(img: Image, p: NoParams) -> Image:
    """ITU-R 601 luma, as Pillow's convert("L"): RGB becomes one channel; RGBA keeps alpha.

    RGBA stays four channels with equal R, G and B, since gray with alpha has no
    place in the image contract.
    """
    if img.shape[2] == 1:
        return img
    gray = luma(img)
    return gray if img.shape[2] == 3 else with_alpha(gray, img[:, :, 3:])


@dataclass(frozen=True)
class SepiaParams(Params):
    amount: float = param(1.0, lo=0, hi=1, doc="0 = unchanged, 1 = full sepia")


_SEPIA = np.array(
    [[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], dtype=np.float64
)


@register("sepia", params=SepiaParams)
def sepia(img: Image, p: SepiaParams) -> Image:
    """Warm brown tone (the classic sepia matrix), blended with the input by amount.

    Gray input becomes RGB.
    """
    if p.amount == 0:
        return img
    m = (1.0 - p.amount) * np.eye(3) + p.amount * _SEPIA
    if img.shape[2] == 4:
        m4 = np.eye(4)
        m4[:3, :3] = m
        return as_image(cv2.transform(img, m4))
    return as_image(cv2.transform(to_rgb(img), m))


@register("invert", params=NoParams, order_free=True)
def invert(img: Image, p: NoParams) -> Image:
    """Negative of the colours (255 - value); alpha is kept."""
    if img.shape[2] == 4:
        return lut(img, np.arange(255, -1, -1, dtype=np.uint8))
    return as_image(cv2.bitwise_not(img))


def _equalize_table(channel: Image) -> npt.NDArray[np.uint8] | None:
    """Pillow's ``ImageOps.equalize`` table for one channel; ``None`` when it is flat."""
    hist = cv2.calcHist([channel], [0], None, [256], [0, 256]).ravel().astype(np.int64)
    used = hist[hist > 0]
    step = (int(used.sum()) - int(used[-1])) // 255 if len(used) > 1 else 0
    if step == 0:
        return None
    below = np.concatenate(([0], np.cumsum(hist)[:-1]))
    return np.minimum((step // 2 + below) // step, 255).astype(np.uint8)


@register("equalize", params=NoParams)
def equalize(img: Image, p: NoParams) -> Image:
    """Histogram equalisation (Pillow's ImageOps.equalize) of the luma, so hues do not shift.

    Colour images are equalised on Y of YCrCb; alpha is kept.
    """
    color, alpha = split_alpha(img)
    if color.shape[2] == 1:
        table = _equalize_table(color)
        return img if table is None else with_alpha(cv2.LUT(color, table), alpha)
    ycc = as_image(cv2.cvtColor(color, cv2.COLOR_RGB2YCrCb))
    table = _equalize_table(ycc[:, :, 0])
    if table is None:
        return img
    ycc[:, :, 0] = cv2.LUT(ycc[:, :, 0], table)
    return with_alpha(cv2.cvtColor(ycc, cv2.COLOR_YCrCb2RGB), alpha)
