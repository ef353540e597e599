"""Fleet routes in process: filters, workers, metrics, Prometheus, health, OpenAPI."""

from __future__ import annotations

from typing import Any

import pytest
from openapi_spec_validator import validate
from prometheus_client.parser import text_string_to_metric_families

from imgpipe.core.config import Settings
from tests.gateway import images as im
from tests.gateway.test_jobs import finish

METRIC_KEYS = {"queue_depth", "in_flight", "throughput_per_s", "window_s", "latency_ms",
               "stages_ms", "retries", "failures", "duplicates", "workers", "totals",
               "recommendation"}
FAMILIES = {"imgpipe_queue_depth", "imgpipe_in_flight", "imgpipe_throughput_per_second",
            "imgpipe_outputs", "imgpipe_jobs", "imgpipe_retries", "imgpipe_duplicates",
            "imgpipe_workers", "imgpipe_latency_seconds", "imgpipe_stage_seconds",
            "imgpipe_requests", "imgpipe_upload_bytes", "imgpipe_request_seconds",
            "imgpipe_ventilator_up", "imgpipe_queue_trend_per_second"}


def test_filters_come_from_the_registry(gateway: Any) -> None:
    res = gateway.client.simulate_get("/api/filters")
    assert res.status_code == 200
    names = {f["name"] for f in res.json["filters"]}
    assert {"resize", "blur", "brightness", "edges", "encode"} <= names
    blur = next(f for f in res.json["filters"] if f["name"] == "blur")
    radius = next(p for p in blur["params"] if p["name"] == "radius")
    assert radius["type"] == "float" and radius["min"] == 0


def test_workers_without_a_ventilator_is_503_with_retry_after(gateway: Any) -> None:
    res = gateway.client.simulate_get("/api/workers")
    assert res.status_code == 503
    assert res.json["error"] == "unavailable" and "retry-after" in res.headers


def test_workers_lists_the_registry(gateway: Any, ventilator: Any) -> None:
    res = gateway.client.simulate_get("/api/workers")
    assert res.status_code == 200
    assert res.json == {"workers": ventilator.data["workers"]}


def test_metrics_shape_and_numbers(gateway: Any, ventilator: Any) -> None:
    body, ctype = im.multipart([im.jpeg()], ["invert", "flip", "grayscale"])
    job = gateway.post(body, ctype).json["id"]
    finish(gateway.store, job, 0)
    finish(gateway.store, job, 1, ok=False)
    m = gateway.client.simulate_get("/api/metrics").json
    assert set(m) >= METRIC_KEYS
    assert m["queue_depth"] == 1 and m["in_flight"] == 0
    assert m["failures"] == 1 and m["duplicates"] == 2
    assert m["throughput_per_s"] == pytest.approx(1 / m["window_s"])
    assert set(m["latency_ms"]) == {"p50", "p95", "p99"} and m["latency_ms"]["p50"] >= 0
    assert m["stages_ms"] == {"queue": 1.0, "decode": 2.0, "filters": 3.0, "encode": 4.0}
    assert m["workers"] == {"alive": 1, "busy": 0, "idle": 1, "lost": 0}
    assert m["totals"]["jobs"] == 1 and m["totals"]["done"] == 1
    assert m["recommendation"]["action"] in ("SCALE_UP", "MAINTAIN", "SCALE_DOWN")
    assert m["ventilator"] == "up"


def test_metrics_without_a_ventilator_still_answer(gateway: Any) -> None:
    res = gateway.client.simulate_get("/api/metrics")
    assert res.status_code == 200
    assert res.json["ventilator"] == "down"
    assert res.json["workers"] == {"alive": 0, "busy": 0, "idle": 0, "lost": 0}


def test_prometheus_text_parses_and_has_the_families(gateway: Any, ventilator: Any) -> None:
    body, ctype = im.multipart([im.jpeg()], ["invert"])
    job = gateway.post(body, ctype).json["id"]
    finish(gateway.store, job, 0)
    gateway.client.simulate_get("/nope")
    res = gateway.client.simulate_get("/metrics")
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(res.text)}
    assert set(families) >= FAMILIES, FAMILIES - set(families)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    assert samples[("imgpipe_outputs_total", (("state", "done"),))] == 1
    assert samples[("imgpipe_workers", (("state", "alive"),))] == 1
    assert samples[("imgpipe_requests_total", (("status", "202"),))] == 1
    assert samples[("imgpipe_requests_total", (("status", "404"),))] == 1
    assert samples[("imgpipe_upload_bytes_total", ())] == len(body)


def test_healthz_is_503_naming_the_ventilator_when_it_is_down(gateway: Any) -> None:
    res = gateway.client.simulate_get("/healthz")
    assert res.status_code == 503
    assert res.json["missing"] == ["ventilator", "sink", "workers"]
    assert "ventilator" in res.json["detail"]


@pytest.mark.parametrize(("components", "alive", "missing"), [
    ({"sink": 0.5}, 1, []),
    ({}, 1, ["sink"]),
    ({"sink": 3600.0}, 1, ["sink"]),
    ({"sink": 0.5}, 0, ["workers"]),
])
def test_healthz_follows_the_ventilator_stats(gateway: Any, ventilator: Any,
                                              components: dict[str, float], alive: int,
                                              missing: list[str]) -> None:
    ventilator.data["stats"] = {**ventilator.data["stats"], "components": components,
                                "workers": {"alive": alive, "busy": 0, "idle": alive,
                                            "lost": 0}}
    res = gateway.client.simulate_get("/healthz")
    assert res.status_code == (503 if missing else 200), res.json
    assert res.json.get("missing", []) == missing


def test_openapi_is_valid_and_lists_every_route(gateway: Any, settings: Settings) -> None:
    spec = gateway.client.simulate_get("/openapi.json").json
    validate(spec)
    assert spec["openapi"].startswith("3.")
    assert set(spec["paths"]) == {
        "/api/process/", "/api/jobs", "/api/jobs/{job_id}", "/api/jobs/{job_id}/outputs/{n}",
        "/api/filters", "/api/presets", "/api/workers", "/api/metrics", "/metrics", "/healthz",
        "/openapi.json"}
    for path in spec["paths"]:
        concrete = path.replace("{job_id}", "0b7d2a1e-3c4f-4a5b-8c6d-7e8f9a0b1c2d").replace(
            "{n}", "0")
        method = "post" if path == "/api/process/" else "get"
        res = gateway.client.simulate_request(method.upper(), concrete)
        assert res.status_code != 405 and str(res.status_code) in (
            set(spec["paths"][path][method]["responses"]) | {"200"}), (path, res.status_code)


def test_job_documents_match_the_openapi_schema(gateway: Any) -> None:
    import jsonschema

    spec = gateway.client.simulate_get("/openapi.json").json
    chains = ["invert", "flip", "crop:w=4,h=4,gravity=smart",
              "resize:w=4,h=4,fit=cover,gravity=smart"]
    body, ctype = im.multipart([im.jpeg()], chains)
    doc = gateway.post(body, ctype).json
    finish(gateway.store, doc["id"], 0)
    finish(gateway.store, doc["id"], 2, gravity="smart")
    finish(gateway.store, doc["id"], 3, gravity="center")
    doc = gateway.client.simulate_get(f"/api/jobs/{doc['id']}").json
    assert [o["gravity"] for o in doc["outputs"]] == [None, None, "smart", "center"]
    schema = {"$ref": "#/components/schemas/Job", "components": spec["components"]}
    jsonschema.validate(doc, _nullable_to_31(schema))
    doc["outputs"][2]["gravity"] = "north"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, _nullable_to_31(schema))


def _nullable_to_31(node: Any) -> Any:
    """OpenAPI 3.0 'nullable' in JSON-Schema terms, so jsonschema can check documents."""
    if isinstance(node, dict):
        out = {k: _nullable_to_31(v) for k, v in node.items() if k != "nullable"}
        if node.get("nullable") and "type" in node:
            out["type"] = [node["type"], "null"]
        return out
    if isinstance(node, list):
        return [_nullable_to_31(v) for v in node]
    return node
