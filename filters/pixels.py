"""The image contract every filter and the codec share.

An image is a C-contiguous numpy ``uint8`` array, always 3-D ``H×W×C`` with ``C`` in
{1 (gray), 3 (RGB, not OpenCV's BGR), 4 (RGBA, straight alpha)}. OpenCV drops a
trailing channel axis of length 1, so every OpenCV result goes through ``as_image``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, TypeAlias

import cv2
import numpy as np
import numpy.typing as npt

Image: TypeAlias = npt.NDArray[np.uint8]

CHANNELS = (1, 3, 4)

Target: TypeAlias = Callable[[tuple[int, ...]], "Image | None"]
"""Offers an array of a given shape for a step's result (None: no room for it)."""
# What a step may write into, and the array the offer must never overlap.
_target: ContextVar[tuple[Target, Image | None] | None] = ContextVar("imgpipe_target",
                                                                    default=None)


@contextlib.contextmanager
def writing_into(target: Target | None, *, keep: Image | None = None) -> Iterator[None]:
    """While inside, a step may put its result in the array ``target(shape)`` offers
    (see :func:`destination`): the filter process gives the chain's last step the shared
    memory the worker encodes from, so the result is not copied there after. ``keep``
    (the step's input) is never written over: a step's helpers may read it after one of
    them has written its result."""
    token = _target.set(None if target is None else (target, keep))
    try:
        yield
    finally:
        _target.reset(token)


def destination(src: Image, shape: tuple[int, ...] | None = None) -> Image | None:
    """The array a step may write its ``shape``-d result into (``src``'s shape by
    default), or None: none offered, no room, or it overlaps ``src`` or the step's input.
    OpenCV writes into a ``dst`` of the right shape and type and returns it; a step that
    is given None allocates its result as usual. The offer is taken once: a second helper of the same
    step (sharpen's blur, then its sum) allocates, so no two results share the array."""
    offer = _target.get()
    if offer is None:
        return None
    target, keep = offer
    dst = target(tuple(shape or src.shape))
    if dst is None or any(a is not None and np.may_share_memory(dst, a) for a in (src, keep)):
        return None
    _target.set(None)
    return dst


def copy_pixels(dst: Image, src: Image) -> None:
    """``dst[...] = src`` for two arrays of one shape: through OpenCV's copy where it
    writes into ``dst`` itself (a 1920×1080 RGB frame into shared memory: 0.76 ms of CPU
    here against numpy's 1.15), numpy's otherwise."""
    if (dst.shape == src.shape and dst.dtype == src.dtype == np.uint8 and src.ndim == 3
            and src.shape[2] in CHANNELS and dst.flags.c_contiguous
            and src.flags.c_contiguous and not np.may_share_memory(dst, src)):
        out = cv2.copyTo(src, None, dst)  # type: ignore[call-overload]  # mask may be None
        if out.ctypes.data == dst.ctypes.data:
            return
    np.copyto(dst, src)


def as_image(arr: Any) -> Image:
    """An OpenCV or numpy result as an image: 3-D, uint8, C-contiguous."""
    out = np.asarray(arr)
    if out.ndim == 2:
        out = out[:, :, np.newaxis]
    if out.dtype != np.uint8:
        raise TypeError(f"expected uint8 pixels, got {out.dtype}")
    return np.ascontiguousarray(out)


def check_image(img: Any) -> Image:
    """Raise ``ValueError`` unless ``img`` follows the contract; return it unchanged."""
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
        raise ValueError("an image is a numpy uint8 array")
    if img.ndim != 3 or img.shape[2] not in CHANNELS or img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"an image is H×W×C with C in {CHANNELS}, got shape {img.shape}")
    return img


def split_alpha(img: Image) -> tuple[Image, Image | None]:
    """Colour channels (gray or RGB) and the alpha channel, if any (both contiguous)."""
    if img.shape[2] != 4:
        return img, None
    return np.ascontiguousarray(img[:, :, :3]), np.ascontiguousarray(img[:, :, 3:])


def with_alpha(color: Any, alpha: Image | None) -> Image:
    """Put ``alpha`` back on the colour result of a colour-only operation."""
    color = as_image(color)
    if alpha is None:
        return color
    if color.shape[2] == 1:
        color = as_image(cv2.cvtColor(color, cv2.COLOR_GRAY2RGB))
    return np.concatenate([color, alpha], axis=2)


def luma(img: Image) -> Image:
    """ITU-R 601-2 luma (as Pillow's ``convert("L")``), one channel, alpha ignored."""
    if img.shape[2] == 1:
        return img
    code = cv2.COLOR_RGBA2GRAY if img.shape[2] == 4 else cv2.COLOR_RGB2GRAY
    return as_image(cv2.cvtColor(img, code))


def to_rgb(img: Image) -> Image:
    """Colour channels as RGB: gray is repeated, alpha dropped."""
    if img.shape[2] == 3:
        return img
    code = cv2.COLOR_GRAY2RGB if img.shape[2] == 1 else cv2.COLOR_RGBA2RGB
    return as_image(cv2.cvtColor(img, code))


def lut(img: Image, table: npt.NDArray[np.uint8]) -> Image:
    """Apply a 256-entry table to the colour channels; alpha passes through."""
    if img.shape[2] == 4:
        identity = np.arange(256, dtype=np.uint8)
        table = np.stack([table, table, table, identity], axis=-1).reshape(256, 1, 4)
    return as_image(cv2.LUT(img, table, dst=destination(img)))
