"""A JPEG encoded in bands on several threads is the JPEG one encode writes."""

from __future__ import annotations

import os
import select
import signal
import struct

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgpipe.core.errors import ImageError
from imgpipe.filters import bands, codec
from tests.images import picture


def frame(width: int, height: int, channels: int, seed: int) -> np.ndarray:
    rgb = picture(width, height, seed)
    if channels == 1:
        return np.ascontiguousarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[:, :, None])
    return rgb


def whole(img: np.ndarray, quality: int) -> bytes:
    """OpenCV's one encode of the frame with a restart marker per MCU row."""
    channels = img.shape[2]
    bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if channels == 3 else img
    ok, buf = cv2.imencode(".jpg", bgr, [
        cv2.IMWRITE_JPEG_QUALITY, quality,
        cv2.IMWRITE_JPEG_RST_INTERVAL, bands.restart_interval(img.shape[1], channels)])
    assert ok
    return buf.tobytes()


def segments(jpeg: bytes) -> list[int]:
    """The markers of the header segments, up to and with SOS."""
    pos, found = 2, []
    while jpeg[pos + 1] != 0xDA:
        found.append(jpeg[pos + 1])
        pos += 2 + struct.unpack_from(">H", jpeg, pos + 2)[0]
    return [*found, 0xDA]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(width=st.integers(1, 300), height=st.integers(bands.MIN_ROWS, 700),
       channels=st.sampled_from([1, 3]), quality=st.integers(1, 100),
       threads=st.integers(2, 5), seed=st.integers(0, 1000))
def test_any_band_split_gives_the_bytes_of_one_encode(
        width: int, height: int, channels: int, quality: int, threads: int, seed: int) -> None:
    img = frame(width, height, channels, seed)
    one = bands.encode_jpeg(img, quality)
    assert one == whole(img, quality)
    assert bands.encode_jpeg(img, quality, threads=threads) == one


def test_the_restart_markers_change_no_pixel() -> None:
    img = frame(1920, 1080, 3, 5)
    banded = codec.encode(img, "jpeg", 85, threads=2)
    ok, plain = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                             [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    assert 0xDD in segments(banded) and 0xDD not in segments(plain.tobytes())
    got = cv2.imdecode(np.frombuffer(banded, np.uint8), cv2.IMREAD_COLOR)
    assert np.array_equal(got, cv2.imdecode(plain, cv2.IMREAD_COLOR))
    assert len(banded) < len(plain.tobytes()) * 1.01


def test_a_short_frame_is_one_plain_encode() -> None:
    img = frame(640, bands.MIN_ROWS - 1, 3, 2)
    out = codec.encode(img, "jpeg", 80, threads=4)
    assert 0xDD not in segments(out)  # no restart interval
    ok, plain = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                             [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok and out == plain.tobytes()


def test_transparency_is_flattened_before_the_bands() -> None:
    rgba = np.dstack([frame(320, 300, 3, 3), np.full((300, 320, 1), 128, np.uint8)])
    assert codec.encode(rgba, "jpeg", 90, threads=3) == codec.encode(rgba, "jpeg", 90)


def test_a_side_over_the_jpeg_limit_is_refused_as_an_image_error() -> None:
    img = np.zeros((bands.MIN_ROWS, bands.MAX_SIDE + 1, 3), np.uint8)
    with pytest.raises(ImageError, match="at most 65500 px"):
        codec.encode(img, "jpeg", 80, threads=2)


def test_stitching_refuses_what_is_not_a_baseline_jpeg() -> None:
    with pytest.raises(ValueError, match="baseline JPEG"):
        bands.stitch([b"\xff\xd8\xff\xd9", b"\xff\xd8\xff\xd9"], [0, 16, 32], 16)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_the_helpers_are_kept_off_the_callers_cpu() -> None:
    img = frame(800, 600, 3, 1)
    bands.encode_jpeg(img, 85, threads=2)
    helper = bands._helpers(1)[0]
    allowed = os.sched_getaffinity(helper.tid)
    assert allowed and allowed < os.sched_getaffinity(0)


def test_a_forked_child_encodes_in_bands_on_threads_of_its_own() -> None:
    img = frame(640, 512, 3, 6)
    expected = bands.encode_jpeg(img, 85, threads=2)  # the parent's helper is started
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            same = bands.encode_jpeg(img, 85, threads=2) == expected
            os.write(write, b"1" if same else b"0")
        finally:
            os._exit(0)
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], 60)
        answer = os.read(read, 1) if ready else b""
    finally:
        os.close(read)
        if not answer:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert answer == b"1", "the child's encode did not finish in 60 s" if not answer else ""
