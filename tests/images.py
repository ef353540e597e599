"""Test images every suite shares: photo-like pictures, encoded files, hostile PNGs.

All deterministic and built in memory; ``reference`` is the in-process result a
worker must reproduce byte for byte.
"""

from __future__ import annotations

import struct
import zlib
from functools import cache

import cv2
import numpy as np


def picture(width: int, height: int, seed: int = 0) -> np.ndarray:
    """An RGB image with gradients, shapes and mild noise (compresses like a photo)."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    img = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1)
    for _ in range(6):
        cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = max(1, int(min(width, height) * rng.uniform(0.05, 0.2)))
        colour = tuple(float(v) for v in rng.uniform(0, 255, 3))
        cv2.circle(img, (cx, cy), r, colour, -1)
    img += rng.standard_normal(img.shape, dtype=np.float32) * 6
    return np.clip(img, 0, 255).astype(np.uint8)


@cache
def jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    img = picture(width, height, seed)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


@cache
def png(width: int, height: int, seed: int = 0) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(picture(width, height, seed),
                                                cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def detail_png(width: int, height: int, *, flat: bool = False) -> bytes:
    """A plain gray PNG with a noisy square (a fifth of the height) near its top-right
    corner, the detail smart gravity finds; ``flat``: the plain gray alone."""
    img = np.full((height, width, 3), 180, np.uint8)
    if not flat:
        side = max(2, height // 5)
        x, y = width - 2 * side, side // 2
        img[y : y + side, x : x + side] = np.random.default_rng(7).integers(
            0, 256, (side, side, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC."""
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_file(width: int, height: int, idat: bytes, *, depth: int = 8, color: int = 2) -> bytes:
    """A PNG with the given IHDR and one IDAT chunk (valid or not, as the caller wants)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with a token IDAT: a header and no pixels."""
    return png_file(width, height, zlib.compress(b"\x00" * 64))


@cache
def png_bomb(side: int = 20000) -> bytes:
    """A real side x side 1-bit PNG of zeros: ~50 kB that decodes to side² pixels."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return png_file(side, side, body, depth=1, color=0)


def reference(data: bytes, ops: str) -> bytes:
    """decode -> apply_chain -> encode in this process, as a worker must do it."""
    from imgpipe.filters import apply_chain, decode, encode, output_format, parse_chain, probe

    chain = parse_chain(ops)
    info = probe(data)
    img = decode(data, reduce=chain.reduce_factor(info.width, info.height))
    enc = chain.encode
    fmt = output_format(info.format, enc.format if enc else None)
    out = apply_chain(img, chain)
    return encode(out, fmt, enc.quality) if enc else encode(out, fmt)
