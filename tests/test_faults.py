"""Faults against the real stack, with real signals; every test counts lost and duplicated.

Jepsen-style: whatever is killed, every accepted output ends exactly once — ``done``
with one file that decodes at the right size, or ``failed`` with a reason — and the
client never sees two results for one output.
"""

from __future__ import annotations

import io
import os
import signal
import time
from typing import Any

import httpx
import pytest
import zmq
from PIL import Image

from imgpipe.core.control import ask, supervisor_endpoint
from tests.images import jpeg
from tests.support import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

HOOKS = {"test_hooks": True}


def submit(url: str, images: list[bytes], chains: list[str]) -> str:
    files = [("image", (f"{i}.jpg", d, "image/jpeg")) for i, d in enumerate(images)]
    resp = httpx.post(f"{url}/api/process/", files=files, data={"ops": chains}, timeout=60)
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def wait_final(url: str, ids: list[str], timeout: float = 180) -> list[dict[str, Any]]:
    def final() -> list[dict[str, Any]] | None:
        jobs = [httpx.get(f"{url}/api/jobs/{i}", timeout=10).json() for i in ids]
        return jobs if all(j["state"] in ("done", "failed", "partial") for j in jobs) else None

    return wait_for(final, timeout, interval=0.3, what="every job final")


def audit(stack: Any, jobs: list[dict[str, Any]],
          sizes: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Counters over every output: done, failed, lost (not final), bad files, extra files.

    ``sizes`` maps each chain to the size its output must decode at.
    """
    c = {"done": 0, "failed": 0, "lost": 0, "bad_file": 0, "extra_files": 0}
    for job in jobs:
        for out in job["outputs"]:
            if out["state"] == "done":
                c["done"] += 1
                body = httpx.get(stack.url + out["url"], timeout=30).content
                if Image.open(io.BytesIO(body)).size != sizes[out["ops"]]:
                    c["bad_file"] += 1
            elif out["state"] == "failed":
                c["failed"] += 1
            else:
                c["lost"] += 1
        files = list((stack.settings.data_dir / "outputs" / job["id"]).iterdir())
        c["extra_files"] += len(files) - sum(o["state"] == "done" for o in job["outputs"])
    return c


def pids(stack: Any) -> dict[str, int]:
    ctx = zmq.Context()
    try:
        endpoint = supervisor_endpoint(stack.settings.data_dir)
        status = ask(ctx, stack.settings, "status", endpoint=endpoint)
    finally:
        ctx.term()
    return {c["name"]: c["pid"] for c in status["children"] if c["alive"]}


def fleet_stats(stack: Any) -> dict[str, Any]:
    ctx = zmq.Context()
    try:
        return dict(ask(ctx, stack.settings, "stats"))
    finally:
        ctx.term()


def test_workers_killed_every_second_and_a_half_lose_nothing(stack_factory: Any,
                                                             store_url: str) -> None:
    """On each job store backend (SQLite, PostgreSQL)."""
    stack = stack_factory(3, env={"IMGPIPE_WORKER_DELAY_MS": "60"}, store_url=store_url,
                          **HOOKS)
    img = jpeg(640, 360)
    ids = [submit(stack.url, [img] * 8, ["resize:w=320", "blur:radius=1"]) for _ in range(10)]
    killed = []
    for _ in range(4):
        time.sleep(1.5)  # the scenario's cadence, not a synchronisation
        workers = stack.workers()
        for victim in sorted(workers, key=lambda w: w["state"] != "busy"):
            try:
                os.kill(victim["pid"], signal.SIGKILL)
            except ProcessLookupError:  # listed a moment ago, already replaced
                continue
            killed.append(victim["pid"])
            break
    jobs = wait_final(stack.url, ids)
    counts = audit(stack, jobs, {"resize:w=320": (320, 180), "blur:radius=1": (640, 360)})
    assert counts == {"done": 160, "failed": 0, "lost": 0, "bad_file": 0, "extra_files": 0}
    assert len(set(killed)) == 4
    stack.wait_workers(3)  # the supervisor replaced every killed worker


def test_a_paused_worker_is_replaced_and_its_late_results_dropped(stack_factory: Any,
                                                                 store_url: str) -> None:
    """On each job store backend."""
    # A second per task: the worker seen holding a task still holds it when it is paused.
    stack = stack_factory(3, env={"IMGPIPE_WORKER_DELAY_MS": "1000"}, heartbeat_liveness=3,
                          store_url=store_url, **HOOKS)
    ids = [submit(stack.url, [jpeg(640, 360)] * 6, ["resize:w=320"]) for _ in range(3)]
    holder = wait_for(lambda: next((w for w in stack.workers() if w["inflight"]), None),
                      30, what="a worker holding tasks")
    os.kill(holder["pid"], signal.SIGSTOP)
    try:
        wait_for(lambda: any(w["id"] == holder["id"] and w["state"] == "lost"
                             for w in stack.workers(alive_only=False)),
                 30, what="the paused worker declared lost")
        jobs = wait_final(stack.url, ids)
    finally:
        os.kill(holder["pid"], signal.SIGCONT)
    counts = audit(stack, jobs, {"resize:w=320": (320, 180)})
    assert counts["done"] == 18 and counts["lost"] == 0 and counts["extra_files"] == 0
    # The resumed worker finishes what it held: the sink drops those as duplicates.
    wait_for(lambda: fleet_stats(stack)["duplicates"] >= 1, 30,
             what="the late results counted as duplicates")
    again = [httpx.get(f"{stack.url}/api/jobs/{i}", timeout=10).json() for i in ids]
    assert again == jobs, "a late result changed a finished job"


def test_a_poison_task_fails_after_three_attempts_and_the_rest_complete(
        stack_factory: Any, store_url: str) -> None:
    """On each job store backend."""
    stack = stack_factory(3, store_url=store_url, **HOOKS)
    img = jpeg(320, 240)
    good = submit(stack.url, [img] * 7, ["resize:w=160", "invert", "flip:dir=h",
                                        "blur:radius=1", "grayscale", "sepia", "resize:w=100"])
    poison = submit(stack.url, [img], ["crash"])
    jobs = wait_final(stack.url, [good, poison])
    assert jobs[0]["state"] == "done" and jobs[0]["progress"]["done"] == 49
    bad = jobs[1]["outputs"][0]
    assert jobs[1]["state"] == "failed"
    assert bad["state"] == "failed" and bad["attempts"] == 3, bad
    assert "3 attempts" in bad["error"] and "died" in bad["error"], bad["error"]
    stack.wait_workers(3)


@pytest.mark.parametrize("victim", ["ventilator", "sink", "gateway"])
def test_a_stable_node_killed_mid_run_loses_no_accepted_job(stack_factory: Any, victim: str,
                                                           store_url: str) -> None:
    """On each job store backend: a node killed while it holds pooled PostgreSQL
    connections (mid-transaction, perhaps) loses nothing either."""
    stack = stack_factory(2, env={"IMGPIPE_WORKER_DELAY_MS": "40"}, store_url=store_url,
                          **HOOKS)
    img = jpeg(640, 360)
    ids = [submit(stack.url, [img] * 6, ["resize:w=320", "blur:radius=1"]) for _ in range(6)]
    wait_for(lambda: any(httpx.get(f"{stack.url}/api/jobs/{i}", timeout=10).json()["progress"]
                         ["done"] for i in ids), 60, what="some progress before the kill")
    os.kill(pids(stack)[victim], signal.SIGKILL)
    jobs = wait_final(stack.url, ids)
    counts = audit(stack, jobs, {"resize:w=320": (320, 180), "blur:radius=1": (640, 360)})
    assert counts == {"done": 72, "failed": 0, "lost": 0, "bad_file": 0, "extra_files": 0}
