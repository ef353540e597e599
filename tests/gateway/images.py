"""Test images and multipart bodies, good and hostile, built in memory."""

from __future__ import annotations

import io
import uuid
from collections.abc import Sequence

import numpy as np
from PIL import Image

from tests.images import png_bomb, png_header_only  # noqa: F401  (re-exported)


def jpeg(width: int = 64, height: int = 48, *, seed: int = 0, quality: int = 90) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, "JPEG", quality=quality)
    return out.getvalue()


def png(width: int = 32, height: int = 24) -> bytes:
    arr = np.zeros((height, width, 3), np.uint8)
    arr[..., 0] = np.arange(width, dtype=np.uint8)[None, :]
    out = io.BytesIO()
    Image.fromarray(arr).save(out, "PNG")
    return out.getvalue()


def smooth_jpeg(width: int, height: int, *, seed: int = 0) -> bytes:
    """A photo-like (compressible) JPEG of the given size, e.g. 4K."""
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([(x * 255 // width), (y * 255 // height),
                    np.full_like(x, (seed * 37) % 256)], axis=-1).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, "JPEG", quality=85)
    return out.getvalue()


SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
PDF = b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
TIFF = b"II*\x00\x08\x00\x00\x00" + b"\x00" * 64


def multipart(images: Sequence[bytes] = (), ops: Sequence[str | bytes] = (), *,
              extra: Sequence[tuple[str, bytes]] = (), image_type: str = "image/jpeg",
              boundary: str | None = None) -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data form."""
    b = boundary or uuid.uuid4().hex
    out = io.BytesIO()
    for i, data in enumerate(images):
        out.write(f'--{b}\r\nContent-Disposition: form-data; name="image"; '
                  f'filename="img{i}.jpg"\r\nContent-Type: {image_type}\r\n\r\n'.encode())
        out.write(data + b"\r\n")
    for spec in ops:
        raw = spec.encode() if isinstance(spec, str) else spec
        out.write(f'--{b}\r\nContent-Disposition: form-data; name="ops"\r\n\r\n'.encode())
        out.write(raw + b"\r\n")
    for name, data in extra:
        out.write(f'--{b}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        out.write(data + b"\r\n")
    out.write(f"--{b}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={b}"
