"""What the dashboard knows about the fleet, folded from bus messages (no sockets here).

:class:`FleetState` takes decoded bus messages (``handle``) and once a second a sample
(``sample``), under one lock, and hands out consistent copies (``snapshot``):

* workers by id: the last heartbeat plus when it arrived; a worker silent for
  ``settings.liveness_s`` shows as ``lost`` and is forgotten ``lost_visible_s`` later;
* the last metric of every source (``Metric.values``) and its role;
* a time series, one point a second: throughput, latency percentiles, queue depth,
  in flight, busy and alive workers (``history`` points: 10 minutes by default);
* mean time per stage for each worker (``{stage}_ms_mean`` in its metric values), plus
  the gateway's mean over every recent output;
* the newest ``events`` events (worker joined/lost, retries, failed tasks);
* telemetry gaps: PUB drops silently at its high-water mark, so every publisher numbers
  its heartbeats and its metrics (``seq``, per source and kind) and :class:`SeqTracker`
  counts the numbers never seen.

Sources of each number: throughput is the sum of the workers' own windowed rates
(metric ``throughput``), else the growth of their heartbeat ``done`` counters; queue
depth and in flight come from the ventilator's metric (else the gateway's
``/api/metrics``, else in-flight ids in heartbeats); latency percentiles exist only in
the job store, so they come from the gateway's ``/api/metrics`` (see ``Collector``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from imgpipe.core.config import Settings
from imgpipe.core.errors import ProtocolError
from imgpipe.core.protocol import (
    WORK_STAGES,
    Event,
    Heartbeat,
    Message,
    Metric,
    decode_topic,
)

log = logging.getLogger(__name__)

RATE_WINDOW_S = 5.0   # throughput is averaged over this many seconds of done counters
FRESH_S = 5.0         # a metric older than this no longer feeds the live numbers
POLL_S = 1.0          # the gateway's /api/metrics is read this often (when a URL is set)
GATEWAY_STAGES = "all outputs (gateway)"


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def _stages(values: dict[str, Any]) -> dict[str, float]:
    """Mean ms per stage from a worker's metric values (``decode_ms_mean``, ...)."""
    out = {}
    for stage in WORK_STAGES:
        v = _number(values.get(f"{stage}_ms_mean"))
        if v is not None:
            out[stage] = v
    return out


@dataclass
class SourceSeq:
    """Sequence bookkeeping of one publisher for one kind of message."""

    last: int
    received: int = 1
    missed: int = 0
    restarts: int = 0


MAX_PEERS = 1024  # workers and metric sources kept; their ids are whatever peers send
STALE_SOURCE_S = 300.0  # a metric source silent this long is forgotten


class SeqTracker:
    """Counts messages missed between consecutive sequence numbers of each source.

    A number lower than or equal to the last one means the publisher restarted (its
    counter began again); that is counted as a restart, not as missed messages.
    """

    def __init__(self, limit: int = 2 * MAX_PEERS) -> None:
        self.sources: dict[tuple[str, str], SourceSeq] = {}
        self.limit = limit

    def see(self, kind: str, source: str, seq: int) -> int:
        """Record ``seq``; return how many messages were missed just before it.
        Sources past ``limit`` (peer-supplied names) are not tracked."""
        state = self.sources.get((kind, source))
        if state is None:
            if len(self.sources) < self.limit:
                self.sources[(kind, source)] = SourceSeq(last=seq)
            return 0
        state.received += 1
        missed = 0
        if seq > state.last + 1:
            missed = seq - state.last - 1
            state.missed += missed
        elif seq <= state.last:
            state.restarts += 1
        state.last = seq
        return missed

    @property
    def missed(self) -> int:
        return sum(s.missed for s in self.sources.values())

    def rows(self) -> list[dict[str, Any]]:
        return [{"source": src, "kind": kind, "received": s.received, "missed": s.missed,
                 "restarts": s.restarts, "last_seq": s.last}
                for (kind, src), s in sorted(self.sources.items(), key=lambda kv: kv[0][::-1])]


@dataclass
class Snapshot:
    """A consistent copy of the collector's state at ``now`` (seconds since the epoch)."""

    now: float
    started: float
    endpoint: str
    workers: list[dict[str, Any]] = field(default_factory=list)
    series: list[dict[str, Any]] = field(default_factory=list)
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    gaps: list[dict[str, Any]] = field(default_factory=list)
    missed: int = 0
    received: int = 0
    bad: int = 0
    gateway: dict[str, Any] | None = None
    gateway_error: str = ""


class FleetState:
    """Folds bus messages into a snapshot; socket-free (the Collector feeds it)."""

    def __init__(self, settings: Settings, *, history: int = 600, events: int = 200) -> None:
        self.settings = settings
        self.endpoint = settings.dashboard_bus_endpoint
        self._lock = threading.Lock()
        self._started = time.time()
        self._workers: dict[str, dict[str, Any]] = {}
        self._sources: dict[str, dict[str, Any]] = {}
        self._series: deque[dict[str, Any]] = deque(maxlen=history)
        self._events: deque[dict[str, Any]] = deque(maxlen=events)
        self._done: deque[tuple[float, int]] = deque(maxlen=64)
        self._completed = 0
        self._seq = SeqTracker()
        self._received = 0
        self._bad = 0
        self._gateway: tuple[float, dict[str, Any] | None] = (0.0, None)
        self._gateway_error = ""
        self.error = ""

    def handle(self, msg: Message, now: float) -> None:
        """Fold one decoded bus message, received at ``now``."""
        with self._lock:
            self._received += 1
            if isinstance(msg, Heartbeat):
                if not _room(self._workers, msg.worker):
                    self._bad += 1
                    return
                self._seq.see("heartbeat", msg.worker, msg.seq)
                self._heartbeat(msg, now)
            elif isinstance(msg, Metric):
                if not _room(self._sources, msg.source):
                    self._bad += 1
                    return
                self._seq.see("metric", msg.source, msg.seq)
                self._sources[msg.source] = {"role": msg.role, "seen": now, "ts": msg.ts,
                                             "values": dict(msg.values)}
            elif isinstance(msg, Event):
                self._events.append({"ts": msg.ts, "source": msg.source, "what": msg.what,
                                     "worker": msg.worker, "task_id": msg.task_id,
                                     "detail": msg.detail})

    def seed_events(self, rows: list[Any]) -> int:
        """Put the ventilator's recent events (oldest first) before the ones heard live,
        so the log starts with what happened before this page; how many were taken."""
        keys = ("ts", "source", "what", "worker", "task_id", "detail")
        with self._lock:
            first = self._events[0]["ts"] if self._events else float("inf")
            older = [{k: r.get(k, "") for k in keys} for r in rows
                     if isinstance(r, dict) and isinstance(r.get("ts"), int | float)
                     and r["ts"] < first]
            room = (self._events.maxlen or 0) - len(self._events)
            older = older[-room:] if room > 0 else []
            self._events.extendleft(reversed(older))
        return len(older)

    def handle_frames(self, frames: list[Any], now: float) -> None:
        """Decode and fold one bus message; a bad one is counted and logged, not raised."""
        try:
            self.handle(decode_topic(frames), now)
        except Exception as exc:  # noqa: BLE001 - a peer's frame never stops the collector
            with self._lock:
                self._bad += 1
            if isinstance(exc, ProtocolError):
                log.warning("bad bus message: %s", exc)
            else:
                log.exception("error handling a bus message")

    def _heartbeat(self, hb: Heartbeat, now: float) -> None:
        old = self._workers.get(hb.worker)
        # A new or restarted worker's count only counts from its first beat seen here.
        if old is not None and old["pid"] == hb.pid and hb.done >= old["done"]:
            self._completed += hb.done - old["done"]
        row = {"id": hb.worker, "host": hb.host, "pid": hb.pid, "state": hb.state,
               "serves": hb.serves, "slots": hb.slots, "free": hb.free,
               "inflight": list(hb.inflight), "done": hb.done, "failed": hb.failed,
               "cpu": hb.cpu, "rss": hb.rss, "started": hb.started, "seen": now,
               "beat_ts": hb.ts}
        self._workers[hb.worker] = row

    def sample(self, now: float) -> dict[str, Any]:
        """Append one time-series point built from the freshest numbers; return it."""
        with self._lock:
            self._expire(now)
            self._done.append((now, self._completed))
            alive = [w for w in self._workers.values() if w["state"] != "lost"]
            point: dict[str, Any] = {
                "ts": now, "alive": len(alive),
                "busy": sum(1 for w in alive if w["state"] == "busy"),
                "throughput": self._throughput(now), "p50": None, "p95": None, "p99": None,
                "queue_depth": None,
                "inflight": sum(len(w["inflight"]) for w in alive)}
            gw = self._gateway_doc(now)
            if gw is not None:
                lat = _dict(gw.get("latency_ms"))
                for key in ("p50", "p95", "p99"):
                    point[key] = _number(lat.get(key))
                point["queue_depth"] = _number(gw.get("queue_depth"))
            for src in self._fresh(now):
                # A standby ventilator (active=0) dispatches nothing: its zeros are not
                # the queue. (An older ventilator sends no "active": it is the one.)
                if src["role"] == "ventilator" and src["values"].get("active", 1):
                    for key in ("queue_depth", "inflight"):
                        if _number(src["values"].get(key)) is not None:
                            point[key] = src["values"][key]
            self._series.append(point)
            return point

    def _fresh(self, now: float) -> list[dict[str, Any]]:
        return [s for s in self._sources.values() if now - s["seen"] <= FRESH_S]

    def _gateway_doc(self, now: float) -> dict[str, Any] | None:
        seen, doc = self._gateway
        return doc if doc is not None and now - seen <= FRESH_S else None

    def _throughput(self, now: float) -> float:
        """Outputs/s: the workers' own windowed rates, else growth of heartbeat counters."""
        rates = [_number(s["values"].get("throughput")) for s in self._fresh(now)
                 if s["role"] == "worker"]
        if any(r is not None for r in rates):
            return float(sum(r for r in rates if r is not None))
        past = [(t, c) for t, c in self._done if now - t <= RATE_WINDOW_S]
        if len(past) < 2 or past[-1][0] <= past[0][0]:
            return 0.0
        return (past[-1][1] - past[0][1]) / (past[-1][0] - past[0][0])

    def set_gateway_metrics(self, doc: dict[str, Any] | None, now: float,
                            error: str = "") -> None:
        """Record the gateway's ``/api/metrics`` answer (None and why when it failed)."""
        with self._lock:
            if doc is not None:
                self._gateway = (now, doc)
            self._gateway_error = error

    def _expire(self, now: float) -> None:
        for sid, src in list(self._sources.items()):
            if now - src["seen"] > STALE_SOURCE_S:
                del self._sources[sid]
        liveness = self.settings.liveness_s
        for wid, w in list(self._workers.items()):
            silent = now - w["seen"]
            if silent > liveness + self.settings.lost_visible_s:
                del self._workers[wid]
            elif silent > liveness:
                w["state"] = "lost"

    def snapshot(self, now: float | None = None) -> Snapshot:
        """Copies (or documents never changed in place), safe to read while the thread
        goes on folding messages."""
        now = time.time() if now is None else now
        with self._lock:
            self._expire(now)
            stages = {sid: st for sid, src in sorted(self._sources.items())
                      if src["role"] == "worker" and (st := _stages(src["values"]))}
            gw = self._gateway_doc(now)
            if gw is not None and isinstance(gw.get("stages_ms"), dict):
                fleet = {k: float(v) for k, v in gw["stages_ms"].items()
                         if _number(v) is not None}
                if fleet:
                    stages[GATEWAY_STAGES] = fleet
            workers = [dict(w, inflight=list(w["inflight"]), age_s=now - w["seen"])
                       for w in sorted(self._workers.values(), key=lambda w: w["id"])]
            return Snapshot(now=now, started=self._started, endpoint=self.endpoint,
                            workers=workers, series=list(self._series),
                            stages=stages,
                            events=list(self._events), gaps=self._seq.rows(),
                            missed=self._seq.missed, received=self._received,
                            bad=self._bad,
                            # Never mutated: set_gateway_metrics replaces the document.
                            gateway=gw,
                            gateway_error=self._gateway_error)



def _room(peers: dict[str, Any], key: str) -> bool:
    """Whether ``key`` is known or there is room for one more (ids come from peers)."""
    return key in peers or len(peers) < MAX_PEERS
