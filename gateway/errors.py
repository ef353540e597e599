"""Every error the gateway answers is JSON ``{"error", "detail"}`` (+ ``field``).

Errors raised on purpose are :class:`core.errors.ImgpipeError` children that carry
their HTTP status; Falcon's own errors (unknown route, wrong method, bad header) go
through the same serializer; anything unexpected is logged and answered as a JSON
500, so no request ever gets an HTML page or a traceback.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import falcon

from imgpipe.core.errors import ImgpipeError

log = logging.getLogger(__name__)


class BadForm(ImgpipeError):
    """The request is not the form ``POST /api/process/`` expects (HTTP 400)."""

    status = 400
    error = "bad_form"


class BadParam(ImgpipeError):
    """A query parameter is malformed (HTTP 400)."""

    status = 400
    error = "bad_param"


class PayloadTooLarge(ImgpipeError):
    """The body is over ``max_upload_bytes`` (HTTP 413)."""

    status = 413
    error = "too_large"


class TooExpensive(ImgpipeError):
    """A chain's output or the whole job's estimated cost is over a limit (HTTP 413)."""

    status = 413
    error = "job_too_expensive"


class OutputTooLarge(TooExpensive):
    """A chain would make an output over ``max_pixels`` (HTTP 413)."""

    error = "output_too_large"


class TooManyRequests(ImgpipeError):
    """Past a client's rate or concurrency limit; retry after ``retry_after`` s (HTTP 429)."""

    status = 429
    error = "too_many_requests"

    def __init__(self, detail: str, *, retry_after: float, error: str | None = None) -> None:
        super().__init__(detail, field="client")
        self.retry_after = retry_after
        if error:
            self.error = error


class RequestTimeout(ImgpipeError):
    """The client did not send its body within ``gateway_timeout_s`` (HTTP 408)."""

    status = 408
    error = "timeout"


class OutputFailed(ImgpipeError):
    """The output asked for has failed and never will exist (HTTP 422)."""

    status = 422
    error = "output_failed"


class BlobStoreDown(ImgpipeError):
    """The blob store (S3) did not take or give a blob: an outage; retry later (HTTP 503)."""

    status = 503
    error = "storage_unavailable"

    def __init__(self, detail: str, *, retry_after: int = 5) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class QueueFull(ImgpipeError):
    """Backpressure: too many outputs open; try again after ``retry_after`` s (HTTP 503)."""

    status = 503
    error = "queue_full"

    def __init__(self, detail: str, *, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class ClientTimeout(ConnectionResetError):
    """A client socket read that hit its deadline.

    A reset to gunicorn (which then closes the connection quietly instead of logging
    a traceback per stalled client), a timeout to :class:`BodyReader` (answered 408).
    """


def handle_imgpipe_error(req: falcon.Request, resp: falcon.Response, exc: ImgpipeError,
                         params: dict[str, Any]) -> None:
    status = exc.status if 400 <= exc.status < 600 else 500
    if status == 500:
        log.error("%s %s: %s", req.method, req.path, exc)
    resp.status = falcon.code_to_http_status(status)
    resp.media = exc.to_dict()
    retry = getattr(exc, "retry_after", None)
    if retry is None and status == 503:
        retry = 5
    if retry is not None:
        resp.set_header("Retry-After", str(max(1, int(math.ceil(retry)))))
    resp.set_headers(getattr(exc, "headers", None) or {})


def handle_unexpected(req: falcon.Request, resp: falcon.Response, exc: Exception,
                      params: dict[str, Any]) -> None:
    log.exception("unhandled error on %s %s", req.method, req.path)
    resp.status = falcon.HTTP_500
    resp.media = {"error": "internal", "detail": "internal error; see the gateway log"}


def serialize_http_error(req: falcon.Request, resp: falcon.Response,
                         exc: falcon.HTTPError) -> None:
    """Falcon's errors (404 route, 405, bad headers) in the house format."""
    slug = (exc.title or "error").lower().replace(" ", "_")
    out: dict[str, Any] = {"error": slug, "detail": exc.description or exc.title or slug}
    resp.content_type = falcon.MEDIA_JSON
    resp.media = out


def install(app: falcon.App) -> None:
    """Register the handlers; the most specific one wins in Falcon."""
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(ImgpipeError, handle_imgpipe_error)
    app.set_error_serializer(serialize_http_error)
