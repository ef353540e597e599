"""The ventilator's own loop, in process, on real sockets."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth

from imgpipe.core.protocol import Heartbeat, Metric, Notice, Task, decode, encode, encode_topic
from imgpipe.core.records import Original, new_job_id
from imgpipe.core.sockets import make_socket
from imgpipe.core.store import Store
from imgpipe.ventilator.service import Ventilator
from tests.support import make_settings, wait_for


@pytest.mark.timeout(60)
def test_a_stall_of_the_ventilator_does_not_lose_a_beating_worker(
        tmp_path: Path, zctx: zmq.Context[Any]) -> None:
    """The loop stalls (a slow disk, a paused container) longer than the liveness
    window while a worker keeps beating behind a flood of other bus messages: once it
    runs again it reads the whole backlog before it judges liveness, so the worker is
    not declared lost."""
    settings = dataclasses.replace(make_settings(tmp_path / "data", dashboard_bus_endpoint=""),
                                   heartbeat_interval_s=0.1, heartbeat_liveness=5,
                                   rescan_interval_s=0.2)
    vent = Ventilator(settings, zctx)
    stall = threading.Event()
    real_rescan = vent.rescan

    def rescan(now: float) -> None:
        # The fault: a rescan that hangs (SQLite busy, a slow disk), right before the
        # loop's liveness check; beats pile up in the bus socket meanwhile.
        if stall.is_set():
            stall.clear()
            time.sleep(4 * settings.liveness_s)
        real_rescan(now)

    vent.rescan = rescan  # type: ignore[method-assign]
    stop = threading.Event()
    loop = threading.Thread(target=vent.loop, args=(stop,), daemon=True)
    pub = make_socket(zctx, zmq.XPUB, settings, connect=settings.bus_endpoint, sndhwm=100_000)
    beating, paused = threading.Event(), threading.Event()
    beating.set()
    lock = threading.Lock()

    sent = [0]

    def beat() -> None:
        while beating.is_set():
            if not paused.is_set():
                sent[0] = seq = sent[0] + 1
                with lock:
                    pub.send_multipart(encode_topic(Heartbeat(
                        worker="w1", host="h", pid=7, seq=seq, ts=time.time())))
            time.sleep(settings.heartbeat_interval_s)

    loop.start()
    try:
        assert pub.poll(5000, zmq.POLLIN), "the ventilator's bus never subscribed"
        pub.recv()
        beater = threading.Thread(target=beat, daemon=True)
        beater.start()
        wait_for(lambda: vent.disp.registry.counts()["alive"] == 1, 10, what="w1 joined")
        paused.set()  # every beat so far read: the backlog below starts with the flood
        wait_for(lambda: vent.disp.registry.workers["w1"].hb.seq == sent[0], 10,
                 what="the ventilator to read every beat sent")
        before = sent[0]
        stall.set()
        wait_for(lambda: not stall.is_set(), 10, what="the stall to begin")
        with lock:  # other publishers' messages queue up ahead of the next beats
            for i in range(5000):
                pub.send_multipart(encode_topic(Metric(source="gw", role="gateway", seq=i,
                                                       ts=time.time())))
        paused.clear()
        wait_for(lambda: vent.disp.registry.workers["w1"].hb.seq > before, 20,
                 what="the loop running again, past the backlog")
        assert vent.disp.counters["workers_lost"] == 0
        beating.clear()
        beater.join(5)
    finally:
        beating.clear()
        stop.set()
        loop.join(10)
        pub.close(linger=0)
        vent.close()


@pytest.mark.timeout(60)
def test_a_notice_dispatches_its_job_at_once_and_a_bad_one_is_dropped(
        tmp_path: Path, zctx: zmq.Context[Any]) -> None:
    """A job noticed on the intake socket goes out long before the next rescan (an hour
    away here): the ventilator reads that job's outputs by id. A notice naming no job id
    this service could have made is counted and dropped, and the loop goes on."""
    settings = dataclasses.replace(make_settings(tmp_path / "data", dashboard_bus_endpoint=""),
                                   heartbeat_interval_s=0.2, rescan_interval_s=3600.0)
    vent = Ventilator(settings, zctx)
    store = Store.from_settings(settings)
    stop = threading.Event()
    loop = threading.Thread(target=vent.loop, args=(stop,), daemon=True)
    pub = make_socket(zctx, zmq.XPUB, settings, connect=settings.bus_endpoint)
    intake = make_socket(zctx, zmq.PUSH, settings, connect=settings.intake_endpoint)
    pull = make_socket(zctx, zmq.PULL, settings, connect=settings.light_task_endpoint,
                       max_bytes=settings.max_message_bytes)
    loop.start()
    try:
        assert pub.poll(5000, zmq.POLLIN), "the ventilator's bus never subscribed"
        pub.recv()
        pub.send_multipart(encode_topic(Heartbeat(worker="w1", host="h", pid=7, seq=1,
                                                  ts=time.time())))
        wait_for(lambda: vent.disp.registry.counts()["alive"] == 1, 10, what="w1 joined")
        wait_for(lambda: vent.disp.next_rescan > time.time() + 60, 10,
                 what="the first scan done, the next an hour away")
        scans = [0]
        full_scan = vent.store.open_tasks

        def counted(**kw: Any) -> Any:
            scans[0] += 1
            return full_scan(**kw)

        vent.store.open_tasks = counted  # type: ignore[method-assign]
        intake.send_multipart(encode(Notice(job_id="../../etc/passwd")))
        wait_for(lambda: vent.disp.counters["bad_messages"] == 1, 10,
                 what="the bad notice counted")
        job = new_job_id()
        store.save_original(job, 0, "jpeg", b"\xff\xd8original")
        store.create_job(job, [Original("jpeg", 10, 8, 10)], [("resize:w=4", "light")])
        intake.send_multipart(encode(Notice(job_id=job, outputs=1)))
        assert pull.poll(10_000, zmq.POLLIN), "no task 10 s after the notice"
        task = decode(pull.recv_multipart(copy=False), expect=Task)
        assert (task.job_id, task.n, bytes(task.payload)) == (job, 0, b"\xff\xd8original")
        assert scans[0] == 0  # read by its id: no scan of every open output
    finally:
        stop.set()
        loop.join(10)
        for sock in (pub, intake, pull):
            sock.close(linger=0)
        vent.close()
        store.close()


def test_a_ventilator_that_cannot_start_exits_instead_of_hanging(tmp_path: Path) -> None:
    """With CURVE on, the authenticator starts before the sockets; when a bind then fails
    (here the intake port is taken) run() raises, so the process exits and its restart
    policy applies, instead of waiting for ever in ctx.term() on the authenticator."""
    from imgpipe.ventilator.service import run

    public, secret = zmq.auth.create_certificates(str(tmp_path), "server")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = make_settings(
            tmp_path, intake_endpoint=f"tcp://127.0.0.1:{taken.getsockname()[1]}",
            curve_server_public_file=public, curve_server_secret_file=secret)
        ctx: zmq.Context[Any] = zmq.Context()
        raised: list[BaseException] = []

        def start() -> None:
            try:
                run(settings, ctx, stop=threading.Event())
            except BaseException as exc:  # noqa: BLE001 - what run() raised is the point
                raised.append(exc)
            finally:
                ctx.term()

        thread = threading.Thread(target=start, daemon=True)
        thread.start()
        thread.join(timeout=30)
    assert not thread.is_alive(), "run() and ctx.term() still waiting after 30 s"
    assert raised and isinstance(raised[0], zmq.ZMQError), raised
