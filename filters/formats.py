"""Image formats: recognised by their bytes, never by a name or a declared type.

Accepted inputs are JPEG, PNG, WebP, GIF (first frame) and BMP; outputs are JPEG,
PNG, WebP and AVIF. Formats people commonly try (TIFF, PDF, SVG, HEIC, AVIF, ICO) get a
message that names them.
"""

from __future__ import annotations

from imgpipe.core.errors import ImageError

# The names, extensions and MIME types live in core (the store and the sink use them
# too); this module re-exports them beside what it adds: recognising formats by bytes.
from imgpipe.core.media import CONTENT_TYPES
from imgpipe.core.media import INPUT_FORMATS as INPUT_FORMATS
from imgpipe.core.media import OUTPUT_FORMATS as OUTPUT_FORMATS
from imgpipe.core.media import content_type as content_type
from imgpipe.core.media import ext as ext

# Header sizes of the BMP variants (BITMAPCOREHEADER … BITMAPV5HEADER).
_BMP_DIB_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})

_REFUSED = (
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%PDF", "PDF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "PSD"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
)


def sniff(data: bytes | bytearray | memoryview) -> str:
    """The format of ``data`` from its first bytes; ``ImageError`` for anything not accepted."""
    head = bytes(data[:32])
    if not head:
        raise ImageError("the upload is empty (0 bytes)", field="image")
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if (
        head[:2] == b"BM"
        and len(head) >= 18
        and int.from_bytes(head[14:18], "little") in (_BMP_DIB_SIZES)
    ):
        return "bmp"
    raise ImageError(
        f"{_describe(head)} is not an accepted image format; {_ACCEPTED}", field="image"
    )


_ACCEPTED = "send JPEG, PNG, WebP, GIF or BMP"


def _describe(head: bytes) -> str:
    for magic, name in _REFUSED:
        if head.startswith(magic):
            return name
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        return (
            "AVIF"
            if brand.startswith(b"avi")
            else "HEIF/HEIC"
            if brand[:3] in (b"hei", b"hev", b"mif", b"msf")
            else "an ISO media file"
        )
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<svg", b"<?xml", b"<!doctype svg")):
        return "SVG/XML"
    if text.startswith((b"<!doctype html", b"<html")):
        return "HTML"
    if all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return "text"
    return "this data"


AUTO = "auto"
"""``encode:format=auto``: resolved by the gateway from the request's ``Accept``."""
NEGOTIATED = ("avif", "webp")
"""What ``auto`` picks, in order of preference, when ``Accept`` names it (as imgproxy)."""


def negotiate(accept: str | None) -> str | None:
    """What ``format=auto`` becomes for an ``Accept`` header: ``avif`` or ``webp`` when it
    names them (q > 0), else ``None`` (the input's format).

    Only explicit types count, as imgproxy: ``*/*`` and ``image/*`` are sent by clients
    that cannot necessarily show AVIF or WebP.
    """
    named: set[str] = set()
    for item in (accept or "").split(","):
        media, _, params = item.partition(";")
        if not _q_zero(params):
            named.add(media.strip().lower())
    for fmt in NEGOTIATED:
        if CONTENT_TYPES[fmt] in named:
            return fmt
    return None


def _q_zero(params: str) -> bool:
    for p in params.split(";"):
        key, _, value = p.strip().partition("=")
        if key.strip().lower() == "q":
            try:
                return float(value) <= 0
            except ValueError:
                return False
    return False


def output_format(input_format: str, requested: str | None = None) -> str:
    """The format to encode to: the requested one, else the input's (GIF and BMP → PNG).

    An unresolved ``auto`` (a chain that did not come through the gateway) is the input's.
    """
    if requested == AUTO:
        requested = None
    if requested is not None:
        if requested not in OUTPUT_FORMATS:
            raise ValueError(f"cannot encode to {requested!r}")
        return requested
    return input_format if input_format in OUTPUT_FORMATS else "png"
