"""The filter registry: every filter by name, with its parameters and cost class.

Cost class (the ventilator routes a task to light or heavy workers by it): a step is
**heavy** when, on a 3840×2160 RGB frame on one core, it costs more than the work
every task does anyway, decoding and re-encoding that frame as JPEG (about 105 ms on
the reference machine: 70 decode + 35 encode), so a heavy step at least doubles its
task. A filter whose cost depends on its parameters is light with a ``heavy_when``
rule for the values that cross the line. A chain is heavy if any step is.

CPU time per 4K frame on the reference machine (one OpenCV thread, best of 5):

============  ===============================================  =====================
filter        ms                                               class
============  ===============================================  =====================
resize        4 (w=1920), 9 (w=480), 80 (w=3456, the slowest   light (enlarging is
              shrink), 60 (1920² cover), 110 (enlarge to 50 MP) dominated by encode)
              70 (1920² cover, gravity=smart)
crop          0.6; 19 (1920×1080, gravity=smart)               light
rotate        16 (90°), 4 (180°); 83 (30°), 143 (45°, expand)  heavy off 90° steps
flip          4                                                light
blur          32 (σ=2), 45 (σ=6), 47 (σ=100)                   light
sharpen       66 (defaults), 63 (σ=100)                        light
brightness    11                                               light
contrast      23                                               light
saturation    25                                               light
grayscale     5                                                light
sepia         7                                                light
invert        4                                                light
edges         30                                               light
emboss        12                                               light
median        5 (3), 22 (5); 761 (7), 883 (15)                 heavy above size 5
equalize      45                                               light
pixelate      32 (8), 54 (512)                                 light
denoise       9085                                             heavy
encode        0 over the JPEG encode above; avif 790 more      heavy for avif
============  ===============================================  =====================

Encoding the 4K frame (``photo()`` of tests/filters/images.py at quality 85, one
thread, best of 3, a timing script on a 2-core AMD EPYC): JPEG 33 ms, WebP 672 ms, AVIF
822 ms (libavif speed 8 through Pillow 13; Pillow's default speed 6 is ~3.7× that).
At 1920×1080: JPEG 10, WebP 209, AVIF 236 (speed 6: 872). The ``encode`` row charges
AVIF's difference from JPEG (822 − 33 ≈ 790), since every output already pays a JPEG
encode in ``CODEC_MS_PER_MP``. WebP is not yet charged or classed heavy.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from imgpipe.filters.params import Params, infos
from imgpipe.filters.pixels import Image

Cost = Literal["light", "heavy"]

FRAME_4K_MP = 3840 * 2160 / 1e6
"""The reference frame of the table above, in megapixels (8.29)."""
CODEC_MS_PER_MP = 105 / FRAME_4K_MP
"""Decode (70 ms) plus JPEG encode (35 ms) of the 4K frame, per megapixel: every output
pays it once on its input's pixels and once on its output's (a fair split)."""
STEP_MS_4K: dict[str, tuple[float, float]] = {
    # The table above, per use: (light use, heavy use) in ms per 4K frame; the
    # slowest measured case of each class, so an estimate errs towards too high.
    "resize": (110, 110), "crop": (19, 19), "rotate": (16, 143), "flip": (4, 4),
    "blur": (47, 47), "sharpen": (66, 66), "brightness": (11, 11), "contrast": (23, 23),
    "saturation": (25, 25), "grayscale": (5, 5), "sepia": (7, 7), "invert": (4, 4),
    "edges": (30, 30), "emboss": (12, 12), "median": (22, 883), "equalize": (45, 45),
    "pixelate": (54, 54), "denoise": (9085, 9085),
    # Extra over the JPEG encode every output pays: none, or AVIF's (measured, above).
    "encode": (0, 790),
}
DEFAULT_STEP_MS_4K = 50.0
"""A filter missing from the table (test filters) is estimated at this."""


def step_ms_per_mp(name: str, cost: Cost) -> float:
    """Estimated CPU milliseconds per megapixel of one use of filter ``name``.

    From the table above (one core of the reference machine): the weight the gateway's
    job-cost estimate multiplies by each step's megapixels.
    """
    light, heavy = STEP_MS_4K.get(name, (DEFAULT_STEP_MS_4K, DEFAULT_STEP_MS_4K))
    return (heavy if cost == "heavy" else light) / FRAME_4K_MP
P = TypeVar("P", bound=Params)
FilterFn = Callable[[Image, P], Image]
Geometry = Callable[[int, int, P], tuple[int, int]]

_NAME_RE = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class FilterSpec(Generic[P]):
    """A registered filter.

    ``geometry(width, height, params)`` gives the output size without touching pixels
    (``None``: the size does not change); the chain uses it to refuse an output over
    the pixel limit before computing it, and callers to size buffers.

    ``order_free`` (``True``, or a test of the parameters) says the filter treats the
    three colour channels alike: run on a frame with R and B swapped, it gives its
    usual result with R and B swapped. A chain of such steps can run on the B, G, R
    frames OpenCV decodes and encodes, with no swap at either end.
    """

    name: str
    fn: FilterFn[P]
    params: type[P]
    cost: Cost
    doc: str
    geometry: Geometry[P] | None = None
    heavy_when: Callable[[P], bool] | None = None
    order_free: bool | Callable[[P], bool] = False

    def is_order_free(self, params: P) -> bool:
        """Whether this use commutes with swapping R and B (see the class)."""
        return self.order_free(params) if callable(self.order_free) else self.order_free

    def step_cost(self, params: P) -> Cost:
        """The cost class of one use: ``heavy_when`` can make a light filter heavy."""
        if self.cost == "light" and self.heavy_when is not None and self.heavy_when(params):
            return "heavy"
        return self.cost

    def describe(self) -> dict[str, Any]:
        """JSON-able description for ``GET /api/filters``."""
        return {
            "name": self.name,
            "cost": self.cost,
            "doc": self.doc,
            "params": [info.describe() for info in infos(self.params)],
        }


REGISTRY: dict[str, FilterSpec[Any]] = {}


def register(
    name: str,
    *,
    params: type[P],
    cost: Cost = "light",
    geometry: Geometry[P] | None = None,
    heavy_when: Callable[[P], bool] | None = None,
    order_free: bool | Callable[[P], bool] = False,
) -> Callable[[FilterFn[P]], FilterFn[P]]:
    """Register ``fn(img, params) -> img`` under ``name``; a name registered twice is an error.

    ``cost`` is the filter's class; ``heavy_when(params)`` marks the parameter values
    that make a light filter heavy (a large median window, say); ``order_free`` those
    that treat the colour channels alike (:class:`FilterSpec`), by default none.
    """
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"bad filter name {name!r}")
    if cost not in ("light", "heavy"):
        raise ValueError(f"cost must be 'light' or 'heavy', got {cost!r}")
    infos(params)  # fails now if a field is not declared with param()

    def decorate(fn: FilterFn[P]) -> FilterFn[P]:
        if name in REGISTRY:
            raise ValueError(f"filter {name!r} is already registered")
        doc = (fn.__doc__ or "").strip().split("\n\n")[0]
        REGISTRY[name] = FilterSpec(
            name, fn, params, cost, " ".join(doc.split()), geometry, heavy_when, order_free
        )
        return fn

    return decorate


def describe_filters() -> list[dict[str, Any]]:
    """Every filter with its parameters, types, ranges and defaults, sorted by name."""
    return [REGISTRY[name].describe() for name in sorted(REGISTRY)]
