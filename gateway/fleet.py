"""The fleet over HTTP: filters, workers, metrics (JSON and Prometheus), health.

Workers and fleet counters come from the ventilator (the registry) through
``core.control.ask`` with a short deadline, so a down ventilator costs a request
half a second, never a hung thread; output numbers come from the job store.
"""

from __future__ import annotations

import logging
from typing import Any

import falcon
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from imgpipe.core.advice import recommend
from imgpipe.core.config import Settings
from imgpipe.core.control import ask
from imgpipe.core.errors import ImgpipeError
from imgpipe.core.store import Store
from imgpipe.filters import describe_filters
from imgpipe.gateway.metrics import QueueHistory, RequestMetrics, fleet_metrics
from imgpipe.gateway.pipeline import Pipeline
from imgpipe.gateway.presets import load_presets

log = logging.getLogger(__name__)

ASK_TIMEOUT_S = 0.5


class FleetView:
    """What the ventilator and the store say about the fleet, computed per request."""

    def __init__(self, settings: Settings, store: Store, pipeline: Pipeline) -> None:
        self.settings = settings
        self.store = store
        self.pipeline = pipeline
        self.history = QueueHistory()

    def ask(self, op: str) -> Any:
        return ask(self.pipeline.ctx, self.settings, op, timeout=ASK_TIMEOUT_S)

    def stats(self) -> dict[str, Any] | None:
        try:
            data = self.ask("stats")
        except ImgpipeError as exc:
            log.debug("no ventilator stats: %s", exc)
            return None
        return data if isinstance(data, dict) else None

    def metrics(self) -> dict[str, Any]:
        return fleet_metrics(self.store, self.stats(), history=self.history,
                             recommend=recommend)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, checks): ventilator answers, sink seen recently, a live worker."""
        stats = self.stats()
        liveness = self.settings.liveness_s
        if stats is None:
            checks: dict[str, Any] = {"ventilator": False, "sink": None, "workers": None}
        else:
            seen = (stats.get("components") or {}).get("sink")
            alive = int((stats.get("workers") or {}).get("alive", 0) or 0)
            checks = {"ventilator": True,
                      "sink": seen is not None and float(seen) <= liveness,
                      "sink_seen_s_ago": seen,
                      "workers": alive >= 1, "workers_alive": alive}
        healthy = all(checks[k] is True for k in ("ventilator", "sink", "workers"))
        return healthy, checks


class FiltersResource:
    """``GET /api/filters``: every filter, its parameters, types, ranges and defaults."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"filters": describe_filters()}


class PresetsResource:
    """``GET /api/presets``: the named chains usable as ``ops=preset:NAME``."""

    def __init__(self, settings: Settings) -> None:
        self.presets = load_presets(settings.presets)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"presets": [{"name": name, "ops": ops}
                                  for name, ops in sorted(self.presets.items())]}


class WorkersResource:
    """``GET /api/workers``: the ventilator's registry; 503 when it does not answer."""

    def __init__(self, view: FleetView) -> None:
        self.view = view

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        workers = self.view.ask("workers")
        resp.media = {"workers": workers if isinstance(workers, list) else []}


class MetricsResource:
    """``GET /api/metrics``: the fleet's numbers and the scaling recommendation."""

    def __init__(self, view: FleetView) -> None:
        self.view = view

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = self.view.metrics()


class PrometheusResource:
    """``GET /metrics``: the same numbers plus request counters, Prometheus text format."""

    def __init__(self, metrics: RequestMetrics) -> None:
        self.metrics = metrics

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = CONTENT_TYPE_LATEST
        resp.data = generate_latest(self.metrics.registry)


class HealthResource:
    """``GET /healthz``: 200 when the pipeline can finish a job, else 503 naming what is not."""

    def __init__(self, view: FleetView) -> None:
        self.view = view

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        healthy, checks = self.view.health()
        if healthy:
            resp.media = {"status": "ok", "checks": checks}
            return
        missing = [k for k in ("ventilator", "sink", "workers") if checks[k] is not True]
        resp.status = falcon.HTTP_503
        resp.media = {"error": "unhealthy", "detail": "not ready: " + ", ".join(
            {"ventilator": "the ventilator does not answer",
             "sink": "the sink has not been seen recently",
             "workers": "no live worker"}[k] for k in missing),
            "missing": missing, "checks": checks}
