"""The gateway's side of the wire: notices to the ventilator, completion events, its metrics.

One :class:`Pipeline` per gunicorn worker process. Its ``zmq.Context`` is made lazily
in the process that uses it (after gunicorn forks), and every socket has one owner:

* a PUSH to each ``intake_endpoint`` (one per ventilator: only the active one acts on
  a notice) is shared by request threads behind a lock and only ever sent with
  ``NOBLOCK``: a full or absent ventilator never blocks a request (the ventilator
  rescans the job store anyway, so a dropped notice only delays dispatch);
* one background thread owns a SUB on every ``event_endpoint`` (one per sink, topic
  ``done``) and wakes the request threads waiting on a job (``?wait=S``). Gateways keep
  no state of their own: any number of them serve the same jobs from the store, and a
  ``?wait`` on one is woken by whichever sink finished the job;
* one background thread owns a PUB to the bus and publishes a numbered ``Metric``
  (role ``gateway``) every ``metrics_interval_s``: requests by status, upload bytes,
  request latency percentiles.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import zmq

from imgpipe.core.config import Settings, endpoints
from imgpipe.core.errors import ProtocolError
from imgpipe.core.protocol import (
    TOPIC_DONE,
    Done,
    Metric,
    Notice,
    decode_topic,
    encode,
    encode_topic,
)
from imgpipe.core.records import FINAL_JOB
from imgpipe.core.sockets import make_socket

log = logging.getLogger(__name__)

RECHECK_S = 1.0      # a waiter re-reads the store this often (events can be missed)
POLL_MS = 200        # background loops look at their stop flag this often


def percentiles(values: list[float], qs: tuple[float, ...] = (0.5, 0.95, 0.99)
                ) -> dict[str, float | None]:
    """Nearest-rank percentiles, keyed ``p50``, ``p95``, ``p99``; None when empty."""
    keys = [f"p{round(q * 100)}" for q in qs]
    if not values:
        return dict.fromkeys(keys)
    data = sorted(values)
    return {k: round(data[min(len(data) - 1, max(0, int(q * len(data) + 0.999999) - 1))], 3)
            for k, q in zip(keys, qs, strict=True)}


class RequestStats:
    """Counters this process publishes on the bus (thread-safe)."""

    def __init__(self, window: int = 2048) -> None:
        self._lock = threading.Lock()
        self.by_status: Counter[str] = Counter()
        self.upload_bytes = 0
        self.jobs_accepted = 0
        self._latency_ms: deque[float] = deque(maxlen=window)

    def record(self, status: int, seconds: float, upload_bytes: int = 0) -> None:
        with self._lock:
            self.by_status[str(status)] += 1
            self.upload_bytes += upload_bytes
            self._latency_ms.append(seconds * 1000.0)

    def accepted(self) -> None:
        with self._lock:
            self.jobs_accepted += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:  # copy only; every request's record() waits on this lock
            lat = list(self._latency_ms)
            by_status = dict(self.by_status)
            upload_bytes, accepted = self.upload_bytes, self.jobs_accepted
        return {"requests": by_status, "requests_total": sum(by_status.values()),
                "upload_bytes": upload_bytes, "jobs_accepted": accepted,
                "latency_ms": percentiles(lat)}


class Pipeline:
    """Per-process pipeline client; start() is idempotent and fork-aware."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stats = RequestStats()
        self.source = f"gateway-{socket.gethostname()}-{os.getpid()}"
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._ctx: zmq.Context[Any] | None = None
        self._push: list[zmq.Socket[Any]] = []
        self._push_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._waiters: dict[str, set[threading.Event]] = {}
        self._waiters_lock = threading.Lock()
        self.notices_dropped = 0

    # --- lifecycle --------------------------------------------------------------------
    @property
    def ctx(self) -> zmq.Context[Any]:
        self.start()
        assert self._ctx is not None
        return self._ctx

    def start(self) -> None:
        """Make the context and background threads in this process (once)."""
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self._ctx = zmq.Context()
            self._stop.clear()
            self.source = f"gateway-{socket.gethostname()}-{os.getpid()}"
            self._threads = [
                threading.Thread(target=self._watch_done, name="gateway-done", daemon=True),
                threading.Thread(target=self._publish_metrics, name="gateway-metrics",
                                 daemon=True),
            ]
            for t in self._threads:
                t.start()
            self._pid = os.getpid()

    def close(self) -> None:
        """Stop the threads, close sockets, end the context (tests; worker exit)."""
        if self._pid != os.getpid():
            return
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        with self._push_lock:
            for push in self._push:
                push.close(linger=0)
            self._push = []
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        self._pid = None

    # --- notices ------------------------------------------------------------------------
    def notify(self, job_id: str, outputs: int) -> bool:
        """Tell the ventilators about a recorded job (each of them: only the active one
        acts); never blocks. False if no notice was sent."""
        ctx = self.ctx
        sent = False
        with self._push_lock:
            if not self._push:
                self._push = [make_socket(ctx, zmq.PUSH, self.settings, connect=ep, sndhwm=1000)
                              for ep in endpoints(self.settings.intake_endpoint)]
            for push in self._push:
                try:
                    push.send_multipart(encode(Notice(job_id=job_id, outputs=outputs)),
                                        flags=zmq.NOBLOCK)
                    sent = True
                except zmq.Again:
                    self.notices_dropped += 1
                    log.debug("intake full: notice for %s left to the ventilator's rescan",
                              job_id)
        return sent

    # --- waiting for completion ------------------------------------------------------------
    def wait_final(self, job_id: str, timeout_s: float, is_final: Callable[[], bool]) -> bool:
        """Block until ``is_final()`` or ``timeout_s`` passes; woken early by ``Done`` events."""
        self.start()
        event = threading.Event()
        with self._waiters_lock:
            self._waiters.setdefault(job_id, set()).add(event)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if is_final():
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                event.wait(min(left, RECHECK_S))
                event.clear()
        finally:
            with self._waiters_lock:
                group = self._waiters.get(job_id)
                if group is not None:
                    group.discard(event)
                    if not group:
                        del self._waiters[job_id]

    def wake(self, job_id: str) -> None:
        with self._waiters_lock:
            for event in self._waiters.get(job_id, ()):
                event.set()

    def handle_done(self, msg: Done) -> None:
        """One completion event: wake the waiters of its job when the job is final."""
        if msg.job_state in FINAL_JOB:
            self.wake(msg.job_id)

    def awaited(self, frames: list[bytes]) -> bool:
        """Whether an event may concern a job a request of this process waits on: its
        header holds one of their ids. Every gateway process hears every job's ``Done``;
        only those are decoded (a JSON header and its checks, per image, per process)."""
        if len(frames) != 2:
            return True  # malformed: decoding says so
        with self._waiters_lock:
            waited = list(self._waiters)
        header = frames[1]
        return any(job_id.encode() in header for job_id in waited)

    def _watch_done(self) -> None:
        assert self._ctx is not None
        sub = make_socket(self._ctx, zmq.SUB, self.settings,
                          connect=self.settings.event_endpoint, subscribe=(TOPIC_DONE,))
        try:
            while not self._stop.is_set():
                if not sub.poll(POLL_MS, zmq.POLLIN):
                    continue
                frames = sub.recv_multipart()
                if not self.awaited(frames):
                    continue
                try:
                    msg = decode_topic(frames)
                    if isinstance(msg, Done):
                        self.handle_done(msg)
                except ProtocolError as exc:
                    log.warning("bad event frame: %s", exc)
                except Exception:
                    log.exception("error handling an event")
        except zmq.ContextTerminated:
            pass
        finally:
            sub.close(linger=0)

    # --- metrics on the bus ---------------------------------------------------------------
    def metric(self, seq: int) -> Metric:
        return Metric(source=self.source, role="gateway", seq=seq, ts=time.time(),
                      values={**self.stats.snapshot(), "pid": os.getpid(),
                              "notices_dropped": self.notices_dropped})

    def _publish_metrics(self) -> None:
        assert self._ctx is not None
        endpoints = self.settings.bus_endpoints
        if not endpoints:
            return
        pub = make_socket(self._ctx, zmq.PUB, self.settings, connect=endpoints, sndhwm=100)
        seq = 0
        try:
            while not self._stop.wait(self.settings.metrics_interval_s):
                seq += 1
                with contextlib.suppress(zmq.Again):
                    pub.send_multipart(encode_topic(self.metric(seq)), flags=zmq.NOBLOCK)
        except zmq.ContextTerminated:
            pass
        finally:
            pub.close(linger=0)
