"""``imgpipe ventilator``: the only dispatcher. One thread owns every socket.

Sockets (stable node: it binds, except the event SUB and its own PUB)::

    intake   PULL   bind  intake_endpoint      Notice from the gateway: rescan now
    light    PUSH   bind  light_task_endpoint  Task, sndhwm=1
    heavy    PUSH   bind  heavy_task_endpoint  Task, sndhwm=1
    bus      SUB    bind  bus_endpoint         Heartbeat, Claim, Metric from everyone
    events   SUB    conn  event_endpoint       Done from the sink
    control  ROUTER bind  control_endpoint     Request -> Reply (ping, workers, stats)
    pub      PUB    conn  bus_endpoints        our Metric and Event

Only the holder of the job store's ``ventilator`` lease dispatches (ventilator/tenure.py):
a standby binds the same kinds of sockets (on the next free entry of each endpoint list,
so workers stay connected to both), keeps its registry from the bus and answers the
control socket, and takes over when the lease expires.

Credit by not reading: a task socket is written only while ZeroMQ says it has room
(``POLLOUT``), and with a high-water mark of one per worker pipe a busy worker's pipe
stays full and is skipped, so tasks wait here, in the ventilator's queue, instead of
piling up behind a slow worker. Nothing here blocks: sends use NOBLOCK and a task
that does not fit goes back to the front of its queue. See docs/pipeline.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

import zmq

from imgpipe.core import lease
from imgpipe.core.config import Settings, add_settings_args, settings_from_args
from imgpipe.core.errors import ImgpipeError, ProtocolError
from imgpipe.core.protocol import (
    TOPIC_CLAIM,
    TOPIC_DONE,
    TOPIC_HEARTBEAT,
    TOPIC_METRIC,
    Claim,
    Done,
    Event,
    Heartbeat,
    Metric,
    Notice,
    Reply,
    Request,
    Task,
    decode,
    decode_topic,
    encode,
    encode_topic,
)
from imgpipe.core.records import Fenced, NotFound, check_id
from imgpipe.core.runtime import serve
from imgpipe.core.sockets import (
    POLLIN,
    POLLOUT,
    TASK_BUFFER_BYTES,
    make_socket,
    release,
    start_authenticator,
)
from imgpipe.core.store import Store
from imgpipe.ventilator import tenure
from imgpipe.ventilator.dispatcher import Action, Dispatcher, Fail
from imgpipe.ventilator.registry import CLASSES
from imgpipe.ventilator.tenure import Tenure

log = logging.getLogger(__name__)

SCAN_LIMIT = 10_000   # open outputs read per rescan (queue_limit is far below)
TICK_S = 0.1          # lease and liveness checks, seconds
BUS_HWM = 100_000     # bus messages queued here (small: heartbeats, claims, metrics)
DRAIN = 500           # messages read from one socket per loop turn, so none starves
BURST = 32            # tasks sent per socket per loop turn
# Kernel send buffer of the task sockets: what may sit in the kernel for one worker
# beyond the one-message high-water mark (see core.sockets.TASK_BUFFER_BYTES).
TASK_OPTIONS = {zmq.SNDBUF: TASK_BUFFER_BYTES}


class Ventilator:
    """Sockets plus a :class:`Dispatcher`; :meth:`loop` runs until ``stop`` is set."""

    def __init__(self, settings: Settings, ctx: zmq.Context[Any]) -> None:
        self.settings = settings
        self.store = Store.from_settings(settings)
        self.lease_key = lease.load_key(settings.data_dir)
        self.source = f"ventilator@{socket.gethostname()}:{os.getpid()}"
        self.disp = Dispatcher(settings, source=self.source, is_final=self.store.is_final,
                               start=time.time())
        self.tenure = Tenure(self.source, settings.ventilator_lease_s)
        self.seq = 0
        self.socks: list[zmq.Socket[Any]] = []

        def sock(kind: int, **kw: Any) -> zmq.Socket[Any]:
            s = make_socket(ctx, kind, settings, **kw)
            self.socks.append(s)
            return s

        self.intake = sock(zmq.PULL, bind=settings.intake_endpoint)
        self.tasks = {
            cls: sock(zmq.PUSH, bind=endpoint, sndhwm=1, options=TASK_OPTIONS)
            for cls, endpoint in (("light", settings.light_task_endpoint),
                                  ("heavy", settings.heavy_task_endpoint))}
        # A deep queue: beats that arrive while this loop stalls wait to be read (the
        # default 1000 would drop them under a large fleet), see loop().
        self.bus = sock(zmq.SUB, bind=settings.bus_endpoint, rcvhwm=BUS_HWM,
                        subscribe=(TOPIC_HEARTBEAT, TOPIC_CLAIM, TOPIC_METRIC))
        self.events = sock(zmq.SUB, connect=settings.event_endpoint, subscribe=(TOPIC_DONE,))
        self.control = sock(zmq.ROUTER, bind=settings.control_endpoint)
        self.pub = sock(zmq.PUB, connect=settings.bus_endpoints)

    def close(self) -> None:
        for s in self.socks:
            release(s)
        if self.tenure.active:
            # A clean stop hands over at once instead of after the lease's TTL.
            try:
                self.store.release_lease(tenure.NAME, self.source)
            except Exception:
                log.exception("could not release the ventilator lease")
        self.store.close()

    # --- the lease -----------------------------------------------------------------------
    def hold_lease(self) -> None:
        """Take or renew the lease when due; end the tenure when it is no longer sure."""
        mono = time.monotonic()
        if self.tenure.active and not self.tenure.valid(mono):
            self.step_down(f"lease not renewed within {self.tenure.ttl_s:g} s")
        if not self.tenure.due(mono):
            return
        wall = time.time()
        try:
            previous = None if self.tenure.active else self.store.lease(tenure.NAME)
            token = self.store.acquire_lease(tenure.NAME, self.source,
                                             self.settings.ventilator_lease_s, now=wall)
        except Exception:
            log.exception("could not reach the job store for the ventilator lease")
            self.tenure.failed(mono)
            return
        had = self.tenure.token
        outcome = self.tenure.answered(token, started=mono, wall=wall, previous=previous)
        if outcome == "lost":
            self.forget(f"lease {tenure.NAME!r} (token {had}) now held by "
                        f"{previous.holder if previous else 'another ventilator'}")
        if outcome in ("took", "lost") and self.tenure.active:
            self.begin_tenure(wall)

    def begin_tenure(self, wall: float) -> None:
        t = self.tenure
        take = t.takeover if t.takeover and t.takeover.token == t.token else None
        detail = f"token {t.token}"
        if take is not None:
            detail += (f"; took over from {take.previous}, {take.took_s:.2f} s after its"
                       f" last renew")
        self.execute([self.disp.event("ventilator_active", wall, detail=detail)])
        self.rescan(wall)
        log.info("ventilator active (%s): %d open outputs (%d recovered)", detail,
                 len(self.disp.entries), self.disp.counters["recovered"])

    def step_down(self, why: str) -> None:
        self.tenure.drop()
        self.forget(why)

    def forget(self, why: str) -> None:
        """Standby from now on: drop every queue and lease this process held; whoever
        holds the lease recovers them from the store."""
        log.warning("ventilator standing by: %s", why)
        self.disp.forget()
        self.execute([self.disp.event("ventilator_standby", time.time(), detail=why)],
                     always=True)

    # --- the loop ------------------------------------------------------------------------
    def loop(self, stop: threading.Event) -> None:
        self.hold_lease()
        if not self.tenure.active:
            log.info("ventilator standing by: %s holds the lease",
                     self.store.lease_holder(tenure.NAME))
        poller = zmq.Poller()
        readers = {self.intake: self.on_intake, self.bus: self.on_bus,
                   self.events: self.on_event, self.control: self.on_control}
        for s in readers:
            poller.register(s, zmq.POLLIN)
        next_tick = next_metric = 0.0
        while not stop.is_set():
            self.hold_lease()
            now = time.time()
            if self.tenure.active and self.disp.wants_rescan(now):
                self.rescan(now)
            elif self.tenure.active and self.disp.noticed:
                self.load_noticed(now)
            if now >= next_tick:
                # Heartbeats first: after a stall of this process (a slow disk, a
                # paused container) the beats are waiting in the socket, and judging
                # liveness before reading them would declare healthy workers lost.
                self.drain(self.bus, self.on_bus, limit=100 * DRAIN)
                self.execute(self.disp.tick(now))
                next_tick = now + TICK_S
            if now >= next_metric:
                self.publish_metric(now)
                next_metric = now + self.settings.metrics_interval_s
            self.dispatch()
            for cls, s in self.tasks.items():
                poller.register(s, POLLOUT if self.disp.has_work(cls) else 0)
            wake = min(next_tick, next_metric, self.disp.next_rescan if self.tenure.active
                       else next_tick)
            wait = min(wake - time.time(), self.tenure.next_try - time.monotonic())
            for s, _ in poller.poll(max(0, int(wait * 1000)) + 1):
                handler = readers.get(s)
                if handler is not None:
                    self.drain(s, handler)

    def drain(self, s: zmq.Socket[Any], handler: Any, limit: int = 0) -> None:
        for _ in range(limit or DRAIN):
            # Asked first: a zmq.Again raised at the end of every drain cost more than
            # the message it ended (the exception builds an errno enum each time).
            if not int(s.getsockopt(zmq.EVENTS)) & POLLIN:
                return
            try:
                frames = s.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                handler(frames)
            except ProtocolError as exc:
                self.disp.counters["bad_messages"] += 1
                log.warning("dropped a bad message: %s", exc)
            except Exception:
                log.exception("error handling a message")

    # --- inbound -------------------------------------------------------------------------
    def on_intake(self, frames: list[Any]) -> None:
        notice = decode(frames, expect=Notice)
        try:
            check_id(notice.job_id)
        except NotFound:
            raise ProtocolError(f"notice for a job id that is no UUID: "
                                f"{notice.job_id[:80]!r}") from None
        if self.tenure.active:
            self.disp.on_notice(notice.job_id, time.time())

    def on_bus(self, frames: list[Any]) -> None:
        msg = decode_topic(frames)
        now = time.time()
        if isinstance(msg, Heartbeat):
            self.execute(self.disp.on_heartbeat(msg, now, peer_key(frames[-1])))
        elif isinstance(msg, Claim):
            self.disp.on_claim(msg, now)
        elif isinstance(msg, Metric):
            self.disp.on_metric(msg, now)

    def on_event(self, frames: list[Any]) -> None:
        msg = decode_topic(frames)
        if isinstance(msg, Done):
            self.execute(self.disp.on_done(msg, time.time()))

    def on_control(self, frames: list[Any]) -> None:
        envelope, body = frames[:-1], frames[-1]
        try:
            req = decode([body], expect=Request)
            reply = Reply(ok=True, data=self.answer(req.op, time.time()),
                          role=self.tenure.role)
        except (ProtocolError, KeyError) as exc:
            reply = Reply(ok=False, error=str(exc), role=self.tenure.role)
        try:
            self.control.send_multipart([*envelope, *encode(reply)], zmq.NOBLOCK)
        except zmq.Again:
            log.warning("control reply dropped: the asker's pipe is full")

    def answer(self, op: str, now: float) -> Any:
        """The data of a control reply; the shapes are written in core/control.py."""
        if op == "ping":
            return {"role": "ventilator", "pid": os.getpid(), "state": self.tenure.role,
                    "uptime_s": round(now - self.disp.started, 3)}
        if op == "workers":
            return self.disp.registry.listing(now)
        if op == "stats":
            return {**self.disp.stats(now), "lease": self.tenure.stats()}
        if op == "events":
            return [dataclasses.asdict(e) for e in self.disp.recent_events]
        raise KeyError(f"unknown op {op!r}: ask ping, workers, stats or events")

    # --- outbound ------------------------------------------------------------------------
    def rescan(self, now: float) -> None:
        if not self.tenure.active:
            return
        try:
            tasks = self.store.open_tasks(limit=SCAN_LIMIT)
        except Exception:
            log.exception("job store rescan failed; retrying in %s s",
                          self.settings.rescan_interval_s)
            self.disp.next_rescan = now + self.settings.rescan_interval_s
            return
        self.disp.load(tasks, now, complete=len(tasks) < SCAN_LIMIT)

    def load_noticed(self, now: float) -> None:
        """The outputs of the jobs noticed since the last turn, read by job id (a full
        scan per notice would read every open output once per job)."""
        jobs = self.disp.take_noticed()
        try:
            tasks = self.store.open_tasks_of(jobs)
        except Exception:
            log.exception("job store read of %d noticed job(s) failed; the next rescan "
                          "finds them", len(jobs))
            return
        self.disp.load(tasks, now, complete=False, scan=False)

    def dispatch(self) -> None:
        """Send queued tasks while their sockets have room, alternating the classes."""
        if not self.tenure.active:
            return
        for _ in range(BURST):
            sent = False
            for cls in CLASSES:
                s = self.tasks[cls]
                if self.disp.has_work(cls) and int(s.getsockopt(zmq.EVENTS)) & POLLOUT:
                    sent = self.send_one(cls, s) or sent
            if not sent:
                return

    def send_one(self, cls: str, s: zmq.Socket[Any]) -> bool:
        now = time.time()
        e = self.disp.next_task(cls, now)
        if e is None:
            return False
        t = e.task
        try:
            payload = self.store.read_original(t.job_id, t.image)
        except (ImgpipeError, OSError) as exc:
            self.disp.drop(t.task_id)
            self.store.fail(t.task_id, f"original image unreadable: {exc}", attempt=e.attempt)
            return True
        token = self.tenure.token
        if token is None or not self.tenure.valid(time.monotonic()):
            self.disp.put_back(t.task_id)
            return False  # the loop's next hold_lease() steps down
        try:
            marked = self.store.mark_dispatched(t.task_id, e.attempt, now=now,
                                                fence=(tenure.NAME, token))
        except Fenced as exc:
            self.tenure.counters["fenced"] += 1
            self.step_down(f"the job store refused a dispatch: {exc.detail}")
            return False
        if not marked:
            self.disp.drop(t.task_id)  # finished meanwhile
            return True
        task = Task(task_id=t.task_id, job_id=t.job_id, n=t.n, ops=t.ops, attempt=e.attempt,
                    cost=t.cost, queued_at=t.queued_at, dispatched_at=now,
                    deadline=now + self.settings.task_timeout_s,
                    lease=lease.token(self.lease_key, t.task_id, e.attempt), payload=payload)
        if not self.tenure.valid(time.monotonic()):
            # Paused between the write and the send: whoever holds the lease now
            # recovers it from the store (it is marked running).
            self.disp.put_back(t.task_id)
            return False
        try:
            s.send_multipart(encode(task), zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.disp.put_back(t.task_id)
            return False
        took = self.tenure.dispatched(time.time())
        if took is not None and took.dispatch_s is not None:
            self.execute([self.disp.event(
                "ventilator_takeover", time.time(),
                detail=f"first dispatch {took.dispatch_s:.2f} s after {took.previous}'s last "
                       f"renew (lease taken after {took.took_s:.2f} s, token {took.token})")])
        return True

    def execute(self, actions: list[Action], *, always: bool = False) -> None:
        """Carry out the dispatcher's actions: store writes only while the lease is
        valid, events on the bus only from the active ventilator (a standby's registry
        sees the same fleet) unless ``always``."""
        for a in actions:
            if isinstance(a, Fail):
                if not self.tenure.valid(time.monotonic()):
                    continue
                try:
                    self.store.fail(a.task_id, a.reason, attempt=a.attempt)
                except Exception:
                    log.exception("could not mark %s failed", a.task_id)
            elif isinstance(a, Event):
                if not (always or self.tenure.active):
                    continue
                level = logging.WARNING if a.what in ("worker_lost", "task_failed") \
                    else logging.INFO
                log.log(level, "%s %s %s %s", a.what, a.worker, a.task_id, a.detail)
                self.pub.send_multipart(encode_topic(a), zmq.NOBLOCK)

    def publish_metric(self, now: float) -> None:
        self.seq += 1
        msg = Metric(source=self.source, role="ventilator", seq=self.seq, ts=now,
                     values={**self.disp.metric_values(now), **self.tenure.metric_values()})
        self.pub.send_multipart(encode_topic(msg), zmq.NOBLOCK)


def run(settings: Settings, ctx: zmq.Context[Any], *, stop: threading.Event | None = None) -> None:
    auth = start_authenticator(ctx, settings)
    try:
        vent = Ventilator(settings, ctx)
        try:
            vent.loop(stop or threading.Event())
        finally:
            vent.close()
    finally:
        # Also when the constructor raised (the store unreachable, a port taken): the
        # authenticator's sockets would keep ctx.term() waiting for ever, and the
        # process would hang instead of exiting for its restart policy.
        if auth is not None:
            auth.stop()


def peer_key(frame: Any) -> str:
    """The CURVE public key (Z85) a message came with, "" on a plain plane."""
    try:
        return str(frame.get("User-Id"))
    except (zmq.ZMQError, AttributeError):
        return ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imgpipe ventilator", description=__doc__.split("\n")[0])
    add_settings_args(parser, "data_dir", "store_url", "bind_host", "intake_endpoint",
                      "light_task_endpoint", "heavy_task_endpoint", "bus_endpoint",
                      "event_endpoint", "control_endpoint", "dashboard_bus_endpoint",
                      "task_timeout_s", "max_attempts", "heartbeat_interval_s",
                      "heartbeat_liveness", "lost_visible_s", "rescan_interval_s",
                      "metrics_interval_s", "ventilator_lease_s", "log_level")
    settings = settings_from_args(parser.parse_args(list(argv or [])))
    return serve(run, settings, "ventilator")
