"""The filter pool: frames cross by shared memory, deaths and deadlines hit one task only."""

from __future__ import annotations

import multiprocessing.connection
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from imgpipe.filters import apply_chain, decode, parse_chain
from imgpipe.workers.pool import DeadlineExceeded, FilterFailed, FilterPool, ProcessDied
from imgpipe.workers.shm import BufferSet, ShmFull
from tests.images import jpeg
from tests.support import wait_for

CHAIN = "resize:w=1920|blur:radius=2|brightness:factor=1.1"


def _load(buffers: BufferSet, img: np.ndarray) -> Any:
    buf = buffers.acquire()
    np.ndarray(img.shape, img.dtype, buffer=buf.ensure(img.nbytes))[...] = img
    return buf


def _result(buf: Any, out: Any) -> np.ndarray:
    return np.ndarray(out.shape, np.dtype(out.dtype), buffer=buf.shm.buf).copy()


@pytest.mark.slow
def test_a_4k_frame_crosses_to_the_pool_without_pickling(
        pool: FilterPool, buffers: BufferSet, monkeypatch: pytest.MonkeyPatch) -> None:
    img = decode(jpeg(3840, 2160, seed=1))
    assert img.nbytes == 3840 * 2160 * 3  # 25 MB
    buf = _load(buffers, img)

    def no_pickles(*_a: Any, **_k: Any) -> None:
        raise AssertionError("a pickled object crossed the filter pipe")

    # Any pickled send/receive on a pool pipe would fail the test.
    monkeypatch.setattr(multiprocessing.connection.Connection, "send", no_pickles)
    monkeypatch.setattr(multiprocessing.connection.Connection, "recv", no_pickles)
    before = pool.ipc_bytes
    out = pool.run(buf.name, img.shape, img.dtype.str, CHAIN)
    crossed = pool.ipc_bytes - before
    assert out.ipc_bytes == crossed
    assert crossed < 1024, f"{crossed} bytes crossed for a {img.nbytes}-byte frame"
    assert out.shape == (1080, 1920, 3)
    assert np.array_equal(_result(buf, out), apply_chain(img, parse_chain(CHAIN)))


@pytest.mark.parametrize("ops", [
    "blur:radius=2|brightness:factor=1.1",  # the last step writes into the segment
    "resize:w=200|blur:radius=1.5",  # so does a blur after a resize
    "brightness:factor=0.7",  # its input is the segment: it may not write there
    "resize:w=640",  # the input itself (no resize needed) comes back
    "resize:w=120|rotate:deg=90",  # a step that cannot write there: copied in
])
def test_the_result_in_the_segment_is_the_chain_applied_in_process(
        pool: FilterPool, buffers: BufferSet, ops: str) -> None:
    img = decode(jpeg(640, 400, seed=5))
    buf = _load(buffers, img)
    out = pool.run(buf.name, img.shape, img.dtype.str, ops)
    assert np.array_equal(_result(buf, out), apply_chain(img, parse_chain(ops)))


def test_a_result_larger_than_its_buffer_gets_a_bigger_segment(
        pool: FilterPool, buffers: BufferSet) -> None:
    img = decode(jpeg(320, 200, seed=2))
    buf = _load(buffers, img)
    small = buf.name
    ops = "resize:w=1280"
    out = pool.run(buf.name, img.shape, img.dtype.str, ops,
                   grow=lambda n: (buf.ensure(n), buf.name)[1])
    assert out.seg == buf.name != small
    assert np.array_equal(_result(buf, out), apply_chain(img, parse_chain(ops)))


@pytest.mark.slow
def test_no_room_for_a_larger_result_fails_that_task_and_keeps_the_process(
        tmpfs: Callable[[str], Path]) -> None:
    small = tmpfs("40m")
    pool = FilterPool(1, shm_dir=small)
    buffers = BufferSet(1, shm_dir=small)
    try:
        img = decode(jpeg(320, 200, seed=2))
        buf = _load(buffers, img)
        pids = pool.pids
        # 6000 x 3750 x 3 = 64 MB: the process asks for it, the worker has no room.
        with pytest.raises(ShmFull, match="no shared memory"):
            pool.run(buf.name, img.shape, img.dtype.str, "resize:w=6000",
                     grow=lambda n: (buf.ensure(n), buf.name)[1])
        assert pool.pids == pids and pool.restarts == 0 and buf.shm is None
        buffers.release(buf)
        buf = _load(buffers, img)  # the same process serves the next task
        out = pool.run(buf.name, img.shape, img.dtype.str, "invert")
        assert np.array_equal(_result(buf, out), apply_chain(img, parse_chain("invert")))
    finally:
        pool.close()
        buffers.close()
    assert os.listdir(small) == []


def test_a_filter_that_raises_is_a_final_failure(pool: FilterPool, buffers: BufferSet) -> None:
    img = decode(jpeg(200, 100))
    buf = _load(buffers, img)
    pids = pool.pids
    with pytest.raises(FilterFailed, match="megapixels"):
        pool.run(buf.name, img.shape, img.dtype.str, "resize:w=4000", max_pixels=1_000_000)
    assert pool.pids == pids  # the process is fine and kept


@pytest.mark.slow
def test_a_dying_process_fails_its_task_only_and_is_replaced(
        pool: FilterPool, buffers: BufferSet) -> None:
    img = decode(jpeg(160, 120))
    buf = _load(buffers, img)
    (old,) = pool.pids
    restarts = pool.restarts
    with pytest.raises(ProcessDied, match="SIGKILL"):
        pool.run(buf.name, img.shape, img.dtype.str, "crash")
    assert pool.restarts == restarts + 1
    (new,) = pool.pids
    assert new != old and not psutil.pid_exists(old)
    out = pool.run(buf.name, img.shape, img.dtype.str, "invert")
    assert np.array_equal(_result(buf, out), 255 - img)


@pytest.mark.slow
@pytest.mark.timeout(40)
def test_a_filter_past_its_deadline_is_stopped(pool: FilterPool, buffers: BufferSet) -> None:
    img = decode(jpeg(160, 120))
    buf = _load(buffers, img)
    (old,) = pool.pids
    # Sleeps 10 min: only stopping the process can end this within the test timeout.
    with pytest.raises(DeadlineExceeded, match="deadline"):
        pool.run(buf.name, img.shape, img.dtype.str, "sleep:ms=600000",
                 deadline=time.time() + 1.0)
    wait_for(lambda: not psutil.pid_exists(old), 5, what="the late process gone")
    out = pool.run(buf.name, img.shape, img.dtype.str, "flip")
    assert out.shape == img.shape


def test_close_stops_every_process() -> None:
    p = FilterPool(2)
    pids = p.pids
    assert len(pids) == 2 and all(psutil.pid_exists(pid) for pid in pids)
    p.close()
    wait_for(lambda: not any(psutil.pid_exists(pid) for pid in pids), 5,
             what="pool processes gone")


def test_a_task_may_ask_for_more_opencv_threads_and_the_next_goes_back_to_one(
        pool: FilterPool, buffers: BufferSet) -> None:
    img = decode(jpeg(640, 400, seed=6))
    buf = _load(buffers, img)
    ops = "blur:radius=2|brightness:factor=1.1"
    want = apply_chain(img, parse_chain(ops))
    for threads, ran_on in ((2, 2), (0, 1), (3, 3), (-4, 1), (10_000, 256)):
        np.ndarray(img.shape, img.dtype, buffer=buf.shm.buf)[...] = img
        out = pool.run(buf.name, img.shape, img.dtype.str, ops, threads=threads)
        assert out.threads == ran_on
        assert np.array_equal(_result(buf, out), want)  # the same pixels on any count
