"""Filter chains: ``name[:key=value[,key=value…]]`` joined by ``|``, applied left to right.

``resize:w=1920,h=1080,fit=cover|sharpen:amount=1.5|encode:format=webp,quality=80``

Values are integers, numbers (no NaN or infinity), booleans (true/false/1/0) or one of
a parameter's choices. ``encode`` sets the output format and may only come last. The
canonical form writes each step with only its non-default parameters, in declaration
order, numbers in their shortest exact form; parsing it gives the same chain back.
The user's order is never changed.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from imgpipe.core.errors import FilterError, ImageTooLarge
from imgpipe.filters import codec
from imgpipe.filters.codec import DEFAULT_MAX_PIXELS, EncodeParams, ImageInfo
from imgpipe.filters.formats import output_format
from imgpipe.filters.geometry import ResizeParams, resize_scale, resize_size
from imgpipe.filters.params import ParamError, Params, infos, quote
from imgpipe.filters.pixels import Image, Target, check_image, writing_into
from imgpipe.filters.registry import (
    CODEC_MS_PER_MP,
    REGISTRY,
    STEP_MS_4K,
    Cost,
    FilterSpec,
    step_ms_per_mp,
)
from imgpipe.filters.smartcrop import recording

MAX_FILTERS = 12
MAX_SPEC_CHARS = 4096
"""Longest chain text accepted; a chain of 12 filters with every parameter fits easily."""
PARSED_CACHE = 512
"""Parsed chains kept per process: a service sees a few chains over and over (the
gateway checks each twice, the worker and its filter process once more), and parsing
one costs ~0.1 ms per step. Chains are immutable, so one object serves every caller."""
REDUCE_FACTORS = (8, 4, 2)


@dataclass(frozen=True)
class Step:
    """One filter of a chain with its checked parameters."""

    name: str
    params: Params

    @property
    def spec(self) -> FilterSpec[Any]:
        return REGISTRY[self.name]

    @property
    def cost(self) -> Cost:
        return self.spec.step_cost(self.params)

    def canonical(self) -> str:
        args = ",".join(f"{info.name}={info.format(v)}" for info, v in self.params.non_defaults())
        return f"{self.name}:{args}" if args else self.name


@dataclass(frozen=True)
class Chain:
    """Parsed filter steps (without ``encode``) and the output settings, if any."""

    steps: tuple[Step, ...]
    encode: EncodeParams | None = None

    def canonical(self) -> str:
        return self._canonical

    @functools.cached_property
    def _canonical(self) -> str:  # computed once: a parsed chain is shared
        parts = [step.canonical() for step in self.steps]
        if self.encode is not None:
            parts.append(Step("encode", self.encode).canonical())
        return "|".join(parts)

    def __str__(self) -> str:
        return self.canonical()

    @functools.cached_property
    def cost(self) -> Cost:
        """``heavy`` if any step is heavy: the class of worker the task is routed to."""
        steps = self.steps if self.encode is None else (*self.steps, Step("encode", self.encode))
        return "heavy" if any(step.cost == "heavy" for step in steps) else "light"

    @functools.cached_property
    def order_free(self) -> bool:
        """True when every step treats the colour channels alike: the chain may run on
        a B, G, R frame (decoded and encoded by OpenCV without a swap) and give the same
        output bytes as on R, G, B."""
        return all(step.spec.is_order_free(step.params) for step in self.steps)

    def decode_input(self, data: bytes | memoryview, *,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image, ImageInfo]:
        """``data`` decoded for this chain: reduced when it shrinks enough
        (:meth:`reduce_factor`), in B, G, R order when it is :attr:`order_free`, so that
        :meth:`encode_output` needs no swap either. Pixel limit as ``decode_reduced``."""
        return codec.decode_reduced(data, self.reduce_factor, max_pixels=max_pixels,
                                    bgr=self.order_free)

    def encode_output(self, img: Image, input_format: str, *, threads: int = 1
                      ) -> tuple[bytes, str]:
        """The chain's result ``img`` (as :meth:`decode_input` and the steps left it)
        encoded with the chain's ``encode`` settings or the defaults: the bytes and
        their format."""
        enc = self.encode or EncodeParams()
        fmt = output_format(input_format, enc.format)
        return codec.encode(img, fmt, enc.quality, threads=threads, bgr=self.order_free), fmt

    def output_size(
        self, width: int, height: int, *, max_pixels: int | None = None
    ) -> tuple[int, int]:
        """Size after every step; ``ImageTooLarge`` if any step would pass ``max_pixels``."""
        for step in self.steps:
            width, height = _next_size(step, width, height, max_pixels)
        return width, height

    def reduce_factor(self, width: int, height: int) -> int:
        """Largest JPEG DCT-scaling factor (8, 4, 2) that leaves the result equivalent, else 1.

        Allowed only when the first step is a resize that shrinks the (oriented)
        ``width``×``height`` source by at least that factor on both axes, and lands on
        the same output size from the reduced source (rounded up, as libjpeg does).
        """
        if not self.steps or self.steps[0].name != "resize":
            return 1
        p = self.steps[0].params
        assert isinstance(p, ResizeParams)
        sx, sy = resize_scale(width, height, p)
        target = resize_size(width, height, p)
        for f in REDUCE_FACTORS:
            if sx * f <= 1 and sy * f <= 1:
                reduced = (-(-width // f), -(-height // f))
                if resize_size(*reduced, p) == target:
                    return f
        return 1


def output_size(chain: Chain, width: int, height: int) -> tuple[int, int]:
    """The size ``chain`` makes of a ``width``×``height`` input, without touching pixels."""
    return chain.output_size(width, height)


def estimate_ms(chain: Chain, width: int, height: int) -> float:
    """Estimated CPU milliseconds of one output: decode, every step, encode.

    Each step is weighted (:func:`~imgpipe.filters.registry.step_ms_per_mp`) by the
    larger of its input and output in megapixels, so an enlarging resize is charged
    for the pixels it makes and a filter after it for the pixels it gets.
    """
    decode = CODEC_MS_PER_MP * width * height / 1e6
    total, width, height = filters_ms(chain, width, height)
    mp = width * height / 1e6
    if chain.encode is not None:  # an encode dearer than JPEG's (AVIF) pays the difference
        total += step_ms_per_mp("encode", Step("encode", chain.encode).cost) * mp
    return decode + total + CODEC_MS_PER_MP * mp


def filters_ms(chain: Chain, width: int, height: int) -> tuple[float, int, int]:
    """Estimated CPU milliseconds of the chain's steps on a ``width``×``height`` frame
    (no decode, no encode), and the size they make. A resize to the size it is given
    costs nothing (it returns its input: the reduced decode already made that size)."""
    mp = width * height / 1e6
    total = 0.0
    for step in chain.steps:
        nw, nh = _next_size(step, width, height, None)
        new_mp = nw * nh / 1e6
        if not (step.name == "resize" and (nw, nh) == (width, height)):
            total += step_ms_per_mp(step.name, step.cost) * max(mp, new_mp)
        width, height, mp = nw, nh, new_mp
    return total, width, height


def measured(chain: Chain) -> bool:
    """True when every step's cost is in the measured table (not a test filter)."""
    return all(step.name in STEP_MS_4K for step in chain.steps)


def _next_size(step: Step, width: int, height: int, max_pixels: int | None) -> tuple[int, int]:
    geometry = step.spec.geometry
    if geometry is None:
        return width, height
    width, height = geometry(width, height, step.params)
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLarge(
            f"{step.name} would make a {width}×{height} image "
            f"({width * height / 1e6:.1f} megapixels); the limit is {max_pixels / 1e6:g}",
            field="ops",
        )
    return width, height


def apply_chain(img: Image, chain: Chain, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                gravities: list[str] | None = None, into: Target | None = None) -> Image:
    """Run the steps in order; the input is never modified.

    Before a step that changes the size, its output size is checked against
    ``max_pixels`` so that no step allocates more than the limit allows. ``gravities``,
    when given, gets the gravity each ``smart`` placement used, in order: ``"smart"``
    or ``"center"`` (see :func:`~imgpipe.filters.smartcrop.recording`). ``into`` is
    offered to the last step for its result (:func:`~imgpipe.filters.pixels.writing_into`);
    whether it was used, the caller sees from the array returned.
    """
    check_image(img)
    img = np.ascontiguousarray(img)
    last = len(chain.steps) - 1
    with recording() as used:
        for i, step in enumerate(chain.steps):
            height, width = img.shape[:2]
            _next_size(step, width, height, max_pixels)
            with writing_into(into if i == last else None, keep=img):
                img = step.spec.fn(img, step.params)
    if gravities is not None:
        gravities.extend(used)
    return img


def parse_chain(spec: str, *, max_filters: int = MAX_FILTERS) -> Chain:
    """Parse and check a chain; every error is a ``FilterError`` naming what is wrong.

    The same text gives the same (shared, immutable) chain object while it stays among
    the last ``PARSED_CACHE`` parsed; errors are not kept, so a bad chain is refused
    afresh each time."""
    if not isinstance(spec, str):
        raise _error(f"ops must be text, got {type(spec).__name__}")
    if len(spec) > MAX_SPEC_CHARS:
        raise _error(f"ops is too long ({len(spec)} characters, at most {MAX_SPEC_CHARS})")
    return _parse_chain(str(spec), max_filters)


@functools.lru_cache(maxsize=PARSED_CACHE)
def _parse_chain(spec: str, max_filters: int) -> Chain:
    if not spec.strip():
        raise _error("ops is empty; write e.g. resize:w=800|blur:radius=2")
    parts = spec.split("|")
    if len(parts) > max_filters + 1:  # the +1 leaves room for encode
        raise _too_many(len(parts), max_filters)
    steps: list[Step] = []
    encode: EncodeParams | None = None
    for position, part in enumerate(parts, 1):
        step = _parse_step(part, position)
        if encode is not None:
            what = "given twice" if step.name == "encode" else f"followed by {step.name}"
            raise _error(f"encode must be the last step, but it is {what} (step {position})")
        if isinstance(step.params, EncodeParams):
            encode = step.params
        else:
            steps.append(step)
    if len(steps) > max_filters:
        raise _too_many(len(steps), max_filters)
    return Chain(tuple(steps), encode)


def _parse_step(text: str, position: int) -> Step:
    text = text.strip()
    if not text:
        raise _error(f"step {position} is empty (a stray '|'?)")
    name, colon, args = text.partition(":")
    name = name.strip()
    spec = REGISTRY.get(name)
    if spec is None:
        raise _error(f"unknown filter {quote(name)} (step {position}); {_suggest(name)}")
    where = f"{name} (step {position})"
    if colon and not args.strip():
        raise _error(f"{where}: ':' must be followed by key=value")
    by_name = {info.name: info for info in infos(spec.params)}
    values: dict[str, Any] = {}
    for item in args.split(",") if colon else ():
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not key:
            raise _error(f"{where}: empty parameter (a stray ','?)")
        info = by_name.get(key)
        if info is None:
            known = ", ".join(by_name) or "nothing"
            raise _error(f"{where}: unknown parameter {quote(key)}; {name} takes {known}")
        if key in values:
            raise _error(f"{where}: {key} is given twice")
        if not eq:
            raise _error(f"{where}: {key} needs a value ({key}=VALUE)")
        try:
            values[key] = info.parse(raw)
        except ParamError as exc:
            raise _error(f"{where}: {exc.detail}") from None
    try:
        params = spec.params(**values)
    except ParamError as exc:
        raise _error(f"{where}: {exc.detail}") from None
    return Step(name, params)


def _error(detail: str) -> FilterError:
    return FilterError(detail, field="ops")


def _too_many(count: int, max_filters: int) -> FilterError:
    return _error(f"too many filters: {count}, at most {max_filters} per chain")


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name.lower(), REGISTRY, n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(close) + "?"
    return "filters are " + ", ".join(sorted(REGISTRY))
