"""End to end through the real stack: HTTP in, ventilator, workers, sink, HTTP out."""

from __future__ import annotations

import contextlib
from typing import Any

import httpx
import psutil
import pytest

from tests.images import detail_png, jpeg, reference

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CHAINS = ["resize:w=320|blur:radius=2|brightness:factor=1.1",
          "grayscale|edges:low=50,high=150|encode:format=png",
          "rotate:deg=90|sharpen:amount=1.5|encode:format=webp,quality=80"]


def post(url: str, images: list[bytes], chains: list[str], **params: Any) -> httpx.Response:
    files = [("image", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    return httpx.post(f"{url}/api/process/", files=files, data={"ops": chains},
                      params=params, timeout=120)


def test_twenty_images_three_chains_match_the_library_in_process(stack_factory: Any,
                                                                 store_url: str) -> None:
    """On each job store backend (SQLite, PostgreSQL)."""
    stack = stack_factory(3, store_url=store_url)
    images = [jpeg(640 + 16 * i, 360 + 8 * i, seed=i) for i in range(20)]
    jobs = []
    for batch in (images[:10], images[10:]):  # two jobs: 16 images is the per-job limit
        resp = post(stack.url, batch, CHAINS, wait=120)
        assert resp.status_code == 200, resp.text
        jobs.append(resp.json())
    workers = set()
    for job, batch in zip(jobs, (images[:10], images[10:]), strict=True):
        assert job["state"] == "done", job
        assert len(job["outputs"]) == 30
        for out in job["outputs"]:
            got = httpx.get(stack.url + out["url"], timeout=30)
            assert got.status_code == 200
            want = reference(batch[out["image"]], out["ops"])
            assert got.content == want, f"output {out['n']} ({out['ops']}) differs"
            assert out["attempts"] >= 1 and out["timings_ms"]["filters"] is not None
            workers.add(out["worker"])
    assert len(workers) >= 2, "the work should spread over more than one worker"


def test_a_burst_of_4k_images_keeps_memory_bounded(stack_factory: Any) -> None:
    """48 4K images at once: each worker holds at most its slots; RSS stays bounded."""
    stack = stack_factory(2)
    big = [jpeg(3840, 2160, seed=s) for s in range(4)]
    ids = []
    # 6 jobs x 8 images = 48 4K images queued at once, decoded whole (no resize first)
    # and blurred in the pool: seconds of work, so the workers' heartbeats (1 s) show
    # them busy on any machine.
    for k in range(6):
        resp = post(stack.url, [big[(k + i) % 4] for i in range(8)], ["blur:radius=10"])
        assert resp.status_code == 202, resp.text
        ids.append(resp.json()["id"])
    peak_inflight = 0
    peak_rss: dict[str, int] = {}
    procs = {p.pid: p for p in psutil.Process(stack.proc.pid).children(recursive=True)}

    def finished() -> bool:
        nonlocal peak_inflight
        for w in stack.workers():
            peak_inflight = max(peak_inflight, w["inflight"])
            assert w["inflight"] <= w["slots"], w
        for pid, p in procs.items():
            with contextlib.suppress(psutil.NoSuchProcess):
                peak_rss[str(pid)] = max(peak_rss.get(str(pid), 0), p.memory_info().rss)
        states = [httpx.get(f"{stack.url}/api/jobs/{i}", timeout=10).json()["state"]
                  for i in ids]
        return all(s == "done" for s in states)

    from tests.support import wait_for

    wait_for(finished, 240, interval=0.25, what="48 4K images done")
    assert peak_inflight >= 1
    # A decoded 4K frame is 25 MB; a worker holds at most `slots` of them plus the
    # pool's copies. 600 MB per process is far above that and far below 48 frames.
    assert max(peak_rss.values()) < 600 * 1024 * 1024, peak_rss


def test_the_job_document_says_where_smart_gravity_put_each_window(stack_factory: Any) -> None:
    """Detail off centre on a plain background -> smart; a flat image -> center; a chain
    without smart gravity -> null. A repeat served from the cache says the same."""
    stack = stack_factory(1)
    images = [detail_png(640, 360), detail_png(640, 360, flat=True)]
    chains = ["crop:w=200,h=150,gravity=smart", "resize:w=96,h=96,fit=cover,gravity=smart",
              "crop:w=200,h=150,gravity=east|grayscale"]
    want = ["smart", "smart", None, "center", "center", None]  # image-major
    for cached in (False, True):
        resp = post(stack.url, images, chains, wait=120)
        assert resp.status_code == 200, resp.text
        job = resp.json()
        assert job["state"] == "done", job
        outs = job["outputs"]
        assert [o["gravity"] for o in outs] == want, outs
        assert all(o["cached"] is cached for o in outs), outs
        again = httpx.get(f"{stack.url}/api/jobs/{job['id']}", timeout=30).json()
        assert [o["gravity"] for o in again["outputs"]] == want


def test_the_whole_path_with_the_s3_blob_store(stack_factory: Any, s3_server: str) -> None:
    """Gateway, ventilator and sink see the images only through the S3 store (moto's
    server): upload, done, output streamed from the bucket, a cached repeat copied inside
    it, and eviction past the byte budget removing the objects."""
    from tests.images import png
    from tests.support import S3_ENV, bucket_keys, new_bucket, wait_for

    bucket = new_bucket(s3_server)
    stack = stack_factory(1, env=S3_ENV, blob_url=f"s3://{bucket}/e2e",
                          s3_endpoint_url=s3_server, job_ttl_s=0.0,
                          max_data_bytes=1_000_000, sweep_interval_s=0.5)
    image, chain = jpeg(160, 120, seed=7), "resize:w=64|encode:format=png"
    first = post(stack.url, [image], [chain], wait=60)
    assert first.status_code == 200 and first.json()["state"] == "done", first.text
    j1 = first.json()["id"]
    got = httpx.get(stack.url + first.json()["outputs"][0]["url"], timeout=30)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert got.content == reference(image, chain)
    assert int(got.headers["content-length"]) == len(got.content)
    keys = bucket_keys(s3_server, bucket)
    assert {f"e2e/originals/{j1}/0.jpg", f"e2e/outputs/{j1}/0.png"} <= set(keys), keys
    data = stack.settings.data_dir
    assert not list(data.glob("originals/*")) and not list(data.glob("outputs/*"))

    again = post(stack.url, [image], [chain], wait=60)
    assert again.status_code == 200, again.text
    j2, out = again.json()["id"], again.json()["outputs"][0]
    assert again.json()["state"] == "done" and out["cached"] is True, again.text
    assert f"e2e/outputs/{j2}/0.png" in bucket_keys(s3_server, bucket)
    assert httpx.get(stack.url + out["url"], timeout=30).content == got.content

    # A ~2 MB upload takes the store past its 1 MB budget: the sink evicts the oldest
    # finished jobs, and their objects go with them.
    big = post(stack.url, [png(1000, 1000, seed=3)], ["resize:w=64"])
    assert big.status_code == 202, big.text
    for j in (j1, j2):
        wait_for(lambda j=j: httpx.get(f"{stack.url}/api/jobs/{j}", timeout=5).status_code
                 == 410, 60, what=f"job {j} evicted")
    left = bucket_keys(s3_server, bucket)
    assert not [k for k in left if j1 in k or j2 in k], left
    totals = httpx.get(f"{stack.url}/api/metrics", timeout=5).json()["totals"]
    assert totals["jobs_evicted"] >= 2
