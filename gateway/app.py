"""The Falcon app: routes wired to small resources; nothing runs at import time.

``create_app(settings)`` is what gunicorn serves (``imgpipe gateway``) and what the
in-process tests drive with ``falcon.testing.TestClient``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import falcon

from imgpipe.core.config import Settings
from imgpipe.core.store import Store
from imgpipe.gateway import errors
from imgpipe.gateway.access import Access
from imgpipe.gateway.fleet import (
    FiltersResource,
    FleetView,
    HealthResource,
    MetricsResource,
    PresetsResource,
    PrometheusResource,
    WorkersResource,
)
from imgpipe.gateway.jobs import JobListResource, JobResource, OutputResource, ProcessResource
from imgpipe.gateway.metrics import RequestMetrics
from imgpipe.gateway.openapi import OpenAPIResource
from imgpipe.gateway.pipeline import Pipeline

log = logging.getLogger(__name__)


class RequestAccounting:
    """Middleware: every answered request counted by status, bytes and duration."""

    def __init__(self, pipeline: Pipeline, metrics: RequestMetrics) -> None:
        self.pipeline = pipeline
        self.metrics = metrics

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.t0 = time.monotonic()
        req.context.upload_bytes = 0
        self.pipeline.start()  # no-op after the first request of this process

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: Any,
                         req_succeeded: bool) -> None:
        seconds = time.monotonic() - float(req.context.get("t0") or time.monotonic())
        status = falcon.http_status_to_code(resp.status)
        nbytes = int(req.context.get("upload_bytes") or 0)
        self.pipeline.stats.record(status, seconds, nbytes)
        self.metrics.observe(status, seconds, nbytes)


def create_app(settings: Settings, *, store: Store | None = None,
               pipeline: Pipeline | None = None) -> falcon.App:
    """The gateway's WSGI app over ``settings.data_dir``'s job store."""
    if settings.test_hooks:
        _enable_test_filters()
    store = store or Store.from_settings(settings)
    pipeline = pipeline or Pipeline(settings)
    view = FleetView(settings, store, pipeline)
    metrics = RequestMetrics(view.metrics)
    middleware: list[Any] = [RequestAccounting(pipeline, metrics), Access(settings)]
    app = falcon.App(middleware=middleware)
    app.req_options.strip_url_path_trailing_slash = True
    errors.install(app)

    process = ProcessResource(settings, store, pipeline)
    app.add_route("/api/process", process)
    app.add_route("/api/jobs", JobListResource(store))
    app.add_route("/api/jobs/{job_id}", JobResource(settings, store, process.waiter))
    app.add_route("/api/jobs/{job_id}/outputs/{n}", OutputResource(store))
    app.add_route("/api/filters", FiltersResource())
    app.add_route("/api/presets", PresetsResource(settings))
    app.add_route("/api/workers", WorkersResource(view))
    app.add_route("/api/metrics", MetricsResource(view))
    app.add_route("/metrics", PrometheusResource(metrics))
    app.add_route("/healthz", HealthResource(view))
    app.add_route("/openapi.json", OpenAPIResource(settings))
    return app


def _enable_test_filters() -> None:
    try:
        from imgpipe.filters.testing import enable_test_filters
    except ImportError:  # the test-only filters are optional
        log.warning("IMGPIPE_TEST_HOOKS is on but filters.testing is not available")
        return
    enable_test_filters()
