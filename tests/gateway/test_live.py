"""The gateway over real HTTP: gunicorn + the real ventilator, sink and workers.

One stack per module (starting it is the slow part); tests that need other gateway
settings start an extra gateway on the same store and pipeline.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from imgpipe.core.store import Store
from tests.gateway import images as im
from tests.gateway.live import Gateway, Stack
from tests.gateway.test_validation import CASES, Case
from tests.support import make_settings, short_dir, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    root = short_dir("gw-")
    settings = make_settings(root / "data", gateway_workers=2, gateway_threads=4,
                             gateway_timeout_s=4.0, heartbeat_interval_s=0.5,
                             heartbeat_liveness=6, metrics_interval_s=0.5, test_hooks=True)
    s = Stack(settings, root / "logs")
    try:
        s.start_pipeline(workers=2)
        yield s
    finally:
        s.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def gw(stack: Stack) -> Iterator[Gateway]:
    g = stack.start_gateway()
    g.wait_healthy()
    # Healthy needs one live worker; the tests count on both having sent a heartbeat.
    wait_for(lambda: len([w for w in g.http.get("/api/workers").json()["workers"]
                          if w["state"] != "lost"]) == 2, 60, what="both workers alive")
    yield g
    g.close()


def decode_image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def raw_request(gw: Gateway, method: str, path: str, body: bytes = b"",
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request sent as-is (no path normalisation), via http.client."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.settings.gateway_port, timeout=60)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        res = conn.getresponse()
        return res.status, {k.lower(): v for k, v in res.getheaders()}, res.read()
    finally:
        conn.close()


def test_the_demo_with_curl_then_the_three_outputs(gw: Gateway, tmp_path: Path) -> None:
    src = tmp_path / "test.jpg"
    src.write_bytes(im.jpeg(640, 480, seed=7))
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("no curl binary")
    out = subprocess.run([curl, "-sS", "-X", "POST", "-F", f"image=@{src}",
                          f"{gw.url}/api/process/"], capture_output=True, timeout=60, check=True)
    doc = json.loads(out.stdout)
    assert doc["state"] in ("queued", "running", "done")
    assert [o["ops"] for o in doc["outputs"]] == [
        "resize:w=1920", "blur:radius=3", "brightness:factor=1.2"]
    doc = gw.wait_job(doc["id"])
    assert doc["state"] == "done", doc
    for output in doc["outputs"]:
        dest = tmp_path / f"out{output['n']}"
        subprocess.run([curl, "-sS", "-f", "-o", str(dest), gw.url + output["url"]],
                       check=True, timeout=60)
        img = decode_image(dest.read_bytes())
        assert img.format == "JPEG" and img.size == (output["width"], output["height"])
    assert doc["outputs"][0]["width"] == 1920
    assert (doc["outputs"][1]["width"], doc["outputs"][1]["height"]) == (640, 480)


def test_a_raw_upload_with_curl_expecting_100_continue(gw: Gateway, tmp_path: Path) -> None:
    # curl sends a body over 1 MB only once told to (Expect: 100-continue): the 100 must
    # come before the body is read off the socket, or curl waits out its own timeout.
    src = tmp_path / "big.jpg"
    src.write_bytes(im.jpeg(3840, 2160, seed=5))
    assert src.stat().st_size > 1 << 20
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("no curl binary")
    out = subprocess.run(
        [curl, "-sS", "-f", "--max-time", "40", "--expect100-timeout", "120",
         "-H", "Content-Type: image/jpeg", "-H", "Accept: image/jpeg",
         "--data-binary", f"@{src}", f"{gw.url}/api/process/?wait=30&ops=resize:w=640"],
        capture_output=True, timeout=60, check=True)
    assert decode_image(out.stdout).size == (640, 360)


def test_wait_answers_200_and_accept_image_returns_the_image(gw: Gateway) -> None:
    body, ctype = im.multipart([im.jpeg(320, 240, seed=2)], ["resize:w=100"])
    res = gw.http.post("/api/process/", params={"wait": "60"}, content=body,
                       headers={"Content-Type": ctype, "Accept": "image/*"})
    assert res.status_code == 200, res.text
    assert res.headers["content-type"] == "image/jpeg"
    assert decode_image(res.content).size == (100, 75)
    body, ctype = im.multipart([im.png()], ["invert", "flip"])
    res = gw.http.post("/api/process/?wait=60", content=body, headers={"Content-Type": ctype})
    assert res.status_code == 200 and res.json()["state"] == "done"


def test_every_read_endpoint(gw: Gateway) -> None:
    body, ctype = im.multipart([im.jpeg(seed=3)], ["grayscale|encode:format=png"])
    job = gw.http.post("/api/process/?wait=60", content=body,
                       headers={"Content-Type": ctype}).json()
    assert job["state"] == "done", job
    out = gw.http.get(job["outputs"][0]["url"])
    assert out.status_code == 200 and out.headers["content-type"] == "image/png"
    assert out.headers["cache-control"] == "private, max-age=31536000, immutable"
    assert out.headers["x-content-type-options"] == "nosniff"
    assert decode_image(out.content).mode == "L"
    again = gw.http.get(job["outputs"][0]["url"], headers={"If-None-Match": out.headers["etag"]})
    assert again.status_code == 304
    assert job["id"] in [j["id"] for j in gw.http.get("/api/jobs?limit=50").json()["jobs"]]

    filters = gw.http.get("/api/filters").json()["filters"]
    assert {"resize", "sleep"} <= {f["name"] for f in filters}  # test hooks are on
    workers = gw.http.get("/api/workers").json()["workers"]
    assert len([w for w in workers if w["state"] != "lost"]) == 2
    assert {"id", "host", "pid", "state", "done", "cpu", "rss", "last_beat_age_s"} <= set(
        workers[0])
    m = gw.http.get("/api/metrics").json()
    assert m["ventilator"] == "up" and m["workers"]["alive"] == 2
    assert m["totals"]["done"] >= 1 and m["recommendation"]["action"]
    prom = gw.http.get("/metrics")
    names = {f.name for f in text_string_to_metric_families(prom.text)}
    assert {"imgpipe_queue_depth", "imgpipe_workers", "imgpipe_requests"} <= names
    assert gw.http.get("/healthz").status_code == 200
    validate(gw.http.get("/openapi.json").json())


@pytest.mark.timeout(600)
def test_a_batch_of_ten_4k_images_in_one_job(gw: Gateway) -> None:
    images = [im.smooth_jpeg(3840, 2160, seed=i) for i in range(10)]
    body, ctype = im.multipart(images, ["resize:w=640"])
    res = gw.http.post("/api/process/", content=body, headers={"Content-Type": ctype})
    assert res.status_code == 202, res.text
    doc = gw.wait_job(res.json()["id"], timeout=500)
    assert doc["state"] == "done", doc
    assert [o["image"] for o in doc["outputs"]] == list(range(10))
    for output in doc["outputs"]:
        assert (output["width"], output["height"]) == (640, 360)
    assert decode_image(gw.http.get(doc["outputs"][9]["url"]).content).size == (640, 360)


def _stall(gw: Gateway, *, body_part: bool, raw: bool = False) -> socket.socket:
    """A client that sends half a request (headers only, or half a body) and stops;
    ``raw``: the body is the image itself (read straight off the socket)."""
    body, ctype = ((im.jpeg(320, 240, seed=9), "image/jpeg") if raw
                   else im.multipart([im.jpeg(seed=9)]))
    sock = socket.create_connection(("127.0.0.1", gw.settings.gateway_port), timeout=60)
    head = (f"POST /api/process/ HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    sock.sendall(head + body[: len(body) // 2] if body_part else head[: len(head) // 2])
    return sock


def _answer_or_close(sock: socket.socket) -> bytes:
    """What the server sends before it closes (blocks up to the socket's 60 s timeout)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_stalled_clients_cannot_hold_the_gateway(gw: Gateway) -> None:
    # More stalled uploads than the gateway has threads (2 workers x 4 threads), plus
    # clients stalled inside their headers.
    stalled = [_stall(gw, body_part=True, raw=i % 2 == 1) for i in range(10)]
    stalled += [_stall(gw, body_part=False) for _ in range(3)]
    try:
        # Other requests are still answered (once the stalled ones are cut at the latest).
        assert gw.http.get("/healthz", timeout=60).status_code == 200
        body, ctype = im.multipart([im.jpeg(seed=10)], ["invert"])
        res = gw.http.post("/api/process/?wait=60", content=body,
                           headers={"Content-Type": ctype}, timeout=90)
        assert res.status_code == 200, res.text
        # Each stalled client is cut: a 408 for a stalled body, a close for stalled headers.
        answers = [_answer_or_close(s) for s in stalled]
        for a in answers[:10]:
            assert a.startswith(b"HTTP/1.1 408"), a[:200]
            assert b'"error": "timeout"' in a
        for a in answers[10:]:
            assert a == b"" or a.startswith(b"HTTP/1.1 4"), a[:200]
    finally:
        for s in stalled:
            s.close()


def _send_case(gw: Gateway, case: Case) -> tuple[int, dict[str, Any]]:
    method, path, body, headers = case.build()
    status, _, data = raw_request(gw, method, path, body, headers)
    assert data, (case.name, status)
    return status, json.loads(data)


def test_the_bad_input_table_over_http_leaves_the_service_healthy(gw: Gateway) -> None:
    for case in CASES:
        status, doc = _send_case(gw, case)
        assert status == case.status, (case.name, doc)
        assert doc["error"] and doc["detail"], (case.name, doc)
        if case.field:
            assert doc.get("field") == case.field, (case.name, doc)
    # What gunicorn refuses itself is JSON too: a request line over its limit.
    status, headers, data = raw_request(gw, "GET", "/api/jobs/" + "a" * 9000)
    assert status == 414 and headers["content-type"] == "application/json"
    assert json.loads(data)["error"] == "uri_too_long"
    # 60 MB announced, a few bytes sent: refused at once, the body never read.
    sock = socket.create_connection(("127.0.0.1", gw.settings.gateway_port), timeout=30)
    try:
        sock.sendall(b"POST /api/process/ HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/"
                     b"form-data; boundary=b\r\nContent-Length: 62914560\r\n\r\n--b\r\n")
        reply = sock.recv(65536)
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        assert b"content-length:" in reply.lower()  # a JSON body follows (header case varies)
    finally:
        sock.close()
    assert gw.http.get("/healthz").status_code == 200
    body, ctype = im.multipart([im.jpeg(seed=11)], ["blur:radius=2"])
    res = gw.http.post("/api/process/?wait=60", content=body, headers={"Content-Type": ctype})
    assert res.status_code == 200 and res.json()["state"] == "done"


def test_backpressure_answers_503_quickly_and_every_accepted_job_completes(
        stack: Stack, gw: Gateway) -> None:
    small = stack.extra_gateway(queue_limit=6)
    try:
        body, ctype = im.multipart([im.jpeg(seed=12)],
                                   ["sleep:ms=1500", "sleep:ms=1500|invert", "invert"])
        accepted, refused = [], []
        for _ in range(6):
            res = small.http.post("/api/process/", content=body, headers={"Content-Type": ctype})
            assert res.status_code in (202, 503), res.text
            if res.status_code == 202:
                accepted.append(res.json()["id"])
            else:
                refused.append(res)
        assert len(accepted) >= 2 and refused, (accepted, refused)
        for res in refused:
            assert int(res.headers["retry-after"]) >= 1
            assert res.json()["error"] == "queue_full"
        for job in accepted:
            assert small.wait_job(job)["state"] == "done"
    finally:
        small.kill()
        small.close()


def test_schemathesis_finds_no_server_error(gw: Gateway, tmp_path: Path) -> None:
    cmd = [str(Path(sys.executable).with_name("schemathesis")), "--no-color", "run", f"{gw.url}/openapi.json",
           "--checks", "not_a_server_error", "--max-examples", "12", "--workers", "1",
           "--phases", "examples,coverage,fuzzing", "--request-timeout", "60",
           "--generation-database", "none"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=280, cwd=tmp_path)
    report = out.stdout[-5000:] + out.stderr[-2000:]
    assert out.returncode == 0, report
    assert "not_a_server_error" in out.stdout or "passed" in out.stdout.lower(), report
    assert gw.http.get("/healthz").status_code == 200


def test_a_gateway_killed_with_sigkill_loses_no_accepted_job(stack: Stack) -> None:
    port_gw = stack.extra_gateway()
    body, ctype = im.multipart([im.jpeg(seed=13)], ["sleep:ms=300", "invert"])
    accepted: list[str] = []
    stop = threading.Event()

    def submit() -> None:
        while not stop.is_set():
            try:
                res = port_gw.http.post("/api/process/", content=body,
                                        headers={"Content-Type": ctype}, timeout=10)
            except httpx.HTTPError:
                return  # the gateway died under us: nothing was promised
            if res.status_code == 202:
                accepted.append(res.json()["id"])

    thread = threading.Thread(target=submit)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while len(accepted) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        port_gw.kill()
    finally:
        stop.set()
        thread.join(30)
    assert len(accepted) >= 3
    settings = port_gw.settings
    port_gw.close()
    again = stack.start_gateway(gateway_port=settings.gateway_port,
                                gateway_url=settings.gateway_url)
    try:
        for job in accepted:
            assert again.wait_job(job)["state"] == "done"
        assert again.http.get(f"/api/jobs/{uuid.uuid4()}").status_code == 404
    finally:
        again.kill()
        again.close()


def test_a_chunked_upload_over_the_limit_is_413_while_streaming(stack: Stack) -> None:
    small = stack.extra_gateway(max_upload_bytes=200_000)
    try:
        body, ctype = im.multipart([im.jpeg(400, 400, seed=14)] * 3)
        assert len(body) > 200_000

        def chunks() -> Iterator[bytes]:
            for i in range(0, len(body), 16384):
                yield body[i:i + 16384]

        res = small.http.post("/api/process/", content=chunks(),
                              headers={"Content-Type": ctype})
        assert res.status_code == 413, res.text
        assert res.json()["field"] == "body"
        # A new connection: after a 413 mid-body the server closes the old one.
        ok_body, ok_ctype = im.multipart([im.jpeg(seed=15)], ["invert"])
        res = httpx.post(small.url + "/api/process/", content=iter([ok_body]),
                         headers={"Content-Type": ok_ctype}, timeout=60)
        assert res.status_code == 202, res.text
    finally:
        small.kill()
        small.close()


def test_trickling_request_heads_hold_no_thread_and_are_closed(stack: Stack) -> None:
    # One process of 4 threads; 64 clients each sending its request head a byte a second.
    small = stack.extra_gateway(gateway_workers=1, gateway_threads=4, header_timeout_s=8.0)
    small.wait_healthy()
    head = b"GET /healthz HTTP/1.1\r\nHost: trickle\r\nX-Slow: " + b"z" * 64 + b"\r\n\r\n"
    socks = [socket.create_connection(("127.0.0.1", small.settings.gateway_port), timeout=20)
             for _ in range(64)]
    rounds = threading.Semaphore(0)
    stop = threading.Event()

    def trickle() -> None:
        for i in range(len(head) - 4):  # never the end of the head
            for s in socks:
                with contextlib.suppress(OSError):  # closed by the server: expected
                    s.send(head[i:i + 1])
            rounds.release()
            if stop.wait(1.0):
                return

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        for _ in range(2):  # every trickler has sent bytes: stock gthread gave each a thread
            assert rounds.acquire(timeout=10), "the trickler did not send"
        with httpx.Client(base_url=small.url, timeout=5.0) as http:
            for _ in range(5):
                assert http.get("/healthz").status_code == 200
                assert http.get("/openapi.json").status_code == 200
        # A head that never completes is closed at its deadline (8 s here), 408 first.
        for s in socks:
            answer = _answer_or_close(s)
            assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer[:200]
    finally:
        stop.set()
        thread.join(10)
        for s in socks:
            s.close()
        small.kill()
        small.close()


def test_api_keys_over_http_and_insecure_beyond_loopback(stack: Stack) -> None:
    keyed = stack.extra_gateway(api_keys="live-key-1,live-key-2", gateway_host="0.0.0.0")
    try:
        body, ctype = im.multipart([im.jpeg(seed=16)], ["invert"])
        res = keyed.http.post("/api/process/?wait=60", content=body,
                              headers={"Content-Type": ctype})
        assert res.status_code == 401 and res.headers["www-authenticate"].startswith("Bearer")
        assert keyed.http.get("/healthz").status_code == 200
        mine = {"Authorization": "Bearer live-key-1"}
        res = keyed.http.post("/api/process/?wait=60", content=body,
                              headers={"Content-Type": ctype, **mine})
        assert res.status_code == 200 and res.json()["state"] == "done", res.text
        job = res.json()["id"]
        assert keyed.http.get(f"/api/jobs/{job}/outputs/0", headers=mine).status_code == 200
        theirs = {"Authorization": "Bearer live-key-2"}
        assert keyed.http.get(f"/api/jobs/{job}/outputs/0", headers=theirs).status_code == 404
    finally:
        keyed.kill()
        keyed.close()
    open_gw = stack.extra_gateway(gateway_host="0.0.0.0", insecure=True)
    try:
        assert open_gw.http.get("/api/filters").status_code == 200
    finally:
        open_gw.kill()
        open_gw.close()


def test_pipelined_requests_are_all_answered(gw: Gateway) -> None:
    sock = socket.create_connection(("127.0.0.1", gw.settings.gateway_port), timeout=30)
    try:
        one = b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n"
        last = b"GET /api/filters HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        sock.sendall(one + one + last)
        answer = _answer_or_close(sock)
        assert answer.count(b"HTTP/1.1 200") == 3, answer[:300]
        assert b'"filters"' in answer
    finally:
        sock.close()


@pytest.mark.parametrize("size", [(64, 48), (3840, 2160)], ids=["small", "4k"])
def test_a_request_pipelined_behind_a_raw_upload_is_answered(gw: Gateway,
                                                               size: tuple[int, int]) -> None:
    # The raw body is read straight off the socket: exactly its Content-Length, so the
    # request behind it (in the same packet for a small image) is still gunicorn's.
    image = im.jpeg(*size, seed=11)
    sock = socket.create_connection(("127.0.0.1", gw.settings.gateway_port), timeout=60)
    try:
        upload = (f"POST /api/process/?wait=60&ops=invert HTTP/1.1\r\nHost: x\r\n"
                  f"Content-Type: image/jpeg\r\nContent-Length: {len(image)}\r\n\r\n"
                  ).encode() + image
        last = b"GET /api/filters HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        sock.sendall(upload + last)
        answer = _answer_or_close(sock)
        assert answer.count(b"HTTP/1.1 200") == 2, answer[:600]
        doc = json.loads(answer.split(b"\r\n\r\n", 1)[1].split(b"HTTP/1.1 ", 1)[0])
        assert doc["state"] == "done", doc
        assert doc["outputs"][0]["width"] == size[0]
        assert answer.rstrip().endswith(b"}") and b'"filters"' in answer
    finally:
        sock.close()


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "multipart"])
def test_a_body_shorter_than_its_content_length_is_refused(gw: Gateway, raw: bool) -> None:
    # The client closes early. The image it sent is whole (its end marker is there), but
    # the message is not: 400, nothing recorded, and the service answers the next one.
    body, ctype = ((im.jpeg(320, 240, seed=3), "image/jpeg") if raw
                   else im.multipart([im.jpeg(320, 240, seed=3)], ["invert"]))
    store = Store.from_settings(gw.settings)
    try:
        jobs = store.totals().jobs
        sock = socket.create_connection(("127.0.0.1", gw.settings.gateway_port), timeout=60)
        try:
            sock.sendall((f"POST /api/process/?ops=invert HTTP/1.1\r\nHost: x\r\n"
                          f"Content-Type: {ctype}\r\nContent-Length: {len(body) + 1000}"
                          f"\r\n\r\n").encode() + body)
            sock.shutdown(socket.SHUT_WR)
            answer = _answer_or_close(sock)
        finally:
            sock.close()
        assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
        if raw:
            assert b"cut short" in answer and b'"field": "body"' in answer
        assert store.totals().jobs == jobs
    finally:
        store.close()
    assert gw.http.get("/healthz").status_code == 200


def test_raw_uploads_on_one_kept_alive_connection(gw: Gateway) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", gw.settings.gateway_port, timeout=60)
    try:
        for seed, (w, h) in enumerate([(3840, 2160), (64, 48), (1280, 720)]):
            image = im.jpeg(w, h, seed=seed)
            conn.request("POST", "/api/process/?wait=60&ops=resize:w=32", body=image,
                         headers={"Content-Type": "image/jpeg", "Accept": "image/png"})
            res = conn.getresponse()
            data = res.read()
            assert res.status == 200, data[:300]
            assert decode_image(data).size == (32, round(32 * h / w)), (w, h)
            assert res.getheader("connection", "").lower() != "close"
    finally:
        conn.close()
