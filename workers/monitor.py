"""What a worker tells the fleet: heartbeats, metrics and events, from a thread of its own.

The monitor thread owns a PUB socket of its own (connected to every bus endpoint), so
heartbeats keep their period whatever the task loop is doing; filters run in other
processes, so a saturated CPU delays a beat by a scheduler tick, not by a filter.
The task loop and the slot threads only update :class:`Stats` (a lock, no sockets).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import psutil
import zmq

from imgpipe.core.config import Settings
from imgpipe.core.protocol import STAGES, Event, Heartbeat, Message, Metric, Result, encode_topic
from imgpipe.core.sockets import make_socket

log = logging.getLogger(__name__)

THROUGHPUT_WINDOW_S = 10.0


def worker_id() -> str:
    """``<hostname>-<pid>``: unique per live process, readable in a process list."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class Stats:
    """Counters and gauges of one worker, shared by its threads under one lock."""

    worker: str
    serves: str
    slots: int
    note: str = ""  # why the worker runs below what it was asked (see shm.plan_slots)
    started: float = field(default_factory=time.time)
    inflight: dict[str, int] = field(default_factory=dict)
    done: int = 0
    failed: int = 0
    retried: int = 0
    bad_messages: int = 0
    stage_sum: dict[str, float] = field(default_factory=dict)
    stage_last: dict[str, float] = field(default_factory=dict)
    finished_at: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def claim(self, task_id: str, attempt: int) -> None:
        with self.lock:
            self.inflight[task_id] = attempt

    def finish(self, result: Result) -> None:
        """Count a result that left the worker (sent to the sink)."""
        with self.lock:
            self.inflight.pop(result.task_id, None)
            self.finished_at.append(time.monotonic())
            if result.ok:
                self.done += 1
                for stage in STAGES:
                    if stage in result.timings:
                        ms = float(result.timings[stage])
                        self.stage_sum[stage] = self.stage_sum.get(stage, 0.0) + ms
                        self.stage_last[stage] = ms
            elif result.retry:
                self.retried += 1
            else:
                self.failed += 1

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            now = time.monotonic()
            recent = sum(1 for t in self.finished_at if now - t <= THROUGHPUT_WINDOW_S)
            span = min(THROUGHPUT_WINDOW_S, max(1e-3, time.time() - self.started))
            values: dict[str, Any] = {
                "tasks_done": self.done, "tasks_failed": self.failed,
                "tasks_retried": self.retried, "bad_messages": self.bad_messages,
                "inflight": len(self.inflight), "slots": self.slots,
                "throughput": round(recent / span, 3),
            }
            for stage in STAGES:
                mean = self.stage_sum.get(stage, 0.0) / self.done if self.done else 0.0
                values[f"{stage}_ms_mean"] = round(mean, 2)
                values[f"{stage}_ms_last"] = round(self.stage_last.get(stage, 0.0), 2)
            return values


def _descendants(pid: int) -> list[int]:
    """Pids of ``pid``'s descendants, read from /proc/<pid>/task/*/children.

    psutil's ``children(recursive=True)`` reads the status of every process on the
    host; on a busy host that cost more than a JPEG decode per heartbeat. This reads
    only our own processes' files. Elsewhere than Linux, it falls back to psutil.
    """
    try:
        found: list[int] = []
        todo = [pid]
        while todo:
            parent = todo.pop()
            for task in os.listdir(f"/proc/{parent}/task"):
                with open(f"/proc/{parent}/task/{task}/children") as fh:
                    kids = [int(k) for k in fh.read().split()]
                found += kids
                todo += kids
        return found
    except FileNotFoundError:  # a process ended while we looked: take what we have
        return found
    except OSError:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]


class Resources:
    """CPU % and RSS of this process and its children (pool, fork server), via psutil."""

    def __init__(self) -> None:
        self._me = psutil.Process()
        self._procs: dict[int, psutil.Process] = {}
        self._me.cpu_percent(None)
        self.last: tuple[float, int] = (0.0, 0)

    def sample(self) -> tuple[float, int]:
        current = [self._me]
        for pid in _descendants(self._me.pid):
            try:
                current.append(self._procs.get(pid) or psutil.Process(pid))
            except psutil.Error:  # ended since we listed it
                continue
        cpu, rss = 0.0, 0
        seen: dict[int, psutil.Process] = {}
        for proc in current:
            known = self._procs.get(proc.pid, proc)
            try:
                cpu += known.cpu_percent(None)  # 0.0 on a process's first sample
                rss += known.memory_info().rss
            except psutil.Error:
                continue
            seen[proc.pid] = known
        self._procs = seen
        self.last = (round(cpu, 1), rss)
        return self.last


class Monitor(threading.Thread):
    """Publishes a Heartbeat every ``heartbeat_interval_s``, a Metric every
    ``metrics_interval_s`` and Events as they are queued with :meth:`event`."""

    def __init__(self, settings: Settings, ctx: zmq.Context[Any], stats: Stats,
                 extra: Any = None) -> None:
        super().__init__(name="worker-monitor", daemon=True)
        self.settings, self.ctx, self.stats = settings, ctx, stats
        self.extra = extra  # callable returning extra metric values (pool, buffers)
        self.host = socket.gethostname()
        self._events: queue.SimpleQueue[Message | None] = queue.SimpleQueue()
        self._hb_seq = 0
        self._metric_seq = 0
        self.resources = Resources()

    def event(self, what: str, detail: str = "", task_id: str = "") -> None:
        self._events.put(Event(source=self.stats.worker, what=what, ts=time.time(),
                               detail=detail, worker=self.stats.worker, task_id=task_id))

    def stop(self, timeout: float = 5.0) -> None:
        self._events.put(None)
        self.join(timeout)

    def heartbeat(self) -> Heartbeat:
        cpu, rss = self.resources.sample()
        s = self.stats
        with s.lock:
            inflight = sorted(s.inflight)
            done, failed = s.done, s.failed
        self._hb_seq += 1
        return Heartbeat(worker=s.worker, host=self.host, pid=os.getpid(), seq=self._hb_seq,
                         ts=time.time(), state="busy" if inflight else "idle", serves=s.serves,
                         slots=s.slots, free=max(0, s.slots - len(inflight)),
                         inflight=inflight, done=done, failed=failed, cpu=cpu, rss=rss,
                         started=s.started, shm_bytes=int(self._extra().get("shm_bytes", 0)),
                         note=s.note)

    def metric(self) -> Metric:
        values = self.stats.snapshot()
        values.update(cpu=self.resources.last[0], rss=self.resources.last[1])
        values.update(self._extra())
        self._metric_seq += 1
        return Metric(source=self.stats.worker, role="worker", seq=self._metric_seq,
                      ts=time.time(), values=values)

    def _extra(self) -> dict[str, Any]:
        return {} if self.extra is None else dict(self.extra())

    def run(self) -> None:
        pub = make_socket(self.ctx, zmq.PUB, self.settings, connect=self.settings.bus_endpoints,
                          sndhwm=1000)
        try:
            self._loop(pub)
        except Exception:  # noqa: BLE001 - a dead monitor would make the worker look lost
            log.exception("monitor stopped")
        finally:
            pub.close(linger=500)  # let the last event (worker stopping) out

    def _loop(self, pub: zmq.Socket[Any]) -> None:
        s = self.settings
        next_hb = next_metric = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= next_hb:
                hb = self.heartbeat()
                pub.send_multipart(encode_topic(hb))
                next_hb = now + s.heartbeat_interval_s
            if now >= next_metric:
                pub.send_multipart(encode_topic(self.metric()))
                next_metric = now + s.metrics_interval_s
            try:
                msg = self._events.get(timeout=max(0.0, min(next_hb, next_metric)
                                                   - time.monotonic()))
            except queue.Empty:
                continue
            if msg is None:
                return
            pub.send_multipart(encode_topic(msg))
