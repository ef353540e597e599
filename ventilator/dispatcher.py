"""The dispatcher's state machine, without sockets: queues, leases, re-dispatch.

Every open output the ventilator knows is one :class:`Entry`, either ``queued``
(waiting in the deque of its cost class) or ``inflight`` (sent, under a lease). The
service feeds it what arrives (store rescans, heartbeats, claims, sink ``Done``
events) and calls :meth:`Dispatcher.tick` with the time; it answers with actions
(:class:`Fail` and :class:`~core.protocol.Event`) for the service to carry out.
Times are seconds on one clock passed in by the caller, so tests drive it with a
fake clock.

A lease ends when its output is final (``Done``, or a rescan no longer lists it), or
is lost: its worker goes silent, its deadline passes, the worker hands it back
(``Done(retry)``), a finished result never reaches the sink, or nobody claims it
after a restart. A lost lease is dispatched again with ``attempt + 1``; one lost at
``max_attempts`` is failed with every reason, never retried forever.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from imgpipe.core.config import Settings
from imgpipe.core.protocol import Claim, Done, Event, Heartbeat, Metric
from imgpipe.core.records import OpenTask
from imgpipe.ventilator.registry import CLASSES, Registry
from imgpipe.ventilator.steal import stealable

# Why an in-flight lease carries a shortened deadline.
RECOVERED = "recovered"   # found `running` at start: a previous incarnation sent it
HANDOFF = "handoff"       # its worker no longer lists it: the result is on its way
SUSPECT = "suspect"       # unclaimed when a worker that could have taken it was lost

RECENT_EVENTS = 200       # events kept for the control op "events"
NOTICED_MAX = 256         # noticed jobs read by id; past that, one full rescan instead


@dataclass(frozen=True)
class Fail:
    """Mark ``task_id`` failed in the store with ``reason`` (attempts exhausted)."""

    task_id: str
    attempt: int
    reason: str


Action = Fail | Event


@dataclass
class Entry:
    task: OpenTask
    attempt: int                  # number of the last dispatch (0: never dispatched)
    state: str = "queued"         # queued | inflight
    worker: str | None = None     # who holds it, once a claim or heartbeat says so
    sock: str = ""                # task socket it went out on
    dispatched_at: float = 0.0
    claimed_at: float = 0.0
    deadline: float = 0.0
    note: str = ""
    token: int = 0                # matches its deque slot while queued
    reasons: list[str] = field(default_factory=list)

    @property
    def cls(self) -> str:
        return self.task.cost if self.task.cost in CLASSES else "light"


class Dispatcher:
    """Open outputs, their leases, and the worker registry; see the module docstring."""

    def __init__(self, settings: Settings, *, source: str = "ventilator",
                 is_final: Callable[[str], bool] = lambda _tid: False,
                 start: float = 0.0) -> None:
        self.task_timeout_s = settings.task_timeout_s
        self.max_attempts = settings.max_attempts
        self.beat_s = settings.heartbeat_interval_s
        self.grace_s = settings.liveness_s
        # A finished result may queue behind others on its way into a busy sink.
        self.handoff_s = 2 * settings.liveness_s
        self.rescan_s = settings.rescan_interval_s
        self.source = source
        self.is_final = is_final
        self.started = start
        self.registry = Registry(settings.liveness_s, settings.lost_visible_s)
        self.entries: dict[str, Entry] = {}
        self.queues: dict[str, deque[tuple[str, int]]] = {c: deque() for c in CLASSES}
        self._tokens = itertools.count(1)
        self.next_rescan = start
        self.noticed: set[str] = set()
        self.counters = {"dispatched": 0, "retries": 0, "lost_tasks": 0, "failed_tasks": 0,
                         "duplicates": 0, "recovered": 0, "adopted": 0, "stolen": 0,
                         "bad_messages": 0, "workers_lost": 0}
        # The last events, for a dashboard that starts after they happened.
        self.recent_events: deque[Event] = deque(maxlen=RECENT_EVENTS)

    # --- the job store ------------------------------------------------------------------
    def on_notice(self, job_id: str, now: float) -> None:
        """A job was recorded: read its outputs at once instead of at the next rescan.
        Past :data:`NOTICED_MAX` jobs waiting, one full rescan reads them all."""
        if len(self.noticed) < NOTICED_MAX:
            self.noticed.add(job_id)
        else:
            self.next_rescan = now

    def take_noticed(self) -> list[str]:
        """The jobs noticed since the last call (none when a full rescan is due)."""
        jobs, self.noticed = sorted(self.noticed), set()
        return jobs

    def wants_rescan(self, now: float) -> bool:
        return now >= self.next_rescan

    def load(self, tasks: Iterable[OpenTask], now: float, *, complete: bool,
             scan: bool = True) -> None:
        """Merge a store scan: new outputs are queued, ``running`` ones leased for recovery.

        ``scan`` False: the outputs of noticed jobs only, which leaves the next full
        rescan where it was.

        An output found ``running`` that this process never sent was sent by a
        previous incarnation: it gets a short lease instead of a new dispatch, so
        heartbeats listing it can reclaim it without a storm of duplicates. With
        ``complete`` (the scan was not cut by its limit) anything known but no longer
        listed became final, which covers ``Done`` events this process missed.
        """
        if scan:
            self.next_rescan = now + self.rescan_s
            self.noticed = set()  # a full scan read them too
        listed = set()
        for t in tasks:
            listed.add(t.task_id)
            if t.task_id in self.entries:
                continue
            e = self.entries[t.task_id] = Entry(task=t, attempt=t.attempts)
            if t.state == "running":
                e.state, e.note, e.dispatched_at = "inflight", RECOVERED, now
                e.deadline = now + self.grace_s
                self.counters["recovered"] += 1
            else:
                self._enqueue(e)
        if complete:
            for tid in [tid for tid in self.entries if tid not in listed]:
                del self.entries[tid]

    # --- dispatch -----------------------------------------------------------------------
    def next_task(self, sock: str, now: float) -> Entry | None:
        """The next task to send on task socket ``sock`` (now in flight), or None.

        Classes routed to ``sock`` (its own, or the other one when nobody serves that)
        are served oldest head first. The caller sends it, or hands it back with
        :meth:`put_back` (socket full) or :meth:`drop` (already final).
        """
        heads = [(self._head(c), c) for c in CLASSES if self.registry.route(c) == sock]
        ready = [(e.task.queued_at, c) for e, c in heads if e is not None]
        if not ready:
            return None
        _, cls = min(ready)
        e = self._pop(cls)
        e.attempt += 1
        e.state, e.worker, e.sock, e.note = "inflight", None, sock, ""
        e.dispatched_at, e.claimed_at = now, 0.0
        e.deadline = now + self.task_timeout_s + self.beat_s
        self.counters["dispatched"] += 1
        return e

    def has_work(self, sock: str) -> bool:
        return any(self.registry.route(c) == sock and self._head(c) is not None
                   for c in CLASSES)

    def put_back(self, tid: str) -> None:
        """Undo :meth:`next_task` (the socket was full): same attempt, front of the queue."""
        e = self.entries.get(tid)
        if e is not None and e.state == "inflight":
            e.attempt -= 1
            self.counters["dispatched"] -= 1
            self._enqueue(e, front=True)

    def drop(self, tid: str) -> None:
        self.entries.pop(tid, None)

    def forget(self) -> None:
        """Drop every open output and lease (the ventilator lost its own lease: the next
        holder recovers them from the store). The registry and counters stay."""
        self.entries.clear()
        for q in self.queues.values():
            q.clear()
        self.noticed = set()
        self.next_rescan = 0.0

    # --- the bus --------------------------------------------------------------------------
    def on_heartbeat(self, hb: Heartbeat, now: float, peer: str = "") -> list[Action]:
        """Registry update plus lease reconciliation with the worker's in-flight list
        (nothing, when the registry refuses the heartbeat)."""
        known = self.registry.heartbeat(hb, now, peer)
        if known is None:
            return []
        event, restarted = known
        actions: list[Action] = []
        if event:
            actions.append(self._event(event, now, worker=hb.worker,
                                       detail=f"{hb.host} pid {hb.pid} serves {hb.serves}"))
        listed = set(hb.inflight)
        for e in self._inflight():
            tid = e.task.task_id
            if tid in listed and e.worker is None:
                self._adopt(e, hb.worker, now)
            elif e.worker == hb.worker and restarted and tid not in listed:
                actions += self._lost(e, f"worker {hb.worker} restarted", now)
            elif (e.worker == hb.worker and tid not in listed and e.note == ""
                  and now - e.claimed_at > 1.5 * self.beat_s):
                # Finished there: the result is on its way to the sink.
                e.note = HANDOFF
                e.deadline = min(e.deadline, now + self.handoff_s)
        return actions

    def on_claim(self, claim: Claim, now: float) -> None:
        e = self.entries.get(claim.task_id)
        if e is not None and e.state == "inflight" and claim.attempt >= e.attempt:
            self._adopt(e, claim.worker, now)

    def on_metric(self, msg: Metric, now: float) -> None:
        self.registry.metric(msg, now)

    def on_done(self, done: Done, now: float) -> list[Action]:
        """The sink finished, refused as duplicate, or was handed back an output."""
        if done.state == "duplicate":
            self.counters["duplicates"] += 1
            return []
        e = self.entries.get(done.task_id)
        if e is None:
            return []
        if done.state in ("done", "failed"):
            del self.entries[done.task_id]
            return []
        if done.state == "retry" and e.state == "inflight" \
                and done.attempt in (0, e.attempt):
            who = f" on {e.worker}" if e.worker else ""
            return self._lost(e, f"{done.error or 'handed back'}{who}", now, lost=False)
        return []

    # --- time -------------------------------------------------------------------------------
    def tick(self, now: float) -> list[Action]:
        """Declare silent workers lost and act on every lease whose deadline passed."""
        actions: list[Action] = []
        for w in self.registry.expire(now):
            self.counters["workers_lost"] += 1
            actions.append(self._event("worker_lost", now, worker=w.hb.worker,
                                       detail=f"no heartbeat for {self.grace_s:g} s"))
            for e in self._inflight():
                if e.worker == w.hb.worker:
                    actions += self._lost(e, f"worker {w.hb.worker} lost", now)
                elif e.worker is None and e.note == "" and w.serves(e.sock):
                    # It may sit unread in the lost worker's socket buffers.
                    e.note = SUSPECT
                    e.deadline = min(e.deadline, now + self.grace_s)
        actions += self._steal(now)
        sink_alive = self.registry.seen_within("sink", self.grace_s, now)
        for e in self._inflight():
            if e.deadline > now:
                continue
            if self.is_final(e.task.task_id):
                del self.entries[e.task.task_id]
            elif e.note == HANDOFF and not sink_alive:
                e.deadline = now + self.handoff_s  # results wait in the worker's queue
            else:
                actions += self._lost(e, self._expiry_reason(e), now)
        return actions

    # --- answers ----------------------------------------------------------------------------
    def queued(self) -> dict[str, int]:
        out = dict.fromkeys(CLASSES, 0)
        for e in self.entries.values():
            if e.state == "queued":
                out[e.cls] += 1
        return out

    def stats(self, now: float) -> dict[str, Any]:
        queued = self.queued()
        c = self.counters
        return {
            "queue_depth": sum(queued.values()), "queued": queued,
            "inflight": sum(1 for _ in self._inflight()),
            "dispatched": c["dispatched"], "retries": c["retries"],
            "lost_tasks": c["lost_tasks"], "failed_tasks": c["failed_tasks"],
            "duplicates": c["duplicates"], "recovered": c["recovered"],
            "stolen": c["stolen"], "bad_messages": c["bad_messages"],
            "workers_lost": c["workers_lost"],
            "heartbeats_refused": self.registry.refused,
            "workers": self.registry.counts(),
            "components": self.registry.component_ages(now),
            "uptime_s": round(now - self.started, 3),
        }

    def metric_values(self, now: float) -> dict[str, Any]:
        s = self.stats(now)
        values = {k: v for k, v in s.items() if isinstance(v, int | float)}
        values.update({f"queued_{k}": v for k, v in s["queued"].items()})
        values.update({f"workers_{k}": v for k, v in s["workers"].items()})
        return values

    # --- internals ----------------------------------------------------------------------------
    def _inflight(self) -> list[Entry]:
        return [e for e in self.entries.values() if e.state == "inflight"]

    def _adopt(self, e: Entry, worker: str, now: float) -> None:
        if e.note in (RECOVERED, SUSPECT):
            self.counters["adopted"] += e.note == RECOVERED
            e.deadline = now + self.task_timeout_s + self.beat_s
        e.worker, e.claimed_at, e.note = worker, now, ""

    def _enqueue(self, e: Entry, *, front: bool = False) -> None:
        e.state, e.worker, e.note = "queued", None, ""
        e.token = next(self._tokens)
        slot = (e.task.task_id, e.token)
        if front:
            self.queues[e.cls].appendleft(slot)
        else:
            self.queues[e.cls].append(slot)

    def _head(self, cls: str) -> Entry | None:
        """The first valid entry of ``cls``'s deque (stale slots are discarded)."""
        q = self.queues[cls]
        while q:
            tid, token = q[0]
            e = self.entries.get(tid)
            if e is not None and e.state == "queued" and e.token == token:
                return e
            q.popleft()
        return None

    def _pop(self, cls: str) -> Entry:
        e = self._head(cls)
        assert e is not None
        self.queues[cls].popleft()
        return e

    def _lost(self, e: Entry, reason: str, now: float, *, lost: bool = True) -> list[Action]:
        tid = e.task.task_id
        e.reasons.append(f"{reason} (attempt {e.attempt})")
        if lost:
            self.counters["lost_tasks"] += 1
        if e.attempt >= self.max_attempts:
            del self.entries[tid]
            self.counters["failed_tasks"] += 1
            why = f"lost on {e.attempt} attempts: " + "; ".join(e.reasons)
            return [Fail(tid, e.attempt, why),
                    self._event("task_failed", now, task_id=tid, worker=e.worker or "",
                                detail=why)]
        self.counters["retries"] += 1
        self._enqueue(e, front=True)
        return [self._event("task_retried", now, task_id=tid, detail=reason)]

    def _steal(self, now: float) -> list[Action]:
        """Copy tasks parked unread behind busy workers while others idle (see steal.py)."""
        actions: list[Action] = []
        for e in stealable(self, now):
            self.counters["stolen"] += 1
            self.counters["retries"] += 1
            e.reasons.append(f"copied: unclaimed while a worker idled (attempt {e.attempt})")
            self._enqueue(e, front=True)
            actions.append(self._event("task_retried", now, task_id=e.task.task_id,
                                       detail="not claimed while a worker idled; copy sent"))
        return actions

    def _expiry_reason(self, e: Entry) -> str:
        if e.note == RECOVERED:
            return f"not reclaimed within {self.grace_s:g} s of a ventilator restart"
        if e.note == HANDOFF:
            return f"result from {e.worker} never reached the sink"
        if e.note == SUSPECT:
            return "not claimed after a worker that could hold it was lost"
        return f"deadline passed on {e.worker or 'an unknown worker'}"

    def event(self, what: str, now: float, **kw: str) -> Event:
        """An event of this ventilator's own (its lease), kept with the others."""
        return self._event(what, now, **kw)

    def _event(self, what: str, now: float, **kw: str) -> Event:
        event = Event(source=self.source, what=what, ts=now, **kw)
        self.recent_events.append(event)
        return event
