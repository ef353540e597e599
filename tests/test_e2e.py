"""End to end through the real stack: HTTP in, ventilator, workers, sink, HTTP out."""

from __future__ import annotations

import contextlib
from typing import Any

import httpx
import psutil
import pytest

from tests.images import jpeg, reference

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
    for k in range(6):  # 6 jobs x 8 images = 48 4K images queued at once
        resp = post(stack.url, [big[(k + i) % 4] for i in range(8)], ["resize:w=1920|blur:radius=2"])
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
