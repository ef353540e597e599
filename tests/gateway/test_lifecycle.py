"""The data lifecycle over HTTP: 410 after expiry, the result cache, 507 on a full disk."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imgpipe.core import retention
from imgpipe.core.config import Settings
from tests.gateway import images as im
from tests.gateway.test_jobs import finish
from tests.support import fill_disk, make_settings


def submit(gw: Any, image: bytes, ops: str = "resize:w=16", **params: str) -> Any:
    body, ctype = im.multipart([image], [ops])
    return gw.post(body, ctype, params=params or None)


def test_an_expired_job_and_its_outputs_answer_410(settings: Settings,
                                                   make_gateway: Any) -> None:
    gw = make_gateway(settings)
    doc = submit(gw, im.jpeg(seed=3)).json
    finish(gw.store, doc["id"], 0)
    out = f"/api/jobs/{doc['id']}/outputs/0"
    assert gw.client.simulate_get(out).status_code == 200
    retention.sweep(gw.store, settings.with_overrides(job_ttl_s=1.0), now=4e9)
    for path in (f"/api/jobs/{doc['id']}", out):
        res = gw.client.simulate_get(path)
        assert res.status_code == 410, res.text
        assert res.json["error"] == "expired" and "IMGPIPE_JOB_TTL_S" in res.json["detail"]
    assert gw.client.simulate_get(
        "/api/jobs/00000000-0000-4000-8000-000000000000").status_code == 404


def test_a_repeat_upload_is_done_at_once_from_the_cache(settings: Settings,
                                                        make_gateway: Any) -> None:
    gw = make_gateway(settings)
    image = im.jpeg(seed=4)
    first = submit(gw, image).json
    assert first["outputs"][0]["cached"] is False
    finish(gw.store, first["id"], 0, data=b"\xff\xd8the output\xff\xd9")
    again = submit(gw, image, wait="5")
    assert again.status_code == 200, again.text  # final at once: nothing to wait for
    [out] = again.json["outputs"]
    assert (again.json["state"], out["state"], out["cached"]) == ("done", "done", True)
    a = gw.client.simulate_get(f"/api/jobs/{first['id']}/outputs/0")
    b = gw.client.simulate_get(out["url"])
    assert a.content == b.content == b"\xff\xd8the output\xff\xd9"
    bypass = submit(gw, image, cache="0").json
    assert (bypass["state"], bypass["outputs"][0]["cached"]) == ("queued", False)
    assert submit(gw, image, cache="maybe").status_code == 400
    metrics = gw.client.simulate_get("/api/metrics").json
    assert metrics["totals"]["cache_hits"] == 1 and metrics["cache_hit_ratio"] == 0.5
    prom = gw.client.simulate_get("/metrics").text
    assert 'imgpipe_cache_lookups_total{outcome="hit"} 1.0' in prom
    assert "imgpipe_data_bytes" in prom


def test_a_job_with_cache_0_neither_reads_nor_fills_the_cache(settings: Settings,
                                                              make_gateway: Any) -> None:
    gw = make_gateway(settings)
    image = im.jpeg(seed=8)
    raw = gw.client.simulate_post("/api/process/", body=image,
                                  params={"ops": "resize:w=16", "cache": "0"},
                                  headers={"Content-Type": "image/jpeg"})
    for doc in (submit(gw, image, cache="0").json, raw.json):
        finish(gw.store, doc["id"], 0)
    with gw.store._db() as db:  # type: ignore[attr-defined]
        shas = [r["sha256"] for r in db.execute("SELECT sha256 FROM images")]
    assert shas == ["", ""]  # never hashed
    later = submit(gw, image).json  # the same bytes and chain, cache on: a miss
    assert (later["state"], later["outputs"][0]["cached"]) == ("queued", False)
    finish(gw.store, later["id"], 0)
    assert submit(gw, image).json["outputs"][0]["cached"] is True  # this one filled it


def test_a_full_disk_answers_507_and_recovers(tmp_path: Path, make_gateway: Any,
                                              tmpfs: Callable[[str], Path]) -> None:
    disk = tmpfs("6m")
    settings = make_settings(disk / "data")
    gw = make_gateway(settings)
    image = im.jpeg(640, 480, seed=5)
    assert submit(gw, image).status_code == 202
    filler = disk / "filler"
    fill_disk(filler)
    res = submit(gw, image)
    assert res.status_code == 507, res.text
    assert res.json["error"] == "insufficient_storage" and "full" in res.json["detail"]
    assert list((disk / "data" / "tmp").glob("up-*")) == []  # nothing half-staged left
    assert gw.client.simulate_get("/healthz").status_code in (200, 503)  # still answers
    os.unlink(filler)
    again = submit(gw, image)
    assert again.status_code == 202, again.text


def test_over_the_byte_budget_with_nothing_finished_answers_507(
        settings: Settings, make_gateway: Any) -> None:
    gw = make_gateway(settings.with_overrides(max_data_bytes=1))
    first = submit(gw, im.jpeg(seed=6))
    assert first.status_code == 202  # the budget is checked before the upload
    res = submit(gw, im.jpeg(seed=7))
    assert res.status_code == 507 and "IMGPIPE_MAX_DATA_BYTES" in res.json["detail"]
    finish(gw.store, first.json["id"], 0)  # now it can be evicted to make room
    assert submit(gw, im.jpeg(seed=7)).status_code == 202
    assert gw.client.simulate_get(f"/api/jobs/{first.json['id']}").status_code == 410
