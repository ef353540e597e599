"""``GET /openapi.json``: the OpenAPI 3.0 description of every route, written by hand.

Hand-written because the contract (DESIGN.md) came first; a test validates it with
openapi-spec-validator and runs schemathesis against a live gateway with it.
"""

from __future__ import annotations

from typing import Any

import falcon

from imgpipe.core.config import Settings
from imgpipe.core.protocol import GRAVITY_NOTES

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _err(description: str, *, retry: bool = False) -> dict[str, Any]:
    out = _json(_ref("Error"), description)
    if retry:
        out["headers"] = {"Retry-After": {"description": "seconds to wait before retrying",
                                          "schema": {"type": "integer", "minimum": 1}}}
    return out


def _nullable(kind: str, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "nullable": True, **extra}


JOB_ID = {"name": "job_id", "in": "path", "required": True,
          "description": "job id (a UUID made by the gateway)",
          "schema": {"type": "string", "format": "uuid"}}

SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error", "detail"], "properties": {
        "error": {"type": "string", "description": "a short machine-readable code"},
        "detail": {"type": "string", "description": "what went wrong and what to change"},
        "field": {"type": "string", "description": "the form field, parameter or header"}}},
    "Timings": {"type": "object", "properties": {
        k: _nullable("number", description="milliseconds")
        for k in ("queue", "decode", "filters", "encode", "total", "dispatch", "store")}},
    "Output": {"type": "object", "required": ["n", "image", "ops", "state", "url"],
               "properties": {
                   "n": {"type": "integer", "minimum": 0},
                   "image": {"type": "integer", "minimum": 0},
                   "ops": {"type": "string", "description": "the chain, canonical form"},
                   "state": {"type": "string",
                             "enum": ["queued", "running", "done", "failed"]},
                   "url": {"type": "string"},
                   "width": _nullable("integer"), "height": _nullable("integer"),
                   "bytes": _nullable("integer"), "content_type": _nullable("string"),
                   "worker": _nullable("string"), "attempts": {"type": "integer"},
                   "cached": {"type": "boolean", "description": "done at once from the "
                              "result cache (same image bytes, same chain)"},
                   "gravity": _nullable(
                       "string", enum=[*GRAVITY_NOTES, None],
                       description="where the chain's gravity=smart steps put their window: "
                       "smart when every one was placed by interest, center when one fell "
                       "back to the centre (a flat image); null when no step placed one "
                       "that way (no smart step, a window as large as the image, or the "
                       "output is not done)"),
                   "timings_ms": _ref("Timings"), "error": _nullable("string")}},
    "Progress": {"type": "object", "required": ["done", "failed", "total"], "properties": {
        k: {"type": "integer", "minimum": 0} for k in ("done", "failed", "total")}},
    "JobSummary": {"type": "object", "required": ["id", "state", "created", "progress"],
                   "properties": {
                       "id": {"type": "string", "format": "uuid"},
                       "state": {"type": "string", "enum": [
                           "queued", "running", "done", "failed", "partial"]},
                       "created": {"type": "string", "format": "date-time"},
                       "finished": _nullable("string", format="date-time"),
                       "progress": _ref("Progress")}},
    "Job": {"allOf": [_ref("JobSummary"), {
        "type": "object", "required": ["outputs"],
        "properties": {"outputs": {"type": "array", "items": _ref("Output")}}}]},
    "JobList": {"type": "object", "required": ["jobs"], "properties": {
        "jobs": {"type": "array", "items": _ref("Job")}}},
    "Filters": {"type": "object", "required": ["filters"], "properties": {
        "filters": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "doc": {"type": "string"},
            "params": {"type": "array", "items": {"type": "object"}}}}}}},
    "Presets": {"type": "object", "required": ["presets"], "properties": {
        "presets": {"type": "array", "items": {
            "type": "object", "required": ["name", "ops"], "properties": {
                "name": {"type": "string"}, "ops": {"type": "string"}}}}}},
    "Worker": {"type": "object", "required": ["id", "state"], "properties": {
        "id": {"type": "string"}, "host": {"type": "string"}, "pid": {"type": "integer"},
        "state": {"type": "string", "enum": ["idle", "busy", "lost"]},
        "serves": {"type": "string"}, "slots": {"type": "integer"},
        "free": {"type": "integer"}, "inflight": {"type": "array", "items": {"type": "string"}},
        "done": {"type": "integer"}, "failed": {"type": "integer"},
        "cpu": {"type": "number", "description": "CPU %"},
        "rss": {"type": "integer", "description": "resident memory, bytes"},
        "shm_bytes": {"type": "integer",
                      "description": "shared memory its frame segments hold, bytes"},
        "note": {"type": "string", "description": "why the worker runs below what it was "
                 "asked (e.g. slots lowered to fit its shared memory); empty when it does not"},
        "last_beat_age_s": {"type": "number"}, "started": {"type": "number"}}},
    "Workers": {"type": "object", "required": ["workers"], "properties": {
        "workers": {"type": "array", "items": _ref("Worker")}}},
    "Percentiles": {"type": "object", "properties": {
        k: _nullable("number", description="milliseconds") for k in ("p50", "p95", "p99")}},
    "Metrics": {"type": "object", "required": [
        "queue_depth", "in_flight", "throughput_per_s", "window_s", "latency_ms",
        "stages_ms", "retries", "failures", "workers", "totals"], "properties": {
        "ts": {"type": "number", "description": "Unix time of the snapshot"},
        "queue_depth": {"type": "integer", "description": "outputs queued"},
        "in_flight": {"type": "integer", "description": "outputs running on a worker"},
        "throughput_per_s": {"type": "number", "description": "outputs done per second"},
        "window_s": {"type": "number", "description": "throughput window, seconds"},
        "latency_window_s": {"type": "number"},
        "latency_ms": _ref("Percentiles"),
        "stages_ms": {"type": "object", "description": "mean milliseconds per stage",
                      "properties": {k: _nullable("number") for k in
                                     ("queue", "decode", "filters", "encode")}},
        "retries": {"type": "integer"}, "failures": {"type": "integer"},
        "duplicates": _nullable("integer"),
        "workers": {"type": "object", "properties": {
            k: {"type": "integer"} for k in ("alive", "busy", "idle", "lost")}},
        "totals": {"type": "object", "additionalProperties": {"type": "integer"}},
        "cache_hit_ratio": {"type": "number", "description": "result cache hits per lookup"},
        "ventilator": {"type": "string", "enum": ["up", "down"]},
        "queue_trend_per_s": {"type": "number"},
        "recommendation": {"type": "object", "properties": {
            "action": {"type": "string", "enum": ["SCALE_UP", "MAINTAIN", "SCALE_DOWN"]},
            "reason": {"type": "string"}, "workers": {"type": "integer"}}}}},
    "Health": {"type": "object", "properties": {
        "status": {"type": "string"}, "error": {"type": "string"},
        "detail": {"type": "string"}, "missing": {"type": "array", "items": {"type": "string"}},
        "checks": {"type": "object"}}},
}


def build_spec(settings: Settings) -> dict[str, Any]:
    """The OpenAPI document; limits are filled in from ``settings``."""
    s = settings
    process = {
        "summary": "Submit images and filter chains; one output per image x chain",
        "description": (
            f"Up to {s.max_images} `image` parts (JPEG, PNG, WebP, GIF, BMP; recognised by "
            f"their bytes; at most {s.max_pixels} pixels each) and up to {s.max_chains} "
            f"`ops` chains of at most {s.max_filters} filters (see `/api/filters`), or "
            "`preset:NAME` (see `/api/presets`); or one image as the raw body with its "
            "chains in `?ops=`; `encode:format=auto` picks AVIF or WebP "
            "when `Accept` names them, else the input's format. Without "
            "`ops` the chains are `resize:w=1920`, `blur:radius=3`, `brightness:factor=1.2`. "
            f"The body may be at most {s.max_upload_bytes} bytes and must arrive within "
            f"{s.gateway_timeout_s:g} s."),
        "parameters": [
            {"name": "wait", "in": "query", "required": False,
             "description": f"seconds to wait for the job to finish (capped at "
                            f"{s.max_wait_s:g}); with one output and `Accept: image/*` the "
                            "finished image itself is returned",
             "schema": {"type": "number", "minimum": 0}},
            {"name": "cache", "in": "query", "required": False,
             "description": "0 bypasses the result cache (same image bytes, same chain)",
             "schema": {"type": "string", "enum": ["0", "1", "true", "false"]}},
            {"name": "ops", "in": "query", "required": False, "explode": True,
             "description": "with one image as the raw body: its chains (repeat the "
                            "parameter for several; percent-encode `|`, `:`, `,` and `=`)",
             "schema": {"type": "array", "items": {"type": "string"}}}],
        "requestBody": {"required": True, "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["image"], "properties": {
                    "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    "ops": {"type": "array", "items": {"type": "string"},
                            "example": ["resize:w=800|sharpen:amount=1.5"]}}}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
        "responses": {
            "200": {"description": "finished job (with `wait`); or the image itself",
                    "content": {JSON: {"schema": _ref("Job")},
                                "image/*": {"schema": {"type": "string", "format": "binary"}}}},
            "202": _json(_ref("Job"), "job accepted (and recorded) but not finished"),
            "400": _err("bad form, bad ops chain or bad parameter; `field` names it"),
            "408": _err("the body did not arrive in time"),
            "413": _err("body over the upload limit, an image over the pixel limit "
                        "(`too_large`), an output over it (`output_too_large`), or the "
                        f"estimated cost over {s.max_job_cost:g} CPU seconds per job or half "
                        f"of {s.task_timeout_s:g} s per output (`job_too_expensive`)"),
            "429": _err(f"past this client's limit: {s.client_concurrency} jobs in flight "
                        f"(`too_many_jobs`) or {s.client_rate_per_min:g} jobs per minute "
                        "(`rate_limited`)", retry=True),
            "415": _err("a part is not a decodable image of an allowed format"),
            "422": _err("with `wait` and `Accept: image/*`: the one output failed"),
            "503": _err("the queue is full, or the blob store cannot be reached; retry after "
                        "`Retry-After` seconds", retry=True),
            "507": _err("the data dir's disk is full, or its byte cap is spent on open jobs")}}
    spec: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {"title": "imgpipe gateway", "version": "1.0.0",
                 "description": "Distributed image processing: upload images with filter "
                                "chains, fetch the results, watch the fleet."},
        "servers": [{"url": "/"}],
        "paths": {
            "/api/process/": {"post": {"operationId": "process", **process}},
            "/api/jobs": {"get": {
                "operationId": "listJobs", "summary": "The caller's recent job documents, newest first (an extension the dashboard uses)",
                "parameters": [{"name": "limit", "in": "query", "required": False,
                                "schema": {"type": "integer", "minimum": 1, "maximum": 100,
                                           "default": 20}}],
                "responses": {"200": _json(_ref("JobList"), "recent jobs"),
                              "400": _err("bad limit")}}},
            "/api/jobs/{job_id}": {"get": {
                "operationId": "getJob", "summary": "The job document",
                "parameters": [JOB_ID, {
                    "name": "wait", "in": "query", "required": False,
                    "description": f"seconds to wait for the job to be final (capped at "
                                   f"{s.max_wait_s:g}); answered as it stands at the end",
                    "schema": {"type": "number", "minimum": 0}}],
                "responses": {"200": _json(_ref("Job"), "the job"),
                              "400": _err("bad wait"),
                              "404": _err("no such job (unknown or malformed id, or another "
                                          "API key's job)"),
                              "410": _err("the job expired (IMGPIPE_JOB_TTL_S)")}}},
            "/api/jobs/{job_id}/outputs/{n}": {"get": {
                "operationId": "getOutput", "summary": "Output n's bytes once it is done",
                "parameters": [JOB_ID, {"name": "n", "in": "path", "required": True,
                                        "schema": {"type": "integer", "minimum": 0}},
                               {"name": "If-None-Match", "in": "header", "required": False,
                                "schema": {"type": "string"}}],
                "responses": {
                    "200": {"description": "the image; immutable, cache for a year",
                            "headers": {"ETag": {"schema": {"type": "string"}}},
                            "content": {"image/*": {"schema": {
                                "type": "string", "format": "binary"}}}},
                    "304": {"description": "not modified (If-None-Match matched)"},
                    "404": _err("no such job or output, or the output is not done yet"),
                    "410": _err("the job expired (IMGPIPE_JOB_TTL_S)"),
                    "422": _err("the output failed; `detail` says why")}}},
            "/api/filters": {"get": {
                "operationId": "listFilters",
                "summary": "Every filter with its parameters, types, ranges and defaults",
                "responses": {"200": _json(_ref("Filters"), "the filters")}}},
            "/api/presets": {"get": {
                "operationId": "listPresets",
                "summary": "Named chains (IMGPIPE_PRESETS), usable as `ops=preset:NAME`",
                "responses": {"200": _json(_ref("Presets"), "the presets")}}},
            "/api/workers": {"get": {
                "operationId": "listWorkers", "summary": "The worker registry",
                "responses": {"200": _json(_ref("Workers"), "live and recently lost workers"),
                              "503": _err("the ventilator does not answer", retry=True)}}},
            "/api/metrics": {"get": {
                "operationId": "getMetrics",
                "summary": "Queue, throughput, latency, stages, fleet and a recommendation",
                "responses": {"200": _json(_ref("Metrics"), "the numbers")}}},
            "/metrics": {"get": {
                "operationId": "getPrometheusMetrics", "summary": "Prometheus text format",
                "responses": {"200": {"description": "metrics", "content": {
                    "text/plain": {"schema": {"type": "string"}}}}}}},
            "/healthz": {"get": {
                "operationId": "health",
                "summary": "200 when the ventilator, the sink and a worker are alive",
                "responses": {"200": _json(_ref("Health"), "ready"),
                              "503": _json(_ref("Health"), "not ready; `missing` says what")}}},
            "/openapi.json": {"get": {
                "operationId": "openapi", "summary": "This document",
                "responses": {"200": {"description": "OpenAPI 3.0", "content": {
                    JSON: {"schema": {"type": "object"}}}}}}},
        },
        "components": {"schemas": SCHEMAS, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "an API key from IMGPIPE_API_KEYS; needed by every "
                                      "/api/* route when the gateway has keys"}}},
    }
    for path, item in spec["paths"].items():
        if path.startswith("/api/"):
            for op in item.values():
                op["security"] = [{"bearer": []}, {}]  # {}: a keyless gateway
                op["responses"]["401"] = _err("with API keys on: no key, or an unknown one; "
                                              "answered with `WWW-Authenticate: Bearer`")
    return spec


class OpenAPIResource:
    def __init__(self, settings: Settings) -> None:
        self.spec = build_spec(settings)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = self.spec
