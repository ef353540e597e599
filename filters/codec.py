"""Bytes to pixels and back, safely and by the fastest correct path.

Every decode first reads the header (Pillow's ``Image.open`` is lazy: it parses the
header and EXIF, no pixel data), checks the pixel count against the limit, and only
then decodes, so a decompression bomb costs a header parse. Pillow's own bomb check is
switched off because this one replaces it with the configured limit, and because its
``DecompressionBombWarning`` would otherwise escape as a warning. Pillow's WebP reader
is the exception that allocates its canvas on open, so a WebP's size is read from its
RIFF header and checked first.

CPU time in ms for a 3840×2160 photo-like frame on the reference machine (one thread,
best of 5; the 4K JPEG is 1.4 MB at quality 90):

==========================  ======  ======================================
step                        OpenCV  Pillow
==========================  ======  ======================================
header only (``probe``)             0.1
decode JPEG                 71      150 (to a numpy array)
decode JPEG at 1/2, 1/4     29, 18  35, 21 (``draft``)
decode JPEG at 1/8          16      19 (``draft``)
decode PNG                  155     224
decode WebP                 134     241
encode JPEG, quality 85     36      38
encode PNG, zlib level 1    ~600    ~800
encode WebP, quality 85     ~760    ~770
==========================  ======  ======================================

So JPEG, PNG and WebP decode through ``cv2.imdecode`` straight to RGB (or to B, G, R
for a chain that treats the channels alike, ``Chain.order_free``); OpenCV 5
refuses truncated JPEG, PNG and WebP data (it returns nothing instead of gray
filling), which is exactly the policy here. GIF and BMP (rare, small) go through
Pillow, as does the odd PNG OpenCV does not normalise (gray with a tRNS colour key).
JPEG can decode at 1/2, 1/4 or 1/8 scale in the DCT (``reduce``) when the chain starts
by shrinking at least that much (``Chain.reduce_factor``); the resized result is then
within 44-52 dB PSNR of full decode + resize on the frame above. EXIF orientation is
read from the header and applied here, the same way for every backend. Encoding is
``cv2.imencode`` (RGB swapped to BGR unless the frame already is), the faster of the
two everywhere; a JPEG is
written with a restart marker per MCU row, in bands on idle cores when asked
(``filters.bands``).

Outputs follow the image contract of ``filters.pixels``: 1 channel for gray sources,
3 for colour, 4 whenever the source has any transparency; 16-bit samples are scaled
to 8 bits and CMYK is converted to RGB.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image as PILImage
from PIL import ImageFile

from imgpipe.core.errors import ImageError, ImageTooLarge, ImgpipeError
from imgpipe.filters import bands
from imgpipe.filters.formats import AUTO, OUTPUT_FORMATS, sniff
from imgpipe.filters.params import Params, param
from imgpipe.filters.pixels import Image, as_image, check_image
from imgpipe.filters.registry import register

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "EncodeParams",
    "ImageInfo",
    "check_pixels",
    "decode",
    "encode",
    "probe",
]

PILImage.MAX_IMAGE_PIXELS = None  # replaced by check_pixels() with the configured limit

DEFAULT_MAX_PIXELS = 50_000_000
"""50 megapixels, imgproxy's default."""
DEFAULT_QUALITY = 85
PNG_COMPRESSION = 1
"""zlib level for PNG output: level 3 takes 1.1-1.5× as long for files 2-4% smaller."""
WEBP_MAX_SIDE = 16383
AVIF_SPEED = 8
"""libavif speed (0 slowest … 10): imgproxy's default; Pillow's own (6) takes ~3.7× as long
on a 1920×1080 photo for a file ~5% smaller."""

_PIL_NAMES = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP"}
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_GRAY_MODES = frozenset({"1", "L", "I", "I;16", "I;16B", "I;16L", "I;16N"})
_REDUCE_FLAGS = {
    2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
    4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
    8: cv2.IMREAD_REDUCED_GRAYSCALE_8,
}


@dataclass(frozen=True)
class ImageInfo:
    """What the header says: format, oriented size in px, EXIF orientation, decoded channels."""

    format: str
    width: int
    height: int
    orientation: int = 1
    channels: int = 3

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _webp_size(head: bytes) -> tuple[int, int] | None:
    """Canvas size from a WebP's first chunk (VP8X, VP8L or VP8), or ``None``."""
    kind = head[12:16]
    if kind == b"VP8X" and len(head) >= 30:
        return 1 + int.from_bytes(head[24:27], "little"), 1 + int.from_bytes(head[27:30], "little")
    if kind == b"VP8L" and len(head) >= 25 and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if kind == b"VP8 " and len(head) >= 30 and head[23:26] == b"\x9d\x01\x2a":
        return (
            int.from_bytes(head[26:28], "little") & 0x3FFF,
            int.from_bytes(head[28:30], "little") & 0x3FFF,
        )
    return None


def _open(
    data: bytes | memoryview, max_pixels: int | None = None
) -> tuple[PILImage.Image, ImageInfo]:
    fmt = sniff(data)
    if fmt == "webp":
        # Pillow's WebP reader allocates the whole canvas when it opens the file.
        size = _webp_size(bytes(data[:30]))
        if size is None:
            raise ImageError("corrupt WEBP header", field="image")
        if max_pixels is not None:
            check_pixels(ImageInfo(fmt, *size), max_pixels)
    try:
        im = PILImage.open(io.BytesIO(data), formats=[_PIL_NAMES[fmt]])
        width, height = im.size
        orientation = _orientation(im)
        alpha = im.mode in _ALPHA_MODES or "transparency" in im.info
    except ImgpipeError:
        raise
    except Exception as exc:  # any parser failure on untrusted bytes means "not an image"
        raise ImageError(f"corrupt {fmt.upper()} header: {exc}", field="image") from exc
    if width < 1 or height < 1:
        raise ImageError(f"{fmt.upper()} header claims an empty image", field="image")
    if orientation >= 5:
        width, height = height, width
    channels = 4 if alpha else 1 if im.mode in _GRAY_MODES else 3
    return im, ImageInfo(fmt, width, height, orientation, channels)


def _orientation(im: PILImage.Image) -> int:
    """EXIF orientation from the header's EXIF block (``getexif()`` would decode a PNG)."""
    raw = im.info.get("exif")
    if not raw:
        return 1
    try:
        exif = PILImage.Exif()
        exif.load(raw)
        value = exif.get(0x0112, 1)
    except Exception:  # a broken EXIF block must not cost the image: assume upright
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def probe(data: bytes | memoryview, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Format and oriented size from the header only, without decoding pixels.

    ``max_pixels`` guards the one reader that allocates on open (WebP); the caller
    still calls ``check_pixels`` with the limit it enforces.
    """
    return _open(data, max_pixels)[1]


def check_pixels(info: ImageInfo, max_pixels: int) -> None:
    """Raise ``ImageTooLarge`` when the header claims more than ``max_pixels``."""
    if info.pixels > max_pixels:
        raise ImageTooLarge(
            f"the image is {info.width}×{info.height} = {info.pixels / 1e6:.1f} megapixels; "
            f"the limit is {max_pixels / 1e6:g}",
            field="image",
        )


def decode(
    data: bytes | memoryview, *, max_pixels: int = DEFAULT_MAX_PIXELS, reduce: int = 1,
    bgr: bool = False,
) -> Image:
    """Pixels of an accepted image, oriented upright.

    ``reduce`` (1, 2, 4 or 8) asks JPEG to decode at that fraction of its size
    (rounded up); other formats ignore it and decode at full size. ``bgr``: see
    :func:`decode_reduced`.
    """
    if reduce not in (1, 2, 4, 8):
        raise ValueError(f"reduce must be 1, 2, 4 or 8, got {reduce}")
    return decode_reduced(data, lambda _w, _h: reduce, max_pixels=max_pixels, bgr=bgr)[0]


def decode_reduced(
    data: bytes | memoryview, reduce_for: Callable[[int, int], int], *,
    max_pixels: int = DEFAULT_MAX_PIXELS, bgr: bool = False,
) -> tuple[Image, ImageInfo]:
    """Pixels and header of an accepted image, reading the header once: the pixel limit
    is checked, then ``reduce_for(width, height)`` (oriented size) picks the reduction
    :func:`decode` takes as ``reduce``.

    With ``bgr`` a colour frame without alpha comes in B, G, R order, OpenCV's own (for
    a chain that treats the channels alike, encoded with ``encode(..., bgr=True)``: no
    swap at either end); gray and RGBA frames are the same either way."""
    im, info = _open(data, max_pixels)
    check_pixels(info, max_pixels)
    reduce = reduce_for(info.width, info.height)
    if reduce not in (1, 2, 4, 8):
        raise ValueError(f"reduce must be 1, 2, 4 or 8, got {reduce}")
    # OpenCV ignores a gray PNG's transparent colour key; Pillow applies it.
    if info.format in ("jpeg", "png", "webp") and not (
        im.mode in _GRAY_MODES and "transparency" in im.info
    ):
        img = _decode_cv(data, info, reduce if info.format == "jpeg" else 1, bgr=bgr)
    else:
        img = _decode_pil(im, info)
        if bgr and img.shape[2] == 3:
            img = as_image(cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return _orient(img, info.orientation), info


def _decode_cv(data: bytes | memoryview, info: ImageInfo, reduce: int, *,
               bgr: bool = False) -> Image:
    flags = cv2.IMREAD_IGNORE_ORIENTATION
    if info.channels == 4:
        flags = cv2.IMREAD_UNCHANGED  # the only mode that keeps alpha; ignores EXIF too
    elif info.channels == 1:
        flags |= cv2.IMREAD_GRAYSCALE
    else:
        flags |= cv2.IMREAD_COLOR_BGR if bgr else cv2.IMREAD_COLOR_RGB
    if reduce > 1:
        flags |= _REDUCE_FLAGS[reduce]
    try:
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as exc:
        raise ImageError(f"corrupt {info.format.upper()} data: {exc}", field="image") from exc
    if arr is None:
        raise ImageError(f"corrupt or truncated {info.format.upper()} data", field="image")
    if arr.dtype == np.uint16:
        arr = np.right_shift(arr, 8).astype(np.uint8)
    if info.channels == 4:
        arr = _unchanged_to_rgba(arr)
    img = as_image(arr)
    stored = (info.height, info.width) if info.orientation < 5 else (info.width, info.height)
    expected = (-(-stored[0] // reduce), -(-stored[1] // reduce))
    if img.shape[:2] != expected:
        raise ImageError(f"{info.format.upper()} data does not match its header", field="image")
    return img


def _unchanged_to_rgba(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        return cv2.cvtColor(arr, cv2.COLOR_GRAY2RGBA)
    if arr.shape[2] == 3:
        return cv2.cvtColor(arr, cv2.COLOR_BGR2RGBA)
    return cv2.cvtColor(arr, cv2.COLOR_BGRA2RGBA)


def _decode_pil(im: PILImage.Image, info: ImageInfo) -> Image:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES must stay False")
    try:
        im.seek(0)
        im.load()
        if info.channels == 4:
            arr = np.array(im.convert("RGBA"))
        elif info.channels == 1 and im.mode.startswith("I"):
            arr = (np.array(im).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
        elif info.channels == 1:
            arr = np.array(im.convert("L"))
        else:
            arr = np.array(im.convert("RGB"))
    except Exception as exc:  # truncated or corrupt data: refuse, never fill in
        raise ImageError(
            f"corrupt or truncated {info.format.upper()} data: {exc}", field="image"
        ) from exc
    return as_image(arr)


def _orient(img: Image, orientation: int) -> Image:
    """Apply EXIF orientation 2..8 (as Pillow's ``ImageOps.exif_transpose``)."""
    if orientation == 2:
        return as_image(cv2.flip(img, 1))
    if orientation == 3:
        return as_image(cv2.rotate(img, cv2.ROTATE_180))
    if orientation == 4:
        return as_image(cv2.flip(img, 0))
    if orientation == 5:
        return as_image(cv2.transpose(img))
    if orientation == 6:
        return as_image(cv2.rotate(img, cv2.ROTATE_90_CLOCKWISE))
    if orientation == 7:
        return as_image(cv2.rotate(cv2.transpose(img), cv2.ROTATE_180))
    if orientation == 8:
        return as_image(cv2.rotate(img, cv2.ROTATE_90_COUNTERCLOCKWISE))
    return img


def encode(img: Image, fmt: str, quality: int = DEFAULT_QUALITY, *, threads: int = 1,
           bgr: bool = False) -> bytes:
    """Encode to ``jpeg``, ``png``, ``webp`` or ``avif``.

    ``quality`` (1..100) applies to JPEG, WebP and AVIF; PNG is lossless. JPEG has no alpha,
    so RGBA is composited on white first (transparent areas come out white). A JPEG is
    written in bands on up to ``threads`` threads, the same bytes as on one
    (``filters.bands``). With ``bgr`` a three-channel ``img`` is in B, G, R order (as
    ``decode(..., bgr=True)`` gives it): OpenCV's writers take it as it is, the same
    bytes as for the R, G, B frame.
    """
    check_image(img)
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"cannot encode to {fmt!r}; one of {', '.join(OUTPUT_FORMATS)}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be 1..100, got {quality}")
    height, width = img.shape[:2]
    if fmt == "webp" and max(width, height) > WEBP_MAX_SIDE:
        raise ImageError(
            f"WebP holds at most {WEBP_MAX_SIDE} px a side; the image is {width}×{height}",
            field="ops",
        )
    bgr = bgr and img.shape[2] == 3  # gray and RGBA frames have one order only
    if fmt == "avif":
        if bgr:
            img = as_image(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
        return _encode_avif(img, quality)
    if fmt == "jpeg":
        try:
            return bands.encode_jpeg(_flatten_on_white(img), quality, threads=threads,
                                     bgr=bgr)
        except ValueError as exc:
            raise ImageError(f"could not encode a {width}×{height} image as jpeg: {exc}",
                             field="ops") from exc
    if fmt == "webp":
        params = [cv2.IMWRITE_WEBP_QUALITY, quality]
    else:
        params = [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION]
    channels = img.shape[2]
    if channels == 3:
        if not bgr:
            img = as_image(cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    elif channels == 4:
        img = as_image(cv2.cvtColor(img, cv2.COLOR_RGBA2BGRA))
    elif fmt == "webp":  # libwebp has no gray input
        img = as_image(cv2.cvtColor(img, cv2.COLOR_GRAY2BGR))
    ok, buf = cv2.imencode("." + fmt, img, params)
    if not ok:
        raise ImageError(f"could not encode a {width}×{height} image as {fmt}", field="ops")
    return buf.tobytes()


def _encode_avif(img: Image, quality: int) -> bytes:
    """AVIF through Pillow (OpenCV has no AVIF writer), one thread as every other step."""
    if img.shape[2] == 1:
        im = PILImage.fromarray(img[:, :, 0]).convert("RGB")
    else:
        im = PILImage.fromarray(img, "RGBA" if img.shape[2] == 4 else "RGB")
    out = io.BytesIO()
    try:
        im.save(out, "AVIF", quality=quality, speed=AVIF_SPEED, max_threads=1)
    except (OSError, ValueError) as exc:
        height, width = img.shape[:2]
        raise ImageError(
            f"could not encode a {width}×{height} image as avif: {exc}", field="ops"
        ) from exc
    return out.getvalue()


def _flatten_on_white(img: Image) -> Image:
    if img.shape[2] != 4:
        return img
    rgb = img[:, :, :3].astype(np.uint16)
    a = img[:, :, 3:].astype(np.uint16)
    out = (rgb * a + 255 * (255 - a) + 127) // 255
    return as_image(out.astype(np.uint8))


@dataclass(frozen=True)
class EncodeParams(Params):
    format: str | None = param(
        None,
        kind=str,
        choices=(*OUTPUT_FORMATS, AUTO),
        doc="output format; default: the input's; auto = avif or webp when the request's "
        "Accept header names them, else the input's",
    )
    quality: int = param(DEFAULT_QUALITY, lo=1, hi=100, doc="JPEG, WebP and AVIF quality")


@register("encode", params=EncodeParams, heavy_when=lambda p: p.format == "avif")
def encode_step(img: Image, p: EncodeParams) -> Image:
    """Output format and quality; must be the last step, applied by the codec after the chain.

    Without format the output keeps the input's format (GIF and BMP become PNG); auto is
    resolved by the gateway from the submitting request's Accept header.
    JPEG output composites transparency on white; PNG ignores quality. AVIF is heavy
    (about 25× a JPEG encode).
    """
    return img
