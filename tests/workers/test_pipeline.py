"""process_task without sockets: same bytes as the library in-process, clear failures."""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import pytest
from PIL import Image

from imgpipe.core.protocol import Task
from imgpipe.filters import decode
from imgpipe.workers.pipeline import Options, process_task
from imgpipe.workers.pool import FilterPool
from imgpipe.workers.shm import BufferSet
from tests.images import detail_png, jpeg, picture, png, reference

OPTS = Options(worker="test-1", max_pixels=50_000_000)


def task(data: bytes, ops: str, **kw: Any) -> Task:
    return Task(task_id="t1", job_id="j1", n=0, ops=ops, payload=memoryview(data), **kw)


def gif(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(picture(width, height)).save(out, format="GIF")
    return out.getvalue()


def rgba_png(width: int, height: int) -> bytes:
    rgb = picture(width, height)
    alpha = np.linspace(0, 255, width * height, dtype=np.uint8).reshape(height, width, 1)
    out = io.BytesIO()
    Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA").save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize(("data", "ops", "fmt"), [
    (jpeg(1280, 720), "resize:w=320|blur:radius=2|brightness:factor=1.1", "jpeg"),
    (jpeg(640, 480, seed=3), "rotate:deg=30,expand=true|sharpen", "jpeg"),
    (png(300, 200), "grayscale|encode:format=webp,quality=70", "webp"),
    (gif(120, 90), "flip", "png"),
    (jpeg(640, 360), "resize:w=1600|encode:format=png", "png"),
    # chains that treat the channels alike run on B, G, R frames: same bytes
    (jpeg(800, 600, seed=5), "pixelate:size=4|invert|encode:format=webp", "webp"),
    (rgba_png(300, 280), "flip|encode:format=jpeg", "jpeg"),
])
def test_results_are_byte_identical_to_the_library_in_process(
        pool: FilterPool, buffers: BufferSet, data: bytes, ops: str, fmt: str) -> None:
    queued = time.time() - 0.25
    result = process_task(task(data, ops, attempt=2, queued_at=queued), pool, buffers, OPTS)
    assert result.ok, result.error
    assert bytes(result.payload) == reference(data, ops)
    assert (result.task_id, result.job_id, result.n, result.attempt, result.worker) == \
        ("t1", "j1", 0, 2, "test-1")
    assert result.format == fmt and result.content_type == f"image/{fmt}"
    out = decode(bytes(result.payload))
    assert (result.height, result.width) == out.shape[:2]
    assert set(result.timings) == {"queue", "decode", "filters", "encode", "total"}
    assert all(v >= 0 for v in result.timings.values())
    assert result.timings["queue"] >= 250


def test_avif_output_after_a_smart_cover_resize(pool: FilterPool, buffers: BufferSet) -> None:
    data = jpeg(640, 360, seed=5)
    ops = "resize:w=160,h=160,fit=cover,gravity=smart|encode:format=avif,quality=60"
    result = process_task(task(data, ops), pool, buffers, OPTS)
    assert result.ok, result.error
    assert result.format == "avif" and result.content_type == "image/avif"
    with Image.open(io.BytesIO(bytes(result.payload))) as out:
        assert out.format == "AVIF" and out.size == (160, 160)


@pytest.mark.parametrize(("flat", "ops", "gravity"), [
    (False, "crop:w=200,h=150,gravity=smart", "smart"),
    (True, "crop:w=200,h=150,gravity=smart", "center"),
    (False, "resize:w=96,h=96,fit=cover,gravity=smart|encode:format=webp", "smart"),
    (True, "resize:w=96,h=96,fit=cover,gravity=smart|encode:format=webp", "center"),
    (False, "crop:w=200,h=150,gravity=smart|brightness:factor=0|crop:w=20,h=20,gravity=smart",
     "center"),  # one smart step fell back: the output says center
    (False, "crop:w=200,h=150,gravity=northwest|grayscale", None),
])
def test_the_result_says_where_smart_gravity_put_the_window(
        pool: FilterPool, buffers: BufferSet, flat: bool, ops: str, gravity: str | None) -> None:
    data = detail_png(640, 360, flat=flat)
    result = process_task(task(data, ops), pool, buffers, OPTS)
    assert result.ok, result.error
    assert result.gravity == gravity
    assert bytes(result.payload) == reference(data, ops)


def test_a_corrupt_image_is_a_final_error(pool: FilterPool, buffers: BufferSet) -> None:
    data = jpeg(640, 480)
    result = process_task(task(data[: len(data) // 2], "blur"), pool, buffers, OPTS)
    assert not result.ok and not result.retry
    assert "truncated" in result.error and "JPEG" in result.error
    garbage = process_task(task(b"not an image at all", "blur"), pool, buffers, OPTS)
    assert not garbage.ok and not garbage.retry and garbage.error.startswith("cannot decode")


def test_bad_ops_and_pixel_limits_are_final_errors(pool: FilterPool, buffers: BufferSet) -> None:
    bad = process_task(task(jpeg(64, 48), "frobnicate"), pool, buffers, OPTS)
    assert not bad.ok and not bad.retry and "unknown filter" in bad.error
    small = Options(worker="w", max_pixels=100_000)
    big = process_task(task(jpeg(640, 480), "blur"), pool, buffers, small)
    assert not big.ok and not big.retry and "megapixels" in big.error
    grown = process_task(task(jpeg(200, 200), "resize:w=2000"), pool, buffers, small)
    assert not grown.ok and not grown.retry and "resize" in grown.error


@pytest.mark.slow
@pytest.mark.usefixtures("test_filters")
def test_a_crash_is_retryable_and_the_next_task_runs(pool: FilterPool, buffers: BufferSet
                                                     ) -> None:
    data = jpeg(200, 150)
    crashed = process_task(task(data, "blur|crash"), pool, buffers, OPTS)
    assert not crashed.ok and crashed.retry
    assert "filter process died" in crashed.error
    after = process_task(task(data, "invert"), pool, buffers, OPTS)
    assert after.ok and bytes(after.payload) == reference(data, "invert")


@pytest.mark.slow
@pytest.mark.usefixtures("test_filters")
def test_a_task_past_its_deadline_is_retryable(pool: FilterPool, buffers: BufferSet) -> None:
    late = process_task(task(jpeg(200, 150), "sleep:ms=600000", deadline=time.time() + 0.8),
                        pool, buffers, OPTS)
    assert not late.ok and late.retry and "deadline" in late.error


def test_frames_stay_in_the_slot_buffers(pool: FilterPool, buffers: BufferSet) -> None:
    data = jpeg(800, 600)
    for _ in range(3):
        assert process_task(task(data, "blur"), pool, buffers, OPTS).ok
    assert len(buffers.names) == 1  # one slot used, its segment reused each time
    assert buffers.total_bytes >= 800 * 600 * 3


def test_reference_matches_numpy_roundtrip() -> None:
    # Guard for the helper itself: an identity chain re-encodes the decoded pixels.
    data = png(32, 16)
    assert np.array_equal(decode(reference(data, "flip|flip")), decode(data))


def test_the_delay_hook_holds_the_slot(pool: FilterPool, buffers: BufferSet) -> None:
    slow = Options(worker="w", max_pixels=50_000_000, delay_ms=300)
    result = process_task(task(jpeg(64, 48), "invert"), pool, buffers, slow)
    assert result.ok and result.timings["total"] >= 300


@pytest.mark.parametrize(("idle", "sent", "bands"), [(True, 2, 2), (False, 0, 1)])
def test_a_lone_task_on_an_idle_host_asks_for_more_threads(
        pool: FilterPool, buffers: BufferSet, monkeypatch: pytest.MonkeyPatch,
        idle: bool, sent: int, bands: int) -> None:
    """The pool's threads for the filters, the encoder's bands for the JPEG."""
    import imgpipe.workers.pipeline as pipeline
    from imgpipe.filters import codec

    asked: list[int] = []
    encoded: list[int] = []
    run, encode = pool.run, codec.encode

    def spy(*args: Any, **kw: Any) -> Any:
        asked.append(kw["threads"])
        return run(*args, **kw)

    def spy_encode(*args: Any, **kw: Any) -> bytes:
        encoded.append(kw["threads"])
        return encode(*args, **kw)

    monkeypatch.setattr(pipeline, "host_idle", lambda: idle)
    monkeypatch.setattr(pool, "run", spy)
    monkeypatch.setattr(codec, "encode", spy_encode)  # the chain's encode_output calls it
    data, ops = jpeg(640, 400, seed=4), "blur:radius=2|brightness:factor=1.1"
    lending = Options(worker="test-1", max_pixels=50_000_000, idle_threads=2)
    result = process_task(task(data, ops), pool, buffers, lending)
    assert result.ok, result.error
    assert bytes(result.payload) == reference(data, ops)  # the same bytes either way
    never = process_task(task(data, ops), pool, buffers, OPTS)  # idle_threads=1: never
    assert bytes(never.payload) == bytes(result.payload)
    assert asked == [sent, 0]
    assert encoded == [bands, 1]

