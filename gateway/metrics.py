"""The numbers behind ``GET /api/metrics`` and ``GET /metrics``, from one place.

:func:`fleet_metrics` is pure: it reads the job store (the truth about outputs: what
is queued, running, finished and how long it took) and the ventilator's ``stats``
answer (the truth about workers), and returns the JSON document. The Prometheus
collector turns the same document into metric families, so both views agree.

Request counters (by status, upload bytes, latency) are per gunicorn worker; under
gunicorn they use prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``
set by ``imgpipe gateway`` before the workers start) so a scrape sums every worker.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from imgpipe.core.protocol import WORK_STAGES
from imgpipe.core.store import Store
from imgpipe.gateway.pipeline import percentiles

THROUGHPUT_WINDOW_S = 10.0   # outputs finished in this window give throughput_per_s
LATENCY_WINDOW_S = 60.0      # outputs finished in this window give latency and stages
TREND_SPAN_S = 15.0          # queue-depth samples this old give queue_trend_per_s
WORKER_STATES = ("alive", "busy", "idle", "lost")


class QueueHistory:
    """Recent (time, queue depth) samples of this process, for the queue trend."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._samples: deque[tuple[float, int]] = deque(maxlen=256)

    def trend(self, now: float, depth: int) -> float:
        """Outputs/s the queue grew by over about the last TREND_SPAN_S seconds."""
        with self._lock:
            self._samples.append((now, depth))
            while self._samples and now - self._samples[0][0] > TREND_SPAN_S:
                self._samples.popleft()
            t0, d0 = self._samples[0]
        return round((depth - d0) / (now - t0), 3) if now - t0 >= 2.0 else 0.0


def fleet_metrics(store: Store, vstats: dict[str, Any] | None, *, now: float | None = None,
                  history: QueueHistory | None = None,
                  recommend: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]:
    """The ``/api/metrics`` document. ``vstats`` is the ventilator's stats, None if down."""
    now = time.time() if now is None else now
    counts = store.counts()
    finished = store.recent_outputs(LATENCY_WINDOW_S, now=now)
    done = [f for f in finished if f.state == "done"]
    recent = [f for f in done if f.finished_at >= now - THROUGHPUT_WINDOW_S]
    latency = [(f.finished_at - f.queued_at) * 1000.0 for f in done]
    stages: dict[str, float | None] = {}
    for stage in WORK_STAGES:
        vals = [v for f in done if (v := f.timings_ms.get(stage)) is not None]
        stages[stage] = round(sum(vals) / len(vals), 3) if vals else None
    totals = store.totals()
    fleet = (vstats or {}).get("workers") or {}
    out: dict[str, Any] = {
        "ts": now,
        "queue_depth": counts.queued,
        "in_flight": counts.running,
        "throughput_per_s": round(len(recent) / THROUGHPUT_WINDOW_S, 3),
        "window_s": THROUGHPUT_WINDOW_S,
        "latency_window_s": LATENCY_WINDOW_S,
        "latency_ms": percentiles(latency),
        "stages_ms": stages,
        "retries": totals.retries,
        "failures": totals.failed,
        "duplicates": (vstats or {}).get("duplicates"),
        "workers": {s: int(fleet.get(s, 0) or 0) for s in WORKER_STATES},
        "totals": asdict(totals),
        "cache_hit_ratio": totals.cache_hit_ratio,
        "ventilator": "up" if vstats is not None else "down",
    }
    if history is not None:
        out["queue_trend_per_s"] = history.trend(now, out["queue_depth"])
    if recommend is not None:
        out["recommendation"] = recommend(out)
    return out


class FleetCollector:
    """A prometheus_client collector over :func:`fleet_metrics` (read at scrape time)."""

    def __init__(self, source: Callable[[], dict[str, Any]]) -> None:
        self.source = source

    def describe(self) -> list[Metric]:
        return []  # families are dynamic; skip the registration-time collect()

    def collect(self) -> Iterator[Metric]:
        m = self.source()
        yield _gauge("imgpipe_queue_depth", "outputs queued, not yet dispatched",
                     m["queue_depth"])
        yield _gauge("imgpipe_in_flight", "outputs dispatched to a worker, not final",
                     m["in_flight"])
        yield _gauge("imgpipe_throughput_per_second",
                     f"outputs done per second over the last {m['window_s']:g} s",
                     m["throughput_per_s"])
        yield _gauge("imgpipe_queue_trend_per_second", "queue growth, outputs per second",
                     m.get("queue_trend_per_s", 0.0))
        yield _counters("imgpipe_outputs", "outputs finished, by final state", "state",
                        {"done": m["totals"]["done"], "failed": m["totals"]["failed"]})
        yield CounterMetricFamily("imgpipe_jobs", "jobs accepted", value=m["totals"]["jobs"])
        yield CounterMetricFamily("imgpipe_retries", "re-dispatches of outputs",
                                  value=m["retries"])
        yield CounterMetricFamily("imgpipe_duplicates", "late duplicate results dropped",
                                  value=m["duplicates"] or 0)
        workers = GaugeMetricFamily("imgpipe_workers", "workers by state", labels=["state"])
        for state in WORKER_STATES:
            workers.add_metric([state], m["workers"][state])
        yield workers
        latency = GaugeMetricFamily(
            "imgpipe_latency_seconds", f"end-to-end output latency over the last "
            f"{m['latency_window_s']:g} s (upload to result)", labels=["quantile"])
        for key, value in m["latency_ms"].items():
            if value is not None:
                latency.add_metric([f"0.{key[1:]}"], value / 1000.0)
        yield latency
        stages = GaugeMetricFamily(
            "imgpipe_stage_seconds", f"mean time per stage over the last "
            f"{m['latency_window_s']:g} s", labels=["stage"])
        for stage, value in m["stages_ms"].items():
            if value is not None:
                stages.add_metric([stage], value / 1000.0)
        yield stages
        yield _gauge("imgpipe_ventilator_up", "1 when the ventilator answers",
                     1 if m["ventilator"] == "up" else 0)
        t = m["totals"]
        yield _counters("imgpipe_cache_lookups", "result cache lookups, by outcome", "outcome",
                        {"hit": t["cache_hits"], "miss": t["cache_misses"]})
        yield _gauge("imgpipe_cache_hit_ratio", "result cache hits per lookup, since start",
                     m["cache_hit_ratio"])
        yield _counters("imgpipe_jobs_dropped", "finished jobs removed, by why", "why",
                        {"expired": t["jobs_expired"], "evicted": t["jobs_evicted"]})
        yield _gauge("imgpipe_data_bytes", "bytes of originals and outputs in the data dir",
                     t["bytes"])


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counters(name: str, doc: str, label: str, values: dict[str, float]
              ) -> CounterMetricFamily:
    """One counter family with a sample per value of ``label``."""
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family


class RequestMetrics:
    """Per-request counters in Prometheus form (summed across gunicorn workers)."""

    def __init__(self, fleet: Callable[[], dict[str, Any]]) -> None:
        self.requests = Counter("imgpipe_requests", "HTTP requests answered, by status",
                                ["status"], registry=None)
        self.upload_bytes = Counter("imgpipe_upload_bytes", "request body bytes received",
                                    registry=None)
        self.seconds = Histogram("imgpipe_request_seconds", "HTTP request duration",
                                 registry=None, buckets=(.005, .01, .025, .05, .1, .25, .5,
                                                         1, 2.5, 5, 10, 30, 60, 120))
        self.registry = CollectorRegistry(auto_describe=False)
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            MultiProcessCollector(self.registry)
        else:
            for metric in (self.requests, self.upload_bytes, self.seconds):
                self.registry.register(metric)
        self.registry.register(FleetCollector(fleet))  # type: ignore[arg-type]

    def observe(self, status: int, seconds: float, upload_bytes: int) -> None:
        self.requests.labels(status=str(status)).inc()
        self.seconds.observe(seconds)
        if upload_bytes:
            self.upload_bytes.inc(upload_bytes)
