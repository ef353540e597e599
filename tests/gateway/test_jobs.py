"""Jobs in process: submit, record, notify, wait, outputs, backpressure.

The sink's part is played through the store (``write_output`` + ``complete``/``fail``)
and a PUB the test binds on ``event_endpoint``; the ventilator's intake is a PULL the
test binds. Everything else is the real app.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import zmq

from imgpipe.core.config import Settings
from imgpipe.core.protocol import (
    Done,
    GravityNote,
    Metric,
    Notice,
    decode,
    decode_topic,
    encode_topic,
)
from imgpipe.core.records import task_id
from imgpipe.core.sockets import make_socket
from imgpipe.core.store import Store
from imgpipe.gateway import pipeline as pipeline_mod
from imgpipe.gateway.pipeline import Pipeline, percentiles
from tests.gateway import images as im
from tests.support import recv, wait_for

DEFAULTS = ["resize:w=1920", "blur:radius=3", "brightness:factor=1.2"]


def finish(store: Store, job_id: str, n: int, data: bytes = b"\xff\xd8fake\xff\xd9", *,
           ok: bool = True, gravity: GravityNote | None = None) -> str | None:
    """Do what the sink does for one output."""
    tid = task_id(job_id, n)
    if not ok:
        return store.fail(tid, "corrupt JPEG data: premature end", worker="w-1", attempt=1)
    return store.complete(tid, data, worker="w-1", attempt=1, width=8, height=6,
                          content_type="image/jpeg", fmt="jpeg",
                          timings={"queue": 1.0, "decode": 2.0, "filters": 3.0,
                                   "encode": 4.0, "total": 10.0}, gravity=gravity)


def test_submit_records_the_job_and_notifies_the_ventilator(gateway: Any, zctx: Any,
                                                             settings: Settings) -> None:
    intake = make_socket(zctx, zmq.PULL, settings, bind=settings.intake_endpoint)
    try:
        body, ctype = im.multipart([im.jpeg(seed=1)])
        res = gateway.post(body, ctype)
        assert res.status_code == 202, res.text
        doc = res.json
        assert res.headers["location"] == f"/api/jobs/{doc['id']}"
        assert doc["state"] == "queued" and doc["progress"] == {"done": 0, "failed": 0,
                                                                 "total": 3}
        assert [o["ops"] for o in doc["outputs"]] == DEFAULTS
        assert [o["url"] for o in doc["outputs"]] == [
            f"/api/jobs/{doc['id']}/outputs/{n}" for n in range(3)]
        assert gateway.store.read_original(doc["id"], 0) == im.jpeg(seed=1)
        # the output folder is made while the job runs, not by the sink after a result
        assert (settings.data_dir / "outputs" / doc["id"]).is_dir()
        notice = decode(recv(intake))
        assert notice == Notice(job_id=doc["id"], outputs=3)
        assert gateway.client.simulate_get(f"/api/jobs/{doc['id']}").json == doc
    finally:
        intake.close(linger=0)


def test_a_raw_body_upload_takes_its_chains_from_the_query(gateway: Any) -> None:
    photo = im.jpeg(seed=2)
    # Two chains (commas inside each are theirs, not separators); the declared type is
    # not trusted: a JPEG sent as application/octet-stream is still a JPEG.
    for ctype in ("image/jpeg", "application/octet-stream", "image/png"):
        res = gateway.client.simulate_post(
            "/api/process/", body=photo, headers={"Content-Type": ctype},
            query_string="ops=resize%3Aw%3D64%2Ch%3D48&ops=invert%7Cflip")
        assert res.status_code == 202, res.text
        doc = res.json
        assert [o["ops"] for o in doc["outputs"]] == ["resize:w=64,h=48", "invert|flip"]
        assert gateway.store.read_original(doc["id"], 0) == photo
        assert gateway.store._blobs.original_path(doc["id"], 0, "jpeg").exists()
    # No ?ops: the default chains, as for a multipart upload without ops fields.
    res = gateway.client.simulate_post("/api/process/", body=photo,
                                       headers={"Content-Type": "image/jpeg"})
    assert [o["ops"] for o in res.json["outputs"]] == DEFAULTS


def test_outputs_are_image_major(gateway: Any) -> None:
    body, ctype = im.multipart([im.jpeg(seed=1), im.png()], ["invert", "grayscale|flip"])
    doc = gateway.post(body, ctype).json
    assert [(o["n"], o["image"], o["ops"]) for o in doc["outputs"]] == [
        (0, 0, "invert"), (1, 0, "grayscale|flip"), (2, 1, "invert"), (3, 1, "grayscale|flip")]
    listed = gateway.client.simulate_get("/api/jobs", params={"limit": "5"}).json["jobs"]
    assert [j["id"] for j in listed] == [doc["id"]]


def test_a_done_output_is_served_with_etag_and_immutable_caching(gateway: Any) -> None:
    body, ctype = im.multipart([im.jpeg()], ["invert"])
    job = gateway.post(body, ctype).json["id"]
    finish(gateway.store, job, 0, b"\xff\xd8 the output \xff\xd9")
    res = gateway.client.simulate_get(f"/api/jobs/{job}/outputs/0")
    assert res.status_code == 200
    assert res.content == b"\xff\xd8 the output \xff\xd9"
    assert res.headers["content-type"] == "image/jpeg"
    assert res.headers["cache-control"] == "private, max-age=31536000, immutable"
    assert res.headers["x-content-type-options"] == "nosniff"
    assert res.headers["content-security-policy"] == "default-src 'none'"
    etag = res.headers["etag"]
    again = gateway.client.simulate_get(f"/api/jobs/{job}/outputs/0",
                                        headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    other = gateway.client.simulate_get(f"/api/jobs/{job}/outputs/0",
                                        headers={"If-None-Match": '"nope"'})
    assert other.status_code == 200
    doc = gateway.client.simulate_get(f"/api/jobs/{job}").json
    assert doc["state"] == "done" and doc["outputs"][0]["timings_ms"]["filters"] == 3.0


def test_with_the_s3_blob_store_uploads_are_put_and_outputs_streamed_from_the_bucket(
        settings: Settings, make_gateway: Any, s3_server: str, s3_env: Any) -> None:
    import dataclasses

    from tests.support import bucket_keys, new_bucket

    bucket = new_bucket(s3_server)
    gateway = make_gateway(dataclasses.replace(settings, blob_url=f"s3://{bucket}/gw",
                                               s3_endpoint_url=s3_server))
    body, ctype = im.multipart([im.jpeg(seed=4)], ["invert"])
    job = gateway.post(body, ctype).json["id"]
    assert gateway.store.read_original(job, 0) == im.jpeg(seed=4)
    assert bucket_keys(s3_server, bucket) == [f"gw/originals/{job}/0.jpg"]
    assert list((settings.data_dir / "tmp").iterdir()) == []  # staged, put, removed
    output = bytes(range(256)) * 600
    finish(gateway.store, job, 0, output)
    res = gateway.client.simulate_get(f"/api/jobs/{job}/outputs/0")
    assert res.status_code == 200 and res.content == output
    assert res.headers["content-length"] == str(len(output))
    assert res.headers["content-type"] == "image/jpeg" and res.headers["etag"]
    repeat = gateway.post(body, ctype).json  # the result cache: a copy inside the bucket
    assert repeat["outputs"][0]["cached"] is True
    assert f"gw/outputs/{repeat['id']}/0.jpg" in bucket_keys(s3_server, bucket)
    res = gateway.client.simulate_get(f"/api/jobs/{repeat['id']}/outputs/0")
    assert res.status_code == 200 and res.content == output


def test_an_unreachable_blob_store_is_503_with_retry_after_and_nothing_recorded(
        settings: Settings, make_gateway: Any, s3_env: Any) -> None:
    import dataclasses

    from tests.support import free_port

    # An S3 endpoint nobody listens on: the outage a client should wait out. The job
    # store exists already (its first start counted the blobs' bytes).
    Store(settings.data_dir).close()
    down = f"http://127.0.0.1:{free_port()}"
    gateway = make_gateway(dataclasses.replace(settings, blob_url="s3://photos/gw",
                                               s3_endpoint_url=down))
    body, ctype = im.multipart([im.jpeg(seed=5)], ["invert"])
    res = gateway.post(body, ctype)
    assert res.status_code == 503, res.text
    assert res.json["error"] == "storage_unavailable" and int(res.headers["retry-after"]) >= 1
    assert gateway.store.totals().jobs == 0
    assert list((settings.data_dir / "tmp").iterdir()) == []
    assert gateway.client.simulate_get("/healthz").status_code in (200, 503)  # still serving


def test_a_failed_output_is_422_with_the_reason(gateway: Any) -> None:
    body, ctype = im.multipart([im.jpeg()], ["invert"])
    job = gateway.post(body, ctype).json["id"]
    finish(gateway.store, job, 0, ok=False)
    res = gateway.client.simulate_get(f"/api/jobs/{job}/outputs/0")
    assert res.status_code == 422
    assert "premature end" in res.json["detail"]


class FakeSink:
    """Completes every output of the next job that appears, then publishes Done events."""

    def __init__(self, zctx: Any, settings: Settings, store: Store, *, ok: bool = True) -> None:
        self.pub = make_socket(zctx, zmq.PUB, settings, bind=settings.event_endpoint)
        self.store, self.ok = store, ok
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        jobs = wait_for(lambda: self.store.recent_jobs(1), 10, what="a job")
        job = jobs[0]
        for out in job.outputs:
            state = finish(self.store, job.id, out.n, ok=self.ok)
            msg = Done(task_id=out.task_id, job_id=job.id, n=out.n,
                       state="done" if self.ok else "failed", job_state=state or "")
        # PUB drops until the gateway's SUB has joined: repeat until told to stop.
        while not self.stop.wait(0.05):
            self.pub.send_multipart(encode_topic(msg))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.pub.close(linger=0)


def test_wait_answers_200_with_the_finished_job(gateway: Any, zctx: Any,
                                                settings: Settings) -> None:
    sink = FakeSink(zctx, settings, gateway.store)
    try:
        body, ctype = im.multipart([im.jpeg()], ["invert", "flip"])
        res = gateway.post(body, ctype, params={"wait": "20"})
    finally:
        sink.close()
    assert res.status_code == 200, res.text
    assert res.json["state"] == "done"
    assert [o["state"] for o in res.json["outputs"]] == ["done", "done"]


def test_wait_with_accept_image_returns_the_image(gateway: Any, zctx: Any,
                                                  settings: Settings) -> None:
    sink = FakeSink(zctx, settings, gateway.store)
    try:
        body, ctype = im.multipart([im.jpeg()], ["invert"])
        res = gateway.post(body, ctype, params={"wait": "20"}, headers={"Accept": "image/*"})
    finally:
        sink.close()
    assert res.status_code == 200
    assert res.headers["content-type"] == "image/jpeg"
    assert res.content.startswith(b"\xff\xd8")


def test_wait_with_accept_image_and_a_failed_output_is_422(gateway: Any, zctx: Any,
                                                          settings: Settings) -> None:
    sink = FakeSink(zctx, settings, gateway.store, ok=False)
    try:
        body, ctype = im.multipart([im.jpeg()], ["invert"])
        res = gateway.post(body, ctype, params={"wait": "20"},
                           headers={"Accept": "image/webp, image/*;q=0.8"})
    finally:
        sink.close()
    assert res.status_code == 422
    assert res.headers["content-type"].startswith("application/json")


def test_get_job_with_wait_answers_once_the_job_is_final(gateway: Any, zctx: Any,
                                                        settings: Settings) -> None:
    body, ctype = im.multipart([im.jpeg()], ["invert"])
    job_id = gateway.post(body, ctype).json["id"]
    short = gateway.client.simulate_get(f"/api/jobs/{job_id}", params={"wait": "0.2"})
    assert short.status_code == 200 and short.json["state"] == "queued"
    sink = FakeSink(zctx, settings, gateway.store)
    try:
        res = gateway.client.simulate_get(f"/api/jobs/{job_id}", params={"wait": "20"})
    finally:
        sink.close()
    assert res.status_code == 200 and res.json["state"] == "done"
    bad = gateway.client.simulate_get(f"/api/jobs/{job_id}", params={"wait": "soon"})
    assert bad.status_code == 400 and bad.json["field"] == "wait"


def test_wait_that_runs_out_answers_202(gateway: Any) -> None:
    body, ctype = im.multipart([im.jpeg()], ["invert"])
    res = gateway.post(body, ctype, params={"wait": "0.3"})
    assert res.status_code == 202 and res.json["state"] == "queued"


def test_a_done_event_wakes_a_waiter_before_its_recheck(settings: Settings,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline_mod, "RECHECK_S", 3600.0)
    pipe = Pipeline(settings)
    try:
        final = threading.Event()
        job = "0b7d2a1e-3c4f-4a5b-8c6d-7e8f9a0b1c2d"

        def sink() -> None:
            final.set()
            pipe.handle_done(Done(task_id=task_id(job, 0), job_id=job, n=0, state="done",
                                  job_state="running"))  # not final: must not matter
            pipe.handle_done(Done(task_id=task_id(job, 1), job_id=job, n=1, state="done",
                                  job_state="done"))

        timer = threading.Timer(0.2, sink)
        timer.start()
        assert pipe.wait_final(job, 60.0, final.is_set) is True
        timer.join()
    finally:
        pipe.close()


def test_the_watcher_decodes_only_the_events_of_awaited_jobs(
        settings: Settings, zctx: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every gateway process hears every job's Done; it decodes those of jobs its own
    # requests wait on (a real PUB/SUB; no recheck of the store to fall back on).
    monkeypatch.setattr(pipeline_mod, "RECHECK_S", 3600.0)
    waited, other = "0b7d2a1e-3c4f-4a5b-8c6d-7e8f9a0b1c2d", "9f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0"
    pub = make_socket(zctx, zmq.XPUB, settings, bind=settings.event_endpoint)
    pipe = Pipeline(settings)
    handled: list[str] = []
    handle = pipe.handle_done
    monkeypatch.setattr(pipe, "handle_done", lambda msg: (handled.append(msg.job_id),
                                                          handle(msg)))
    try:
        pipe.start()
        assert recv(pub, 10)[0][:1] == b"\x01"  # the watcher subscribed
        final = threading.Event()
        woken: list[bool] = []
        waiter = threading.Thread(target=lambda: woken.append(
            pipe.wait_final(waited, 60.0, final.is_set)))
        waiter.start()
        wait_for(lambda: waited in pipe._waiters, 10, what="the waiter")
        for job in (other, waited):
            done = Done(task_id=task_id(job, 0), job_id=job, n=0, state="done",
                        job_state="done")
            if job == waited:
                final.set()
            pub.send_multipart(encode_topic(done))
        waiter.join(30)
        assert woken == [True]
        assert handled == [waited]
        assert pipe.awaited([b"done", b"{}", b"extra"])  # malformed: left to decode
    finally:
        pipe.close()
        pub.close(linger=0)


def test_backpressure_refuses_with_retry_after_and_records_nothing(
        settings: Settings, make_gateway: Any) -> None:
    gw = make_gateway(settings.with_overrides(queue_limit=4))
    body, ctype = im.multipart([im.jpeg()], ["invert", "flip", "grayscale"])
    first = gw.post(body, ctype)
    assert first.status_code == 202
    refused = gw.post(body, ctype)
    assert refused.status_code == 503
    assert refused.json["error"] == "queue_full"
    assert int(refused.headers["retry-after"]) >= 1
    assert gw.store.totals().jobs == 1
    assert list((gw.store.root / "tmp").glob("up-*")) == []
    assert len(list((gw.store.root / "originals").iterdir())) == 1
    for n in range(3):
        finish(gw.store, first.json["id"], n)
    assert gw.post(body, ctype).status_code == 202


def test_a_job_larger_than_the_limit_is_taken_when_the_queue_is_empty(
        settings: Settings, make_gateway: Any) -> None:
    gw = make_gateway(settings.with_overrides(queue_limit=2))
    body, ctype = im.multipart([im.jpeg()], ["invert", "flip", "grayscale"])
    assert gw.post(body, ctype).status_code == 202
    assert gw.post(body, ctype).status_code == 503


def test_a_full_intake_socket_never_blocks_a_request(settings: Settings,
                                                     make_gateway: Any) -> None:
    gw = make_gateway(settings)
    body, ctype = im.multipart([im.jpeg()], ["invert"])
    gw.pipeline.start()
    sent = [gw.pipeline.notify("0b7d2a1e-3c4f-4a5b-8c6d-7e8f9a0b1c2d", 1)
            for _ in range(1500)]  # no ventilator: the HWM fills, then NOBLOCK drops
    assert not all(sent) and gw.pipeline.notices_dropped > 0
    assert gw.post(body, ctype).status_code == 202


def test_percentiles_nearest_rank() -> None:
    assert percentiles([]) == {"p50": None, "p95": None, "p99": None}
    values = [float(v) for v in range(1, 101)]
    assert percentiles(values) == {"p50": 50.0, "p95": 95.0, "p99": 99.0}
    assert percentiles([7.0]) == {"p50": 7.0, "p95": 7.0, "p99": 7.0}


def test_the_gateway_publishes_its_metrics_on_the_bus(settings: Settings, zctx: Any,
                                                      make_gateway: Any) -> None:
    s = settings.with_overrides(metrics_interval_s=0.1)
    bus = make_socket(zctx, zmq.SUB, s, bind=s.bus_endpoint, subscribe=(b"metric",))
    try:
        gw = make_gateway(s)
        gw.client.simulate_get("/api/jobs/nope")
        gw.client.simulate_get("/api/filters")
        deadline = time.monotonic() + 10
        seqs: list[int] = []
        while time.monotonic() < deadline and len(seqs) < 2:
            frames = recv(bus, timeout=5)
            msg = decode_topic(frames)
            assert isinstance(msg, Metric) and msg.role == "gateway"
            seqs.append(msg.seq)
            values = msg.values
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert values["requests"] == {"404": 1, "200": 1}
        assert set(values["latency_ms"]) == {"p50", "p95", "p99"}
    finally:
        bus.close(linger=0)


def test_a_jpeg_whose_size_sits_past_the_probed_head_is_accepted(gateway: Any) -> None:
    plain = im.jpeg(50, 30, seed=4)
    comment = b"\xff\xfe" + (65535).to_bytes(2, "big") + b"c" * 65533
    padded = plain[:2] + comment * 5 + plain[2:]  # SOF now ~320 KB in
    body, ctype = im.multipart([padded], ["invert"])
    res = gateway.post(body, ctype)
    assert res.status_code == 202, res.text
    assert gateway.store.read_original(res.json["id"], 0) == padded
