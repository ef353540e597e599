"""Damaged and random bytes: the codec answers with an image or an ``ImageError``, nothing else."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgpipe.core.errors import ImageError
from imgpipe.filters import decode, probe
from tests.filters.images import photo, save, to_pil

SAMPLES = [save(to_pil(photo(12, 16)), fmt) for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP")]
MAGIC = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF\x00\x00\x00\x00WEBP", b"GIF89a", b"BM"]


def decode_or_refuse(data: bytes) -> None:
    try:
        img = decode(data, max_pixels=1_000_000)
    except ImageError:
        return
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] in (1, 3, 4)
    probe(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(SAMPLES),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(1, 10_000),
)
def test_damaged_files(sample: bytes, edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(sample)
    for position, value in edits:
        data[position % len(data)] = value
    decode_or_refuse(bytes(data[: max(1, len(data) - cut % len(data))]))


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(MAGIC), st.binary(max_size=300))
def test_random_bytes_after_a_magic_number(magic: bytes, tail: bytes) -> None:
    decode_or_refuse(magic + tail)
