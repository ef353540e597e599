"""Scaling advice from live numbers: SCALE_UP, MAINTAIN or SCALE_DOWN, with the reason.

:func:`recommend` is pure: it reads one observation in the shape of the gateway's
``GET /api/metrics`` (``queue_depth``, ``in_flight``, ``throughput_per_s``,
``workers`` ``{alive, busy, idle, lost}``, optional ``queue_trend_per_s`` and
``latency_ms``) and answers ``{"action", "reason", "workers"}``. The gateway, the
terminal monitor and the dashboard all call it, so they always agree.

Rules, first match wins (``util`` = busy / alive workers):

1. no live worker and work waiting (queue or in flight)   -> SCALE_UP to at least 1;
2. ``util >= 0.8`` and the queue is non-empty or growing
   (``queue_trend_per_s > 0.1`` outputs/s)                  -> SCALE_UP;
3. ``util <= 0.3``, queue empty and not growing, more than
   one worker alive                                         -> SCALE_DOWN;
4. anything else                                            -> MAINTAIN.

The suggested count follows Little's law (L = λ·W). One busy worker completes
``mu = throughput / busy`` outputs/s. To keep up with arrivals (``throughput +
queue_trend``) *and* drain today's queue within ``DRAIN_TARGET_S`` seconds the fleet
needs ``(arrivals + queue / DRAIN_TARGET_S) / mu`` workers. Before anything has
completed ``mu`` is unknown and the fleet grows by one. A step never more than
doubles the fleet (estimates from a few seconds of data are noisy); scaling down
keeps enough workers for the current load at ``TARGET_UTIL`` and at most halves the
fleet per step. "Queue empty *for a while*" is the caller's business: the
:class:`Autoscaler` acts only on a decision that holds for several observations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

SCALE_UP = "SCALE_UP"
MAINTAIN = "MAINTAIN"
SCALE_DOWN = "SCALE_DOWN"

UP_UTIL = 0.8          # busy share at or above which a waiting queue means "too few workers"
DOWN_UTIL = 0.3        # busy share at or below which an empty queue means "too many"
TREND_EPS = 0.1        # queue growth, outputs/s, that counts as "growing"
DRAIN_TARGET_S = 10.0  # seconds in which a scaled-up fleet should empty the queue
TARGET_UTIL = 0.6      # busy share a scaled-down fleet should run at


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _num(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return 0.0
    return out if math.isfinite(out) and out > 0 else 0.0


def recommend(m: dict[str, Any]) -> dict[str, Any]:
    """Advice for one observation of ``/api/metrics`` (missing numbers count as 0)."""
    fleet = _dict(m.get("workers"))
    alive = int(_num(fleet.get("alive")))
    busy = min(int(_num(fleet.get("busy"))), alive)
    lost = int(_num(fleet.get("lost")))
    queue = int(_num(m.get("queue_depth")))
    in_flight = int(_num(m.get("in_flight", m.get("inflight"))))
    rate = _num(m.get("throughput_per_s"))
    trend_raw = m.get("queue_trend_per_s")
    trend = float(trend_raw) if isinstance(trend_raw, (int, float)) and math.isfinite(
        trend_raw) else 0.0
    growing = trend > TREND_EPS
    util = busy / alive if alive else 0.0
    lost_note = f"; {lost} lost" if lost else ""

    if alive == 0:
        if queue or in_flight:
            return _advice(SCALE_UP, max(1, _needed(queue, rate, trend, 0, 0)),
                           f"no live worker while {queue} queued and {in_flight} in flight"
                           f"{lost_note}")
        return _advice(MAINTAIN, 0, f"no live worker and nothing queued{lost_note}")

    if util >= UP_UTIL and (queue > 0 or growing):
        want = _needed(queue, rate, trend, busy, alive)
        want = min(max(want, alive + 1), 2 * alive + 1)
        grow = f", growing {trend:.1f}/s" if growing else ""
        speed = (f"; {rate:.1f} outputs/s now, {rate / busy:.2f}/s per busy worker"
                 if rate and busy else "; no output finished yet")
        return _advice(SCALE_UP, want,
                       f"{util:.0%} of {alive} workers busy with {queue} queued{grow}{speed}"
                       f" (target: drain in {DRAIN_TARGET_S:.0f} s){lost_note}")

    if util <= DOWN_UTIL and queue == 0 and trend <= 0 and alive > 1:
        want = max(1, math.ceil(busy / TARGET_UTIL), math.ceil(alive / 2))
        if want < alive:
            return _advice(SCALE_DOWN, want,
                           f"only {busy} of {alive} workers busy and the queue is empty"
                           f"{lost_note}")

    if queue and util < UP_UTIL:
        why = f"{busy} of {alive} workers busy; they are taking the {queue} queued"
    elif util >= UP_UTIL:
        why = f"{util:.0%} of {alive} workers busy and keeping up (queue empty)"
    elif alive == 1 and busy == 0:
        why = "idle, already at one worker"
    else:
        why = f"{busy} of {alive} workers busy, queue {queue}"
    return _advice(MAINTAIN, alive, why + lost_note)


def _needed(queue: int, rate: float, trend: float, busy: int, alive: int) -> int:
    """Workers that keep up with arrivals and drain ``queue`` in DRAIN_TARGET_S (Little)."""
    if not rate or not busy:
        return alive + 1
    per_worker = rate / busy
    arrivals = max(rate + trend, 0.0)
    return max(1, math.ceil((arrivals + queue / DRAIN_TARGET_S) / per_worker))


def _advice(action: str, workers: int, reason: str) -> dict[str, Any]:
    return {"action": action, "reason": reason, "workers": int(workers)}


@dataclass
class Autoscaler:
    """Turns a stream of advice into worker counts, without flapping.

    ``observe(metrics, now)`` is called about once a second with ``/api/metrics``
    numbers and ``now`` in seconds (any monotonic clock). It answers a new worker
    count, or None to keep the current one. A SCALE_UP must hold for ``up_hold``
    consecutive observations and a SCALE_DOWN for ``down_hold`` (scale up fast, down
    slowly, as Kubernetes' HPA does); after any change, ``cooldown_s`` passes before
    the next, so new workers have time to start and show up in the numbers. A count
    outside ``[lo, hi]`` is corrected at once.
    """

    lo: int
    hi: int
    current: int | None = None
    up_hold: int = 2
    down_hold: int = 10
    cooldown_s: float = 5.0
    _action: str = field(default=MAINTAIN, repr=False)
    _streak: int = field(default=0, repr=False)
    _changed_at: float | None = field(default=None, repr=False)
    last: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.lo <= self.hi:
            raise ValueError(f"autoscale range {self.lo}:{self.hi}: need 1 <= MIN <= MAX")

    def observe(self, metrics: dict[str, Any], now: float) -> int | None:
        advice = recommend(metrics)
        self.last = advice
        if self.current is None:
            fleet = _dict(metrics.get("workers"))
            self.current = int(_num(fleet.get("alive")))
        if not self.lo <= self.current <= self.hi:
            return self._change(min(max(self.current, self.lo), self.hi), now)
        action = advice["action"]
        self._streak = self._streak + 1 if action == self._action else 1
        self._action = action
        if action == MAINTAIN:
            return None
        if self._changed_at is not None and now - self._changed_at < self.cooldown_s:
            return None
        hold = self.up_hold if action == SCALE_UP else self.down_hold
        if self._streak < hold:
            return None
        target = min(max(advice["workers"], self.lo), self.hi)
        if (action == SCALE_UP and target <= self.current) or (
                action == SCALE_DOWN and target >= self.current):
            return None
        return self._change(target, now)

    def _change(self, target: int, now: float) -> int:
        self.current = target
        self._changed_at = now
        self._streak = 0
        return target
