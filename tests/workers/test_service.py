"""A real ``imgpipe worker`` process against sockets this test binds (ventilator, sink, bus)."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq

from imgpipe.core.protocol import Event, Heartbeat, Task
from imgpipe.workers.shm import MB, leftovers, sweep
from tests.images import jpeg, reference
from tests.support import make_settings, wait_for
from tests.workers.rig import Rig


def task(tid: str, data: bytes, ops: str, **kw: Any) -> Task:
    return Task(task_id=tid, job_id="job1", n=int(tid[1:]), ops=ops, payload=data,
                queued_at=time.time(), **kw)


@pytest.fixture
def rig_factory(tmp_path: Path, zctx: zmq.Context[Any]) -> Iterator[Any]:
    rigs: list[Rig] = []

    def start(*args: str, **overrides: Any) -> Rig:
        s = make_settings(tmp_path / f"w{len(rigs)}", test_hooks=True,
                          heartbeat_interval_s=0.3, metrics_interval_s=0.3, **overrides)
        rig = Rig(s, zctx, *args, log=tmp_path / f"worker{len(rigs)}.log")
        rigs.append(rig)
        return rig

    yield start
    for rig in rigs:
        rig.close()


def pool_children(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_worker_processes_fails_retries_and_stops_cleanly(rig_factory: Any) -> None:
    rig = rig_factory("--worker-slots", "2", "--worker-processes", "1")
    pid = rig.proc.pid
    hb = rig.heartbeat()
    assert (hb.worker, hb.host, hb.pid) == (f"{socket.gethostname()}-{pid}",
                                            socket.gethostname(), pid)
    assert (hb.serves, hb.slots, hb.free, hb.state, hb.inflight) == ("all", 2, 2, "idle", [])
    assert hb.started > 0 and hb.rss > 0
    wid = hb.worker

    # Real JPEGs, one of them 4K decoded at full size (no leading resize, so no reduced
    # decode): byte-identical to the library run in this process.
    jobs = {"t1": (jpeg(3840, 2160, seed=1), "brightness:factor=1.1|resize:w=1920"), "t2": (jpeg(640, 480), "sharpen|invert"),
            "t3": (jpeg(800, 600, seed=2), "resize:w=200|encode:format=webp")}
    for tid, (data, ops) in jobs.items():
        rig.send(task(tid, data, ops))
    got = {r.task_id: r for r in (rig.result() for _ in jobs)}
    for tid, (data, ops) in jobs.items():
        r = got[tid]
        assert r.ok, r.error
        assert bytes(r.payload) == reference(data, ops), tid
        assert r.worker == wid and r.attempt == 1
        assert set(r.timings) == {"queue", "decode", "filters", "encode", "total"}
    assert (got["t1"].width, got["t1"].height, got["t1"].format) == (1920, 1080, "jpeg")
    assert got["t3"].content_type == "image/webp"
    rig.wait_bus(lambda m: len({c.task_id for c in rig.claims()}) == 3, what="3 claims")
    assert all(c.worker == wid for c in rig.claims())

    # The 4K frame went through shared memory: segments of >= 25 MB, a few hundred
    # bytes of pipe traffic per task.
    m = rig.metric(lambda m: m.values["tasks_done"] == 3)
    assert m.role == "worker" and m.source == wid
    assert m.values["shm_bytes"] >= 3840 * 2160 * 3
    assert 0 < m.values["ipc_bytes"] < 3 * 1024
    assert m.values["filters_ms_mean"] > 0 and m.values["decode_ms_last"] > 0

    # A corrupt image is a final error; the worker goes on.
    broken = jpeg(640, 480)
    rig.send(task("t4", broken[: len(broken) // 3], "blur"))
    r = rig.result()
    assert (r.task_id, r.ok, r.retry) == ("t4", False, False) and "truncated" in r.error

    # A filter process that dies: a retryable result, the next task is fine.
    rig.send(task("t5", jpeg(320, 240), "crash"))
    r = rig.result()
    assert (r.task_id, r.ok, r.retry) == ("t5", False, True)
    assert "filter process died" in r.error
    seq = rig.heartbeat().seq
    rig.send(task("t6", jpeg(320, 240), "invert"))
    r = rig.result()
    assert r.ok and bytes(r.payload) == reference(jpeg(320, 240), "invert")
    assert rig.heartbeat(after=seq).seq > seq

    # Past its deadline: stopped; heartbeats show it busy meanwhile.
    rig.send(task("t7", jpeg(320, 240), "sleep:ms=600000", deadline=time.time() + 2))
    busy = rig.wait_bus(lambda m: isinstance(m, Heartbeat) and "t7" in m.inflight,
                        what="a busy heartbeat")
    assert isinstance(busy, Heartbeat) and busy.state == "busy" and busy.free == 1
    r = rig.result()
    assert (r.task_id, r.ok, r.retry) == ("t7", False, True) and "deadline" in r.error
    hb = rig.wait_bus(lambda m: isinstance(m, Heartbeat) and m.done == 4 and not m.inflight,
                      what="counters")
    assert isinstance(hb, Heartbeat) and hb.failed == 1
    rig.wait_bus(lambda m: isinstance(m, Event) and m.what == "task_retry"
                 and m.task_id == "t5", what="a retry event")

    # SIGTERM with a task in hand: it is given back (retry), everything is cleaned up.
    assert leftovers(pid)
    children = pool_children(pid)
    assert children
    rig.send(task("t8", jpeg(320, 240), "sleep:ms=600000"))
    rig.wait_bus(lambda m: isinstance(m, Heartbeat) and "t8" in m.inflight, what="t8 taken")
    assert rig.stop(signal.SIGTERM) == 0
    r = rig.result()
    assert (r.task_id, r.ok, r.retry) == ("t8", False, True) and "stopping" in r.error
    assert leftovers(pid) == []
    wait_for(lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE
                             for c in children), 10, what="pool processes gone")


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_heavy_worker_takes_heavy_tasks_only_and_sigkill_leaves_nothing_after_sweep(
        rig_factory: Any) -> None:
    rig = rig_factory("--serves", "heavy", "--worker-processes", "2", "--worker-slots", "1")
    pid = rig.proc.pid
    hb = rig.heartbeat()
    assert (hb.serves, hb.slots) == ("heavy", 1)
    data = jpeg(320, 240)
    rig.send(task("t1", data, "denoise", cost="heavy"), "heavy")
    r = rig.result()
    assert r.ok and bytes(r.payload) == reference(data, "denoise")

    # One slot: the next task is taken off the socket only once the first is done,
    # though a second filter process is idle.
    rig.send(task("t2", data, "sleep:ms=1500", cost="heavy"), "heavy")
    rig.send(task("t3", data, "invert", cost="heavy"), "heavy")
    assert [rig.result().task_id for _ in range(2)] == ["t2", "t3"]
    rig.wait_bus(lambda m: {"t2", "t3"} <= {c.task_id for c in rig.claims()}, what="claims")
    claimed = {c.task_id: c.ts for c in rig.claims()}
    assert claimed["t3"] >= claimed["t2"] + 1.5
    # Not connected to the light socket: a PUSH with no peer cannot send.
    with pytest.raises(zmq.Again):
        rig.push["light"].send_multipart([b"x"], zmq.NOBLOCK)

    assert leftovers(pid), "the frame should sit in shared memory between tasks"
    children = pool_children(pid)
    assert len([c for c in children if c.name().startswith("python")]) >= 3  # 2 + server
    assert rig.stop(signal.SIGKILL) == -signal.SIGKILL
    sweep(pid)
    assert leftovers(pid) == []
    wait_for(lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE
                             for c in children), 15, what="orphaned pool processes gone")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_chain_cheaper_than_the_hop_runs_inline_and_the_rest_in_the_pool(
        rig_factory: Any) -> None:
    rig = rig_factory("--worker-slots", "1", "--inline-filter-ms", "4")
    rig.heartbeat()
    # 4K to 1920x1080: the reduced decode makes that size, the resize is free; a flip
    # or a grayscale of it is a ms or two: no pool, no shared memory, no pipe traffic.
    photo = jpeg(3840, 2160, seed=5)
    inline = {"t1": "resize:w=1920,h=1080", "t2": "resize:w=1920,h=1080|flip",
              "t3": "resize:w=960|grayscale|encode:format=png"}
    for tid, ops in inline.items():
        rig.send(task(tid, photo, ops))
        r = rig.result()
        assert r.ok, r.error
        assert bytes(r.payload) == reference(photo, ops), tid
    m = rig.metric(lambda m: m.values["tasks_done"] == 3)
    assert m.values["ipc_bytes"] == 0 and m.values["shm_bytes"] == 0
    # A blur of the 2 MP frame is estimated above 4 ms: through the pool.
    rig.send(task("t4", photo, "resize:w=1920,h=1080|blur:radius=2"))
    r = rig.result()
    assert r.ok and bytes(r.payload) == reference(photo, "resize:w=1920,h=1080|blur:radius=2")
    m = rig.metric(lambda m: m.values["tasks_done"] == 4)
    assert m.values["ipc_bytes"] > 0 and m.values["shm_bytes"] >= 1920 * 1080 * 3


def occupy(directory: Path, nbytes: int) -> Path:
    """Another tenant's file in a shm dir, its pages really taken."""
    path = directory / "another-tenant"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    finally:
        os.close(fd)
    return path


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_frame_that_does_not_fit_the_shm_goes_back_and_the_worker_stays_up(
        tmpfs: Callable[[str], Path], rig_factory: Any) -> None:
    small = tmpfs("40m")  # a container's /dev/shm, smaller still
    # 8 MP: up to 31 MB a slot, so 40 MB holds one slot of the two asked for.
    # Every chain through the pool (an invert is cheap enough to run inline otherwise).
    rig = rig_factory("--worker-slots", "2", "--shm-dir", str(small), "--inline-filter-ms", "0",
                      max_pixels=8_000_000)
    pid = rig.proc.pid
    hb = rig.heartbeat()
    assert (hb.slots, hb.free) == (1, 1)
    assert "slots lowered from 2 to 1" in hb.note and f"{small} has 40 MB free" in hb.note

    # Someone else takes 25 MB of it; a 3000x2000 photo (18 MB decoded) no longer fits.
    other = occupy(small, 25 * MB)
    big = jpeg(3000, 2000, seed=3)
    rig.send(task("t1", big, "invert"))
    r = rig.result()
    assert (r.task_id, r.ok, r.retry) == ("t1", False, True)
    assert r.error.startswith("worker out of shared memory: no shared memory for a 18 MB frame")
    assert "shm_size" in r.error and "IMGPIPE_MAX_PIXELS" in r.error
    rig.wait_bus(lambda m: isinstance(m, Event) and m.what == "task_retry"
                 and m.task_id == "t1", what="a retry event")

    # Still up: it beats on, and a small task afterwards is fine.
    seq = rig.heartbeat().seq
    small_img = jpeg(320, 240)
    rig.send(task("t2", small_img, "invert"))
    r = rig.result()
    assert (r.task_id, r.ok) == ("t2", True) and bytes(r.payload) == reference(small_img, "invert")
    assert rig.heartbeat(after=seq).pid == pid

    # With the room back, the big frame goes through on the same worker.
    other.unlink()
    rig.send(task("t3", big, "invert", attempt=2))
    r = rig.result()
    assert (r.task_id, r.ok) == ("t3", True), r.error
    assert bytes(r.payload) == reference(big, "invert")
    hb = rig.wait_bus(lambda m: isinstance(m, Heartbeat) and m.done == 2, what="2 done")
    assert isinstance(hb, Heartbeat) and hb.shm_bytes >= 3000 * 2000 * 3 and hb.failed == 0

    assert rig.stop(signal.SIGTERM) == 0
    assert leftovers(pid, small) == [] and os.listdir(small) == []


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_worker_whose_shm_cannot_hold_one_frame_refuses_to_start(
        tmpfs: Callable[[str], Path], rig_factory: Any) -> None:
    small = tmpfs("40m")
    rig = rig_factory("--shm-dir", str(small), max_pixels=20_000_000)  # 77 MB a frame
    assert rig.proc.wait(60) == 2
    log = rig.log.read_text()
    assert "worker not started: no room for one frame" in log, log
    assert f"{small} has 40 MB free" in log and "IMGPIPE_MAX_PIXELS=20000000" in log
    assert "shm_size" in log and "Traceback" not in log
    assert os.listdir(small) == []
