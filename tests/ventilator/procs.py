"""Helpers for pipeline tests with real processes: spawn components, make jobs, count.

Each component runs as ``python -m imgpipe <command>`` with the test's settings in its
environment and its log in a file under the test's temp dir (printed on failure).
"""

from __future__ import annotations

import io
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from PIL import Image

from imgpipe.core.config import Settings
from imgpipe.core.control import ask
from imgpipe.core.protocol import decode_topic
from imgpipe.core.records import FINAL_JOB, Original, Output, new_job_id
from imgpipe.core.store import Store
from imgpipe.filters import parse_chain
from imgpipe.workers.shm import sweep
from tests.support import spawn, wait_for


class Procs:
    """Child processes of one test; :meth:`stop_all` kills whatever is left."""

    def __init__(self, settings: Settings, logs: Path) -> None:
        self.settings = settings
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.all: list[subprocess.Popen[bytes]] = []
        self.count = 0

    def start(self, name: str, command: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        assert name not in self.procs, f"{name} is already running"
        self.count += 1
        path = self.logs / f"{self.count:02d}-{name}.log"
        proc = spawn(self.settings, command, *args, log=path, env=env)
        self.procs[name] = proc
        self.all.append(proc)
        return proc

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal one process and wait for it; sweep the frame segments a killed worker
        leaves in the shm dir, as the supervisor does."""
        proc = self.procs.pop(name)
        proc.send_signal(sig)
        proc.wait(30)
        sweep(proc.pid, self.settings.shm_dir)

    def stop_all(self) -> None:
        for proc in self.all:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.all:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def log_tail(self) -> str:
        parts = []
        for path in sorted(self.logs.glob("*.log")):
            parts.append(f"--- {path.name} ---\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)


def jpeg(seed: int, width: int = 96, height: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def make_job(store: Store, images: int, chains: list[str], seed: int = 0) -> str:
    """Record a job the way the gateway does: originals on disk first, then the rows."""
    job = new_job_id()
    infos = []
    for i in range(images):
        data = jpeg(seed * 100 + i)
        store.save_original(job, i, "jpeg", data)
        infos.append(Original("jpeg", 96, 64, len(data)))
    parsed = [parse_chain(c) for c in chains]
    store.create_job(job, infos, [(c.canonical(), c.cost) for c in parsed])
    return job


def outputs(store: Store, jobs: list[str]) -> list[Output]:
    return [o for job in jobs for o in store.job(job).outputs]


def wait_final(store: Store, jobs: list[str], timeout: float, procs: Procs) -> None:
    def all_final() -> bool:
        return all(store.job_state(j) in FINAL_JOB for j in jobs)

    try:
        wait_for(all_final, timeout, interval=0.2, what="every job final")
    except AssertionError as exc:
        states = [o.state for o in outputs(store, jobs)]
        raise AssertionError(f"{exc}; output states {sorted(set(states))} "
                             f"{ {s: states.count(s) for s in set(states)} }\n"
                             f"{procs.log_tail()}") from None


def ask_ok(ctx: zmq.Context[Any], settings: Settings, op: str) -> Any:
    return ask(ctx, settings, op, timeout=2.0)


def live_workers(ctx: zmq.Context[Any], settings: Settings) -> list[dict[str, Any]]:
    return [w for w in ask_ok(ctx, settings, "workers") if w["state"] != "lost"]


def bus_messages(sock: zmq.Socket[Any]) -> Iterator[Any]:
    """Every message waiting on a SUB socket, decoded (no waiting)."""
    while True:
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        yield decode_topic(frames)


def check_exactly_once(store: Store, jobs: list[str]) -> list[Output]:
    """Every output done, with one file that decodes at its recorded size, no temp file."""
    outs = outputs(store, jobs)
    assert [o.state for o in outs] == ["done"] * len(outs), \
        [(o.n, o.state, o.error) for o in outs if o.state != "done"]
    for job in jobs:
        rec = store.job(job)
        files = sorted(p.name for p in store._blobs.output_path(job, 0, "jpeg").parent.iterdir())
        assert files == sorted(f"{o.n}.jpg" for o in rec.outputs), files
        for o in rec.outputs:
            with Image.open(store._blobs.output_path(job, o.n, "jpeg")) as img:
                assert img.size == (o.width, o.height) == (64, 43)
    return outs
