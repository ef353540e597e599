"""The local stack as a user drives it: `imgpipe up`, `imgpipe scale`, Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from imgpipe.core.control import SUPERVISOR_FILE
from tests.support import settings_env, stop_stack, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def scale(stack: Any, n: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imgpipe", "scale", str(n), "--data", str(stack.settings.data_dir)],
        env=settings_env(stack.settings), capture_output=True, text=True, timeout=30)


def shm_segments(pids: set[int]) -> list[str]:
    return [name for name in os.listdir("/dev/shm")
            if name.startswith("imgpipe-") and int(name.split("-")[1]) in pids]


def test_up_then_scale_follows_the_worker_count(stack_factory: Any) -> None:
    stack = stack_factory(2)
    assert (stack.settings.data_dir / SUPERVISOR_FILE).exists()
    first = {w["id"] for w in stack.wait_workers(2)}

    done = scale(stack, 4)
    assert done.returncode == 0, done.stderr
    assert "4 worker(s)" in done.stdout
    assert first <= {w["id"] for w in stack.wait_workers(4)}  # scaling up keeps the old ones

    done = scale(stack, 1)
    assert done.returncode == 0, done.stderr
    stack.wait_workers(1)


def test_scale_without_a_stack_says_so(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "imgpipe", "scale", "3", "--data",
                           str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "no local stack runs" in done.stderr


def test_stop_leaves_no_process_and_no_shared_memory(stack_factory: Any) -> None:
    stack = stack_factory(2)
    sup = psutil.Process(stack.proc.pid)
    family = {p.pid for p in sup.children(recursive=True)}
    assert len(family) >= 5  # ventilator, sink, gateway (+ its workers), 2 workers
    stack.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    assert stop_stack(stack) == 0
    alive = [p for p in family if psutil.pid_exists(p)
             and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left running: {alive}"
    assert not shm_segments(family)
    assert not (stack.settings.data_dir / SUPERVISOR_FILE).exists()


def test_a_killed_child_is_restarted_and_its_segments_swept(
        stack_factory: Any, tmp_path: Path) -> None:
    shm_dir = tmp_path / "shm"  # the setting, not /dev/shm: the supervisor sweeps there
    shm_dir.mkdir()
    stack = stack_factory(1, shm_dir=shm_dir)
    old = stack.wait_workers(1)[0]
    left = shm_dir / f"imgpipe-{old['pid']}-0"  # as a frame segment it held would be
    left.write_bytes(b"\0" * 4096)
    os.kill(old["pid"], signal.SIGKILL)

    def replaced() -> bool:
        ws = stack.workers()
        return len(ws) == 1 and ws[0]["pid"] != old["pid"]

    wait_for(replaced, 60, interval=0.3, what="a new worker after SIGKILL")
    assert not left.exists() and not shm_segments({old["pid"]})


def test_submit_uploads_waits_and_saves_every_output(stack_factory: Any, tmp_path: Path) -> None:
    from tests.images import jpeg

    stack = stack_factory(2)
    files = []
    for i in range(2):
        path = tmp_path / f"photo{i}.jpg"
        path.write_bytes(jpeg(320, 240, seed=i))
        files.append(str(path))
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "imgpipe", "submit", *files, "--ops", "resize:w=100",
         "--ops", "grayscale|encode:format=png", "--wait", "-o", str(out), "--url", stack.url],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert ": done (4 done, 0 failed, 4 total)" in done.stdout
    saved = sorted(p.name for p in out.iterdir())
    assert saved == ["photo0-0.jpg", "photo0-1.png", "photo1-2.jpg", "photo1-3.png"]
    from PIL import Image

    with Image.open(out / "photo1-2.jpg") as im:
        assert im.size == (100, 75)
    with Image.open(out / "photo0-1.png") as im:
        assert im.mode == "L"


def test_submit_reports_a_bad_chain_and_an_unreachable_gateway(stack_factory: Any,
                                                                tmp_path: Path) -> None:
    from tests.images import jpeg
    from tests.support import free_port

    stack = stack_factory(1)
    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg(64, 48))
    bad = subprocess.run([sys.executable, "-m", "imgpipe", "submit", str(path), "--ops",
                          "blur:radius=-1", "--url", stack.url],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "HTTP 400" in bad.stderr and "radius" in bad.stderr
    gone = subprocess.run([sys.executable, "-m", "imgpipe", "submit", str(path), "--url",
                           f"http://127.0.0.1:{free_port()}"],
                          capture_output=True, text=True, timeout=60)
    assert gone.returncode == 1 and "imgpipe submit:" in gone.stderr


def test_autoscale_adds_workers_under_sustained_load(stack_factory: Any) -> None:
    import httpx

    from tests.images import jpeg

    stack = stack_factory(1, "--autoscale", "1:3", env={"IMGPIPE_WORKER_DELAY_MS": "250"},
                          test_hooks=True)
    files = [("image", (f"{i}.jpg", jpeg(320, 240, seed=i), "image/jpeg")) for i in range(16)]
    for _ in range(4):  # 64 outputs at ~4 per second per worker: a queue that lasts
        resp = httpx.post(f"{stack.url}/api/process/", files=files,
                          data={"ops": ["resize:w=100"]}, timeout=60)
        assert resp.status_code == 202, resp.text
    wait_for(lambda: len(stack.workers()) >= 2, 90, interval=0.5,
             what="the autoscaler adding a worker")


def test_the_sink_expires_finished_jobs_after_the_ttl(stack_factory: Any) -> None:
    import httpx

    from tests.images import jpeg

    stack = stack_factory(1, job_ttl_s=1.0, sweep_interval_s=0.5)
    resp = httpx.post(f"{stack.url}/api/process/", params={"wait": 30},
                      files=[("image", ("a.jpg", jpeg(64, 48), "image/jpeg"))],
                      data={"ops": "resize:w=32"}, timeout=60)
    assert resp.status_code == 200 and resp.json()["state"] == "done", resp.text
    job = resp.json()["id"]
    wait_for(lambda: httpx.get(f"{stack.url}/api/jobs/{job}", timeout=5).status_code == 410,
             20, what="the job to expire")
    data = stack.settings.data_dir
    assert not (data / "outputs" / job).exists() and not (data / "originals" / job).exists()
    metrics = httpx.get(f"{stack.url}/api/metrics", timeout=5).json()
    assert metrics["totals"]["jobs_expired"] == 1 and metrics["totals"]["bytes"] == 0
