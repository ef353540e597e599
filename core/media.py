"""Image formats by name: which ones exist, their file extension and MIME type.

One table for everything that handles formats by name: the job store names files with
it, the sink sets an output's content type from it (never from what a result claims),
and the filter library recognises, decodes and encodes the formats it lists.
"""

from __future__ import annotations

INPUT_FORMATS = ("jpeg", "png", "webp", "gif", "bmp")
OUTPUT_FORMATS = ("jpeg", "png", "webp", "avif")

CONTENT_TYPES = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
    "bmp": "image/bmp",
    "avif": "image/avif",
}
EXTENSIONS = {
    "jpeg": "jpg",
    "png": "png",
    "webp": "webp",
    "gif": "gif",
    "bmp": "bmp",
    "avif": "avif",
}


def content_type(fmt: str) -> str:
    """The MIME type of a format name (``jpeg`` → ``image/jpeg``)."""
    try:
        return CONTENT_TYPES[fmt]
    except KeyError:
        raise ValueError(f"unknown format {fmt!r}") from None


def ext(fmt: str) -> str:
    """The usual file extension of a format, without the dot (``jpeg`` → ``jpg``)."""
    try:
        return EXTENSIONS[fmt]
    except KeyError:
        raise ValueError(f"unknown format {fmt!r}") from None
