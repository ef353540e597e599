"""``imgpipe worker``: pull tasks, decode/filter/encode them, push results, report.

Threads and processes of one worker::

    main thread     PULL light/heavy tasks, PUSH results, XPUB claims (owns these sockets)
    slot threads    one per slot (worker_slots): process_task(), decode and encode
                    under a gate worker_threads wide (OpenCV/Pillow release the GIL)
    filter pool     worker_processes processes; pixels arrive through shared memory
    monitor thread  PUB heartbeats, metrics and events (owns its own socket)

Fairness comes from *not* receiving: the main thread polls its task sockets only
while a slot is free, and they have ``rcvhwm=1``, so a busy worker's pipe stays full
and the ventilator's PUSH (``sndhwm=1``) skips it. Slot threads hand results back
through a queue plus one byte on a socketpair the main thread polls with its sockets.

On SIGTERM the worker stops taking tasks, gives back (``retry``) what it received but
had not started, lets running tasks finish for up to ``DRAIN_S`` seconds, gives back
the rest, and unlinks its shared memory.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq

from imgpipe.core.config import Settings, add_settings_args, endpoints, settings_from_args
from imgpipe.core.errors import ConfigError, ProtocolError
from imgpipe.core.protocol import TOPIC_CLAIM, Claim, Result, Task, decode, encode, encode_topic
from imgpipe.core.runtime import serve, usable_cpus
from imgpipe.core.sockets import POLLIN, POLLOUT, TASK_BUFFER_BYTES, make_socket
from imgpipe.workers.monitor import Monitor, Stats, worker_id
from imgpipe.workers.pipeline import Options, process_task
from imgpipe.workers.pool import FilterPool
from imgpipe.workers.shm import BufferSet, plan_slots

log = logging.getLogger(__name__)

# A bounded kernel receive buffer on the task sockets: over TCP the kernel would
# otherwise grow it to megabytes and hold several 1 MB tasks that this worker is too
# busy to read while its peers sit idle (see core.sockets.TASK_BUFFER_BYTES).
TASK_OPTIONS: dict[int, int] = {zmq.IMMEDIATE: 1, zmq.RCVBUF: TASK_BUFFER_BYTES}

DRAIN_S = 5.0
POLL_MS = 200
# How long a starting worker waits for a bus subscriber's subscription to reach its
# claims socket before it takes tasks. A PUB drops what it sends before that, so
# without the wait the first claims after a start are lost (the ventilator would then
# learn the owner only from the next heartbeat). Bounded: with no ventilator there are
# no tasks to claim either.
SUBSCRIBER_WAIT_S = 2.0
# OpenCV threads inside each filter process; see docs/worker.md for the measurements.
POOL_CV2_THREADS = 1

FLAGS = ("worker_serves", "worker_processes", "worker_threads", "worker_slots",
         "inline_filter_ms", "idle_filter_threads", "shm_dir",
         "data_dir", "light_task_endpoint", "heavy_task_endpoint", "result_endpoint",
         "bus_endpoint", "dashboard_bus_endpoint", "heartbeat_interval_s",
         "metrics_interval_s", "log_level")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="imgpipe worker",
        description="Run one worker: pull tasks from the ventilator, push results to the sink.")
    add_settings_args(parser, *FLAGS)
    settings = settings_from_args(parser.parse_args(argv))
    try:
        return serve(run, settings, "worker")
    except ConfigError as exc:  # the shared memory cannot hold one frame (plan_slots)
        log.error("worker not started: %s", exc.detail)
        return 2


def task_endpoints(settings: Settings) -> list[str]:
    """The task sockets a worker with ``worker_serves`` connects to."""
    serves = settings.worker_serves
    return [ep for cls, ep in (("light", settings.light_task_endpoint),
                               ("heavy", settings.heavy_task_endpoint))
            if serves in (cls, "all")]


def run(settings: Settings, ctx: zmq.Context[Any], *, stop: threading.Event | None = None
        ) -> None:
    """Serve tasks until ``stop`` is set; leave no process or shared memory behind.

    Raises ConfigError before starting anything when the shm dir cannot hold one
    frame at ``max_pixels``; with room for fewer frames than ``worker_slots``, runs
    that many slots and says so (log, heartbeat ``note``, the started event).
    """
    stop = stop or threading.Event()
    slots, note = plan_slots(settings)
    if note:
        log.warning("%s", note)
        settings = dataclasses.replace(settings, worker_slots=slots)
    if settings.test_hooks:
        from imgpipe.filters.testing import enable_test_filters

        enable_test_filters()
    import cv2

    cv2.setNumThreads(1)  # parallelism comes from the slot threads, not inside a decode
    stats = Stats(worker=worker_id(), serves=settings.worker_serves,
                  slots=settings.worker_slots, note=note)
    buffers = BufferSet(settings.worker_slots, shm_dir=settings.shm_dir)
    pool: FilterPool | None = None
    executor = ThreadPoolExecutor(settings.worker_slots, thread_name_prefix="slot")
    monitor: Monitor | None = None
    try:
        pool = FilterPool(settings.worker_processes, cv2_threads=POOL_CV2_THREADS,
                          test_hooks=settings.test_hooks, shm_dir=settings.shm_dir)
        live_pool = pool
        monitor = Monitor(settings, ctx, stats, extra=lambda: {
            "pool_processes": settings.worker_processes, "pool_restarts": live_pool.restarts,
            "ipc_bytes": live_pool.ipc_bytes, "shm_bytes": buffers.total_bytes})
        monitor.start()
        monitor.event("worker_started", f"serves {settings.worker_serves}, "
                      f"{settings.worker_slots} slots, {settings.worker_processes} processes"
                      + (f"; {note}" if note else ""))
        log.info("worker %s serving %s from %s", stats.worker, settings.worker_serves,
                 ", ".join(task_endpoints(settings)))
        TaskLoop(settings, ctx, stats, pool, buffers, executor, monitor).run(stop)
    finally:
        if monitor is not None:
            monitor.event("worker_stopped")
        if pool is not None:
            pool.close()
        executor.shutdown(wait=True, cancel_futures=True)
        buffers.close()
        if monitor is not None:
            monitor.stop()
        log.info("worker %s stopped", stats.worker)


class TaskLoop:
    """The main thread: takes tasks while slots are free, sends results as they finish."""

    def __init__(self, settings: Settings, ctx: zmq.Context[Any], stats: Stats,
                 pool: FilterPool, buffers: BufferSet, executor: ThreadPoolExecutor,
                 monitor: Monitor) -> None:
        self.settings, self.ctx, self.stats = settings, ctx, stats
        self.pool, self.buffers, self.executor, self.monitor = pool, buffers, executor, monitor
        self.opts = Options(worker=stats.worker, max_pixels=settings.max_pixels,
                            max_filters=settings.max_filters,
                            delay_ms=settings.worker_delay_ms if settings.test_hooks else 0,
                            gate=threading.BoundedSemaphore(settings.worker_threads),
                            inline_ms=settings.inline_filter_ms,
                            idle_threads=settings.idle_filter_threads or usable_cpus())
        self.active: dict[int, Task] = {}  # serial -> task taken, result not yet sent
        self.finished: queue.SimpleQueue[tuple[int, Result]] = queue.SimpleQueue()
        self.outbox: deque[tuple[int, Result]] = deque()
        self._serial = 0
        self._turn = 0
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)

    @property
    def free(self) -> int:
        return self.settings.worker_slots - len(self.active)

    def run(self, stop: threading.Event) -> None:
        s = self.settings
        socks: list[zmq.Socket[Any]] = []
        try:
            self.tasks = [make_socket(self.ctx, zmq.PULL, s, connect=ep, rcvhwm=1,
                                      options=TASK_OPTIONS, max_bytes=s.max_message_bytes)
                          for ep in task_endpoints(s)]
            socks += self.tasks
            # Several sinks: round-robin over the connected ones only (IMMEDIATE), so a
            # dead sink's pipe does not hold every other result; one sink: results wait
            # in its pipe while it restarts.
            several = len(endpoints(s.result_endpoint)) > 1
            self.results = make_socket(self.ctx, zmq.PUSH, s, connect=s.result_endpoint,
                                       sndhwm=max(4, 2 * s.worker_slots),
                                       options={zmq.IMMEDIATE: 1} if several else None)
            socks.append(self.results)
            # XPUB, so the worker sees subscriptions arrive (see SUBSCRIBER_WAIT_S).
            self.claims = make_socket(self.ctx, zmq.XPUB, s, connect=s.bus_endpoints)
            socks.append(self.claims)
            self._await_subscriber(stop)
            self._serve(stop)
            self._drain()
        finally:
            if self.outbox and hasattr(self, "results"):
                log.warning("%d result(s) not delivered at exit", len(self.outbox))
            for sock in socks:
                # Results already queued get a moment to leave; nothing else lingers.
                sock.close(linger=1000 if sock is getattr(self, "results", None) else 0)
            self._wake_r.close()
            self._wake_w.close()

    # --- the loop ----------------------------------------------------------------------
    def _await_subscriber(self, stop: threading.Event) -> None:
        """Wait, at most SUBSCRIBER_WAIT_S, for a subscription that covers claims."""
        end = time.monotonic() + SUBSCRIBER_WAIT_S
        while not stop.is_set() and time.monotonic() < end:
            if self.claims.poll(50, zmq.POLLIN) and self._read_subscriptions():
                return
        log.info("no claim subscriber after %.0f s; claims go out once one connects",
                 SUBSCRIBER_WAIT_S)

    def _read_subscriptions(self) -> bool:
        """Read what the claims XPUB received (subscribe/unsubscribe frames), which keeps
        its inbound queue from growing as subscribers come and go. True when one of them
        subscribes to claims."""
        claimed = False
        with contextlib.suppress(zmq.Again):
            while True:
                frame = self.claims.recv(zmq.NOBLOCK)
                claimed |= frame[:1] == b"\x01" and TOPIC_CLAIM.startswith(frame[1:])
        return claimed

    def _serve(self, stop: threading.Event) -> None:
        poller = zmq.Poller()
        poller.register(self._wake_r.fileno(), zmq.POLLIN)
        poller.register(self.claims, zmq.POLLIN)
        reading = False
        while not stop.is_set():
            if (self.free > 0) != reading:
                reading = not reading
                for sock in self.tasks:
                    poller.modify(sock, POLLIN if reading else 0)
            poller.modify(self.results, POLLOUT if self.outbox else 0)
            events = dict(poller.poll(POLL_MS))
            if events.get(self.claims, 0) & POLLIN:
                self._read_subscriptions()
            self._collect()
            self._flush()
            ready = [sock for sock in self.tasks if events.get(sock, 0) & POLLIN]
            if len(ready) > 1:  # both classes waiting: alternate which goes first
                self._turn ^= 1
                ready = ready[self._turn:] + ready[:self._turn]
            for sock in ready:
                if self.free > 0:
                    self._take(sock)

    def _take(self, sock: zmq.Socket[Any]) -> None:
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        received = time.time()
        try:
            task = decode(frames, expect=Task)
        except ProtocolError as exc:
            with self.stats.lock:
                self.stats.bad_messages += 1
            log.warning("dropped a bad task message: %s", exc)
            return
        self._serial += 1
        serial = self._serial
        self.active[serial] = task
        self.stats.claim(task.task_id, task.attempt)
        self.claims.send_multipart(encode_topic(Claim(
            worker=self.stats.worker, task_id=task.task_id, attempt=task.attempt, ts=received)))
        self.executor.submit(self._work, serial, task, received)

    def _work(self, serial: int, task: Task, received: float) -> None:
        """On a slot thread: the whole task, then a wake-up byte for the main thread."""
        try:
            result = process_task(task, self.pool, self.buffers, self.opts, received=received)
        except BaseException as exc:  # noqa: BLE001 - process_task catches; this is a backstop
            log.exception("slot thread failed on %s", task.task_id)
            result = bounce(task, self.stats.worker, f"internal error: {exc}")
        self.finished.put((serial, result))
        with contextlib.suppress(OSError):  # the loop is gone; the drain gives it back
            self._wake_w.send(b"\0")

    def _collect(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        while True:
            try:
                serial, result = self.finished.get_nowait()
            except queue.Empty:
                return
            if serial not in self.active:
                continue  # given back while stopping
            self.outbox.append((serial, result))
            if result.retry:
                self.monitor.event("task_retry", result.error, result.task_id)
            elif not result.ok:
                self.monitor.event("task_failed", result.error, result.task_id)

    def _flush(self, flags: int = zmq.NOBLOCK) -> None:
        while self.outbox:
            serial, result = self.outbox[0]
            try:
                self.results.send_multipart(encode(result), flags, copy=False)
            except zmq.Again:
                return
            self.outbox.popleft()
            self.active.pop(serial, None)
            self.stats.finish(result)

    # --- stopping -------------------------------------------------------------------------
    def _drain(self) -> None:
        """Give back unstarted tasks, let running ones finish briefly, give back the rest."""
        for sock in self.tasks:
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                try:
                    task = decode(frames, expect=Task)
                except ProtocolError:
                    continue
                self._serial += 1
                self.active[self._serial] = task
                self.outbox.append((self._serial, bounce(task, self.stats.worker,
                                                         "worker stopping; not started")))
        self.monitor.event("worker_stopping", f"{len(self.active)} task(s) in hand")
        end = time.monotonic() + DRAIN_S
        while self.active and time.monotonic() < end:
            self._collect()
            self._flush()
            if self.active:
                self._wake_r.settimeout(0.05)
                try:
                    self._wake_r.recv(4096)
                except (TimeoutError, OSError):
                    pass
                finally:
                    self._wake_r.setblocking(False)
        self._collect()
        queued = {serial for serial, _ in self.outbox}
        for serial, task in list(self.active.items()):
            if serial not in queued:
                self.outbox.append((serial, bounce(task, self.stats.worker,
                                                   "worker stopping; task interrupted")))
        self._flush()
        if self.outbox:  # the sink is slow or away: wait a little, not forever
            self.results.sndtimeo = 1000
            self._flush(0)


def bounce(task: Task, worker: str, why: str) -> Result:
    """A retryable Result that hands ``task`` back for another worker."""
    return Result(task_id=task.task_id, job_id=task.job_id, n=task.n, attempt=task.attempt,
                  lease=task.lease, worker=worker, ok=False, retry=True, error=why,
                  timings={"queue": 0.0, "total": 0.0})

