"""Shared-memory frame buffers: naming, reuse, growth, cleanup, sweep, and a full shm."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import pytest

from imgpipe.core.config import Settings
from imgpipe.core.errors import ConfigError, ImgpipeError
from imgpipe.workers import shm
from imgpipe.workers.shm import (
    MB,
    SHM_DIR,
    BufferSet,
    ShmFull,
    attach,
    free_bytes,
    leftovers,
    plan_slots,
    slot_bytes,
    sweep,
)

FAKE_PID = 4_000_000 + os.getpid() % 100_000  # above pid_max: never a live process


@pytest.fixture
def buffers() -> Iterator[BufferSet]:
    bs = BufferSet(2)
    yield bs
    bs.close()


def test_segments_are_named_by_pid_and_reused_until_a_bigger_frame(buffers: BufferSet) -> None:
    buf = buffers.acquire()
    buf.ensure(1000)
    first = buf.name
    assert first.startswith(f"imgpipe-{os.getpid()}-") and first.split("-")[2].isdigit()
    assert (SHM_DIR / first).exists()
    buf.ensure(500)  # smaller: same segment, no new pages
    assert buf.name == first and buffers.created == 1
    buf.ensure(5 << 20)  # bigger: replaced, the old name is gone
    assert buf.name != first and buf.size >= 5 << 20
    assert not (SHM_DIR / first).exists()
    assert buffers.names == [buf.name]
    buffers.release(buf)
    assert buffers.acquire(timeout=1) is not None


def test_close_unlinks_everything_and_refuses_new_segments() -> None:
    bs = BufferSet(3)
    held = [bs.acquire() for _ in range(3)]
    for i, buf in enumerate(held):
        buf.ensure((i + 1) << 20)
    assert len(leftovers(os.getpid())) >= 3
    bs.close()
    assert leftovers(os.getpid()) == []
    with pytest.raises(RuntimeError):
        held[0].ensure(10 << 20)
    bs.close()  # idempotent


def test_attach_sees_the_same_pixels(buffers: BufferSet) -> None:
    buf = buffers.acquire()
    frame = np.arange(64 * 48 * 3, dtype=np.uint8).reshape(48, 64, 3)
    np.ndarray(frame.shape, np.uint8, buffer=buf.ensure(frame.nbytes))[...] = frame
    mm = attach(buf.name)
    try:
        seen = np.ndarray(frame.shape, np.uint8, buffer=mm).copy()
    finally:
        mm.close()
    assert np.array_equal(seen, frame)


def _segment(name: str) -> None:
    shm = shared_memory.SharedMemory(name=name, create=True, size=4096)
    shm.close()
    # Left behind on purpose, as by a killed worker; untrack so the tracker keeps quiet.
    from multiprocessing import resource_tracker

    resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]


def test_sweep_removes_only_that_pids_segments() -> None:
    mine = [f"imgpipe-{FAKE_PID}-{k}" for k in range(3)]
    others = [f"imgpipe-{FAKE_PID}0-0", f"imgpipe-{FAKE_PID}-x"]
    for name in mine + others:
        _segment(name)
    try:
        assert sweep(FAKE_PID) == 3
        assert leftovers(FAKE_PID) == [f"imgpipe-{FAKE_PID}-x"]
        assert (SHM_DIR / others[0]).exists()
        assert sweep(FAKE_PID) == 0
    finally:
        for name in mine + others:
            (SHM_DIR / name).unlink(missing_ok=True)


# --- a full shm dir ----------------------------------------------------------------------

def test_a_segment_bigger_than_the_free_space_is_shm_full_not_sigbus(
        tmpfs: Callable[[str], Path]) -> None:
    small = tmpfs("40m")
    bs = BufferSet(1, shm_dir=small)
    try:
        buf = bs.acquire()
        # A 6000x4000 RGB photo: 72 MB. shm_open + ftruncate would accept this size and
        # the copy into it would SIGBUS this test process.
        with pytest.raises(ShmFull) as info:
            buf.ensure(6000 * 4000 * 3)
        exc = info.value
        assert isinstance(exc, ImgpipeError) and exc.field == "shm_dir"
        assert isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.ENOSPC
        assert str(small) in exc.detail and "69 MB frame" in exc.detail
        assert "shm_size" in exc.detail and "IMGPIPE_MAX_PIXELS" in exc.detail
        assert os.listdir(small) == [] and buf.shm is None  # nothing left behind
        assert free_bytes(small) == 40 * MB

        # What fits is reserved up front and can be written end to end.
        view = buf.ensure(30 * MB)
        np.ndarray((30 * MB,), np.uint8, buffer=view)[...] = 7
        assert free_bytes(small) == 10 * MB
        assert os.listdir(small) == [buf.name]
    finally:
        bs.close()
    assert os.listdir(small) == []


def test_a_replaced_segment_gives_its_memory_back_though_still_mapped(
        tmpfs: Callable[[str], Path]) -> None:
    """A filter process keeps old segments mapped; their pages must not count."""
    small = tmpfs("40m")
    bs = BufferSet(1, shm_dir=small)
    try:
        buf = bs.acquire()
        buf.ensure(20 * MB)
        held = attach(buf.name, small)  # as a filter process's mapping cache does
        try:
            buf.ensure(30 * MB)  # 20 + 30 > 40 if the old pages were still taken
            assert buf.size == 30 * MB and free_bytes(small) == 10 * MB
        finally:
            held.close()
        assert bs.names == [buf.name]
    finally:
        bs.close()


@pytest.mark.parametrize(("slots", "max_pixels", "free", "want"), [
    (2, 1_000_000, 64 * MB, (2, "")),              # 4 MB a slot: plenty
    (4, 8_000_000, 64 * MB, (2, "from 4 to 2")),   # 31 MB a slot: two fit
    (2, 8_000_000, 40 * MB, (1, "from 2 to 1")),
])
def test_slots_are_lowered_to_what_the_shm_dir_holds(
        monkeypatch: pytest.MonkeyPatch, slots: int, max_pixels: int, free: int,
        want: tuple[int, str]) -> None:
    monkeypatch.setattr(shm, "free_bytes", lambda _dir: free)
    settings = Settings(worker_slots=slots, max_pixels=max_pixels)
    got, note = plan_slots(settings)
    assert got == want[0] and (want[1] in note if want[1] else note == "")
    if note:
        assert "/dev/shm has" in note and f"IMGPIPE_MAX_PIXELS={max_pixels}" in note


def test_slot_bytes_is_one_rgba_frame_at_the_pixel_limit() -> None:
    assert slot_bytes(50_000_000) == 191 * MB  # 200 MB, in whole MiB
    assert slot_bytes(1) == MB  # segments come in whole MiB


def test_no_room_for_one_frame_refuses_to_start_saying_what_to_change(
        tmpfs: Callable[[str], Path]) -> None:
    small = tmpfs("40m")
    settings = Settings(shm_dir=small, worker_slots=2, max_pixels=8_000_000)
    assert plan_slots(settings)[0] == 1  # a real 40 MB tmpfs holds one 31 MB frame
    with pytest.raises(ConfigError) as info:
        plan_slots(Settings(shm_dir=small, worker_slots=2, max_pixels=50_000_000))
    detail = info.value.detail
    assert "no room for one frame" in detail and "40 MB free" in detail
    assert "IMGPIPE_MAX_PIXELS=50000000" in detail and "382 MB for 2 slot(s)" in detail
    assert "shm_size" in detail and info.value.field == "shm_dir"


def test_a_missing_shm_dir_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="IMGPIPE_SHM_DIR=.*tmpfs"):
        plan_slots(Settings(shm_dir=tmp_path / "nowhere"))
