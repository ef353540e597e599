"""The worker registry (service discovery) and the components heard on the bus.

A worker is alive from its first heartbeat and lost once ``liveness_s`` passes
without one (``heartbeat_interval_s x heartbeat_liveness``). Ages are measured on
this process's clock at receipt, never from the worker's ``ts``, so clock skew
between hosts cannot make a worker look dead or alive. A lost worker stays listed
with state ``lost`` for ``lost_visible_s``; a heartbeat from it makes it alive again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imgpipe.core.protocol import Heartbeat, Metric

CLASSES = ("light", "heavy")
ROLES = ("gateway", "ventilator", "sink", "worker", "dashboard", "supervisor")
MAX_WORKERS = 1024  # ids are peer-supplied: past this, new ids wait for old ones to expire


@dataclass
class WorkerInfo:
    """What the last heartbeat of one worker said, plus when it arrived (seconds)."""

    hb: Heartbeat
    seen: float
    lost_at: float | None = None
    peer: str = ""  # the CURVE key its heartbeats come with ("" on a plain plane)

    @property
    def alive(self) -> bool:
        return self.lost_at is None

    def serves(self, cls: str) -> bool:
        return self.hb.serves in (cls, "all")

    @property
    def state(self) -> str:
        if not self.alive:
            return "lost"
        if self.hb.state in ("idle", "busy"):
            return self.hb.state
        return "busy" if self.hb.free <= 0 else "idle"


class Registry:
    """Live and recently lost workers, and the last time each component role was heard."""

    def __init__(self, liveness_s: float, lost_visible_s: float) -> None:
        self.liveness_s = liveness_s
        self.lost_visible_s = lost_visible_s
        self.workers: dict[str, WorkerInfo] = {}
        self.components: dict[str, float] = {}
        self.refused = 0  # heartbeats dropped: registry full, or a live id from another key
        # route() answers, kept until a heartbeat or expiry changes who is alive: the
        # dispatch loop asks several times per task.
        self._routes: dict[str, str | None] = {}

    def heartbeat(self, hb: Heartbeat, now: float,
                  peer: str = "") -> tuple[str | None, bool] | None:
        """Record ``hb``; (event, whether this is a restarted process under a known id),
        or None when it is refused.

        The event is ``worker_joined``, ``worker_returned`` (a lost worker beats again,
        e.g. after SIGCONT) or None. A worker id seen again with another pid or
        ``started`` time is a new process: whatever the old one held is gone. ``peer``
        is the CURVE key the heartbeat came with: a live worker's id is answered for
        only by the key it joined with, so no other key holder can pose as it.
        """
        old = self.workers.get(hb.worker)
        if old is not None and old.alive and old.peer != peer:
            self.refused += 1
            return None
        if old is None and len(self.workers) >= MAX_WORKERS:
            self.expire(now)
            if len(self.workers) >= MAX_WORKERS:
                self.refused += 1
                return None
        self.components["worker"] = now
        self._routes.clear()
        restarted = old is not None and (
            old.hb.pid != hb.pid
            or bool(old.hb.started and hb.started and old.hb.started != hb.started))
        if old is None or restarted:
            self.workers[hb.worker] = WorkerInfo(hb=hb, seen=now, peer=peer)
            return "worker_joined", restarted
        event = "worker_returned" if not old.alive else None
        old.hb, old.seen, old.lost_at, old.peer = hb, now, None, peer
        return event, False

    def metric(self, msg: Metric, now: float) -> None:
        if msg.role in ROLES:  # a peer-supplied key: only the known roles are kept
            self.components[msg.role] = now

    def expire(self, now: float) -> list[WorkerInfo]:
        """Mark workers silent for ``liveness_s`` lost (returned), forget old lost ones."""
        lost = []
        for wid, w in list(self.workers.items()):
            if w.alive and now - w.seen > self.liveness_s:
                w.lost_at = now
                lost.append(w)
                self._routes.clear()
            elif not w.alive and w.lost_at is not None \
                    and now - w.lost_at > self.lost_visible_s:
                del self.workers[wid]
        return lost

    def alive(self) -> list[WorkerInfo]:
        return [w for w in self.workers.values() if w.alive]

    def route(self, cls: str) -> str | None:
        """The task socket a task of class ``cls`` goes out on, or None to keep it queued.

        Its own class when a live worker serves it, else the other class's socket
        when any live worker is there (fallback), else None (nobody is alive).
        """
        if cls in self._routes:
            return self._routes[cls]
        alive = self.alive()
        other = CLASSES[1 - CLASSES.index(cls)] if cls in CLASSES else "light"
        route = (cls if any(w.serves(cls) for w in alive) else
                 other if any(w.serves(other) for w in alive) else None)
        self._routes[cls] = route
        return route

    def seen_within(self, role: str, seconds: float, now: float) -> bool:
        last = self.components.get(role)
        return last is not None and now - last <= seconds

    # --- answers for the control socket ----------------------------------------------
    def listing(self, now: float) -> list[dict[str, Any]]:
        rows = []
        for wid, w in sorted(self.workers.items()):
            hb = w.hb
            rows.append({
                "id": wid, "host": hb.host, "pid": hb.pid, "state": w.state,
                "serves": hb.serves, "slots": hb.slots, "free": hb.free,
                "inflight": len(hb.inflight), "done": hb.done, "failed": hb.failed,
                "cpu": hb.cpu, "rss": hb.rss, "shm_bytes": hb.shm_bytes, "note": hb.note,
                "last_beat_age_s": round(now - w.seen, 3), "started": hb.started,
            })
        return rows

    def counts(self) -> dict[str, int]:
        states = [w.state for w in self.workers.values()]
        return {"alive": sum(s != "lost" for s in states), "busy": states.count("busy"),
                "idle": states.count("idle"), "lost": states.count("lost")}

    def component_ages(self, now: float) -> dict[str, float]:
        return {role: round(now - t, 3) for role, t in sorted(self.components.items())}
