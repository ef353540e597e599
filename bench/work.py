"""The per-image work each bench mode times: the naive Pillow script and imgpipe's path.

Both are plain module-level functions over bytes, so a process pool can run them
(arguments and results cross the process boundary as bytes, never as arrays).

``naive`` is the script a beginner writes with Pillow: ``Image.open`` decodes the
full image, every effect runs at full resolution, the Lanczos resize comes last,
then ``save``. ``imgpipe_one`` is what a worker does: probe the header, decode at a
reduced scale when the chain starts with a shrinking resize, ``apply_chain``, encode.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing.connection import Connection
from typing import Any

from PIL import Image, ImageEnhance, ImageFilter, ImageOps

DEFAULT_OPS = "resize:w=1920,h=1080|blur:radius=2|brightness:factor=1.1|encode:format=jpeg,quality=85"

# --- imgpipe's path ---------------------------------------------------------------


@lru_cache(maxsize=16)
def _chain(spec: str):  # type: ignore[no-untyped-def]
    from imgpipe.filters import parse_chain

    return parse_chain(spec)


def check_spec(spec: str) -> str:
    """The canonical form of ``spec``; FilterError when the filters refuse it."""
    return str(_chain(spec).canonical())


def imgpipe_one(data: bytes, spec: str) -> bytes:
    """Decode (reduced when allowed) -> chain -> encode, as a worker does."""
    from imgpipe.filters import apply_chain

    chain = _chain(spec)
    img, info = chain.decode_input(data)
    out = apply_chain(img, chain)
    return bytes(chain.encode_output(out, info.format)[0])


def stage_times(data: bytes, spec: str) -> dict[str, float]:
    """Milliseconds per stage of :func:`imgpipe_one` (probe, decode, each filter, encode)."""
    from imgpipe.filters import apply_chain, codec, parse_chain

    chain = _chain(spec)
    out: dict[str, float] = {}
    t = time.perf_counter()
    info = codec.probe(data)
    reduce = chain.reduce_factor(info.width, info.height)
    out["probe"] = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    img = codec.decode(data, reduce=reduce, bgr=chain.order_free)
    out[f"decode(reduce={reduce})"] = (time.perf_counter() - t) * 1000
    for i, part in enumerate(spec.split("|")):
        if part.strip().startswith("encode"):
            continue
        t = time.perf_counter()
        img = apply_chain(img, parse_chain(part))
        out[f"{i}:{part.split(':')[0].strip()}"] = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    chain.encode_output(img, info.format)
    out["encode"] = (time.perf_counter() - t) * 1000
    return out


def timed(fn: Callable[[bytes, Any], bytes], data: bytes, arg: Any) -> tuple[bytes, float]:
    """``fn(data, arg)`` and its duration in ms (lives here, so a pool unpickles it cheaply)."""
    t = time.perf_counter()
    out = fn(data, arg)
    return out, (time.perf_counter() - t) * 1000


def warm_pid(data: bytes, spec: str) -> int:
    """A warm-up task: run one image, hold the process briefly so the next goes elsewhere."""
    timed(imgpipe_one, data, spec)
    time.sleep(0.2)
    return os.getpid()


def single_thread_init() -> None:
    """Pool initializer: one compute thread per process, as when one process runs per core,
    and the heap settings every imgpipe service runs with (``tune_malloc``): a mode
    measured without them lost 10-15 % on the 4K chain here to page faults, and the
    comparison is of how the work is spread, not of glibc's defaults."""
    import cv2

    import imgpipe.filters  # noqa: F401  (import cost paid before any timing)
    from imgpipe.core.runtime import tune_malloc

    tune_malloc()
    cv2.setNumThreads(1)



def limit_child(conn: Connection, spec: str, share: list[bytes]) -> None:
    """One process of the limit: its images preloaded, runs each pass on 'go'."""
    single_thread_init()
    imgpipe_one(share[0], spec)
    conn.send("ready")
    while conn.recv() == "go":
        t0 = time.monotonic()
        lat, outs = [], []
        for data in share:
            t = time.perf_counter()
            outs.append(imgpipe_one(data, spec))
            lat.append((time.perf_counter() - t) * 1000)
        t1 = time.monotonic()
        conn.send((t0, t1, lat, [out_size(o) for o in outs]))


def out_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the output's header, None when it is not an image."""
    from imgpipe.filters import codec

    try:
        info = codec.probe(data)
    except Exception:  # noqa: BLE001 - a broken output is reported, not raised
        return None
    return (info.width, info.height)


# --- the naive baseline -------------------------------------------------------------


class NaiveUnsupported(ValueError):
    """The chain uses a filter the naive baseline has no Pillow version of."""


@dataclass(frozen=True)
class NaiveStep:
    name: str
    params: tuple[tuple[str, str], ...]

    def get(self, key: str, default: float) -> float:
        return float(dict(self.params).get(key, default))


def naive_plan(spec: str) -> tuple[NaiveStep, ...]:
    """The steps of ``spec`` as the naive script runs them: effects first, resize last."""
    steps = []
    for part in spec.split("|"):
        name, _, args = part.strip().partition(":")
        pairs = tuple(tuple(kv.split("=", 1)) for kv in args.split(",") if "=" in kv)
        step = NaiveStep(name.strip(), pairs)  # type: ignore[arg-type]
        if step.name not in _NAIVE:
            raise NaiveUnsupported(f"the naive baseline has no Pillow version of {step.name!r}")
        steps.append(step)
    return tuple(sorted(steps, key=lambda s: {"resize": 1, "encode": 2}.get(s.name, 0)))


def naive(data: bytes, plan: tuple[NaiveStep, ...]) -> bytes:
    """The beginner's Pillow script over one image's bytes."""
    src = Image.open(io.BytesIO(data))
    fmt = src.format or "JPEG"
    img: Image.Image = src.convert("RGB")
    quality = 85
    for step in plan:
        if step.name == "encode":
            fmt = dict(step.params).get("format", fmt).upper()
            quality = int(step.get("quality", quality))
        else:
            img = _NAIVE[step.name](img, step)
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if fmt in ("JPG", "JPEG") else fmt, quality=quality)
    return buf.getvalue()


def _resize(img: Image.Image, s: NaiveStep) -> Image.Image:
    w0, h0 = img.size
    w, h = int(s.get("w", 0)), int(s.get("h", 0))
    fit = dict(s.params).get("fit", "contain")
    lanczos = Image.Resampling.LANCZOS
    if w and h and fit == "contain":
        return ImageOps.contain(img, (w, h), lanczos)
    if w and h and fit == "cover":
        return ImageOps.fit(img, (w, h), lanczos)
    w = w or round(w0 * h / h0)
    h = h or round(h0 * w / w0)
    return img.resize((w, h), lanczos)


_NAIVE = {
    "resize": _resize,
    "blur": lambda img, s: img.filter(ImageFilter.GaussianBlur(s.get("radius", 2))),
    "sharpen": lambda img, s: img.filter(ImageFilter.UnsharpMask(
        radius=s.get("radius", 2), percent=int(100 * s.get("amount", 1)))),
    "brightness": lambda img, s: ImageEnhance.Brightness(img).enhance(s.get("factor", 1)),
    "contrast": lambda img, s: ImageEnhance.Contrast(img).enhance(s.get("factor", 1)),
    "saturation": lambda img, s: ImageEnhance.Color(img).enhance(s.get("factor", 1)),
    "grayscale": lambda img, s: ImageOps.grayscale(img).convert("RGB"),
    "invert": lambda img, s: ImageOps.invert(img),
    "encode": lambda img, s: img,
}
