"""Helpers for the tests that drive a real Docker engine (marker ``docker``).

A :class:`ComposeStack` is one compose project started by a test module: its own
project name, the gateway and dashboard on free loopback ports, every command with a
deadline. :func:`require_engine` skips without an engine, and fails under CI=true so a
CI machine that lost its Docker install step cannot pass quietly (.ci/run installs and
starts one when it runs as root).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.compose.files import COMPOSE_FILE, ROOT
from tests.support import free_port, wait_for

FINAL = ("done", "failed", "partial")


def engine_answers() -> str | None:
    """None when `docker info` works, else why not."""
    docker = shutil.which("docker")
    if docker is None:
        return "no docker client on PATH"
    try:
        proc = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30 s"
    if proc.returncode != 0:
        return f"`docker info` failed: {proc.stderr.strip()[-300:]}"
    return None


def compose_cli() -> list[str]:
    """The same choice as the Makefile: v2 plugin, else v1."""
    v2 = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
    if v2.returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("neither `docker compose` (v2) nor `docker-compose` (v1) is installed")


def run(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 120,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def require_engine() -> None:
    """Skip (saying why) when no engine answers; fail instead under CI=true."""
    why = engine_answers()
    if why is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but no Docker engine: {why} (.ci/run installs one as root)")
        pytest.skip(f"no Docker engine: {why}")
    if shutil.which("make") is None:
        pytest.skip("make is not installed")


class ComposeStack:
    """One compose project: ``stack_file`` (compose/docker-compose.yml) plus
    ``extra_files``; ``data_service`` is a service that mounts the data volume."""

    def __init__(self, name: str, extra_files: list[Path],
                 env: dict[str, str] | None = None, *, stack_file: Path = COMPOSE_FILE,
                 data_service: str = "gateway") -> None:
        self.project = f"imgpipe-{name}{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.cli = compose_cli()
        self.stack_file = stack_file
        self.data_service = data_service
        self.files = ["-f", str(stack_file)]
        for f in extra_files:
            self.files += ["-f", str(f)]
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
        self.env.update(PUBLISH_HOST="127.0.0.1", PUBLISH_HTTP_PORT=str(self.port),
                        PUBLISH_DASHBOARD_PORT=str(free_port()), **(env or {}))
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return run([*self.cli, *self.files, "-p", self.project, *args], env=self.env,
                   timeout=timeout)

    def make(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """``make ARGS`` on this project and its extra compose files."""
        extra = " ".join(self.files[3::2])
        # -o: the venv these tests run in is installed; make must not reinstall it.
        return run(["make", "--no-print-directory", "-o", ".venv/.installed", *args,
                    f"PROJECT={self.project}", f"STACK_FILE={self.stack_file}",
                    f"EXTRA_COMPOSE_FILES={extra}"],
                   env=self.env, timeout=timeout)

    def containers(self, service: str | None = None, *, all_states: bool = False) -> list[str]:
        args = ["docker", "ps", "-q", "--no-trunc",
                "--filter", f"label=com.docker.compose.project={self.project}"]
        if service:
            args += ["--filter", f"label=com.docker.compose.service={service}"]
        if all_states:
            args.append("-a")
        return run(args).stdout.split()

    def inspect(self, cid: str, fmt: str) -> str:
        return run(["docker", "inspect", "-f", fmt, cid]).stdout.strip()

    def logs(self) -> str:
        proc = run([*self.cli, *self.files, "-p", self.project, "logs", "--no-color",
                    "--tail", "40"], env=self.env, check=False)
        return proc.stdout[-8000:]

    def live_workers(self) -> list[dict[str, Any]]:
        resp = self.http.get("/api/workers")
        resp.raise_for_status()
        return [w for w in resp.json()["workers"] if w["state"] != "lost"]

    def wait_workers(self, n: int, timeout: float = 60) -> list[dict[str, Any]]:
        def exactly_n() -> list[dict[str, Any]] | None:
            ws = self.live_workers()
            return ws if len(ws) == n else None

        return wait_for(exactly_n, timeout, interval=0.5, what=f"{n} live workers in /api/workers")

    def wait_healthy(self, timeout: float = 180) -> None:
        def every_container_healthy() -> bool:
            ids = self.containers()
            states = {self.inspect(c, "{{.Name}}"): self.inspect(
                c, "{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}")
                for c in ids}
            self.last_states = states
            return bool(states) and all(s == "healthy" for s in states.values())

        try:
            wait_for(every_container_healthy, timeout, interval=1.0,
                     what="every container healthy")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.last_states}\n{self.logs()}") from None

    def submit(self, images: list[bytes], chains: list[str] | None = None,
               wait: float = 0) -> dict[str, Any]:
        files = [("image", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
        params: dict[str, Any] = {"cache": "0"}
        if wait:
            params["wait"] = str(wait)
        resp = self.http.post("/api/process/", files=files,
                              data={"ops": chains} if chains else None, params=params,
                              timeout=wait + 30)
        assert resp.status_code in (200, 202), resp.text
        doc: dict[str, Any] = resp.json()
        return doc

    def wait_job(self, job_id: str, timeout: float = 240) -> dict[str, Any]:
        def final() -> dict[str, Any] | None:
            doc: dict[str, Any] = self.http.get(f"/api/jobs/{job_id}").json()
            return doc if doc["state"] in FINAL else None

        try:
            return wait_for(final, timeout, interval=0.5, what=f"job {job_id} final")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None

    def down(self) -> None:
        """Everything of the project goes: containers, networks, the data volume."""
        self.http.close()
        run([*self.cli, *self.files, "-p", self.project, "down", "-v", "--remove-orphans",
             "--timeout", "10"], env=self.env, timeout=180, check=False)

    def output_files(self, job_id: str) -> int:
        gateway = self.containers(self.data_service)[0]
        out = run(["docker", "exec", gateway, "sh", "-c",
                   f"ls /data/outputs/{job_id} | wc -l"]).stdout
        return int(out.strip())


def counters(stack: ComposeStack, doc: dict[str, Any],
             sizes: dict[int, tuple[int, int]] | None = None) -> Counter[str]:
    """bench/chaos.py's counters for one job: every output done exactly once, fetched,
    decoded (and of the wanted size), and one file per output on the data volume."""
    c: Counter[str] = Counter()
    total = int(doc["progress"]["total"])
    c["expected"] = total
    seen = Counter(o["n"] for o in doc["outputs"])
    c["duplicated"] += sum(k - 1 for k in seen.values() if k > 1)
    c["duplicated"] += max(0, doc["progress"]["done"] + doc["progress"]["failed"] - total)
    done = {o["n"]: o for o in doc["outputs"] if o["state"] == "done"}
    c["lost"] = total - len([n for n in range(total) if n in done])
    c["failed"] = sum(1 for o in doc["outputs"] if o["state"] == "failed")
    for n, o in done.items():
        resp = stack.http.get(o["url"])
        if resp.status_code != 200:
            c["unfetchable"] += 1
            continue
        with Image.open(io.BytesIO(resp.content)) as img:
            img.load()
            if sizes and img.size != sizes[n]:
                c["wrong_size"] += 1
        c["done"] += 1
    c["files"] = stack.output_files(doc["id"])
    return c


def exactly_once(c: Counter[str]) -> bool:
    return (c["done"] == c["expected"] == c["files"]
            and not (c["lost"] or c["duplicated"] or c["failed"] or c["wrong_size"]
                     or c["unfetchable"]))


def jpeg(width: int, height: int, seed: int, quality: int = 90) -> bytes:
    """A photo-like JPEG: smooth gradients plus grain (compresses like a photo)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width * 255, y / height * 255,
                     (np.sin(x / 37.0) * np.cos(y / 53.0) + 1) * 127], axis=-1)
    grain = rng.normal(0, 12, (height, width, 1)).astype(np.float32)
    img = np.clip(base + grain, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(img).save(out, "JPEG", quality=quality)
    return out.getvalue()


def sixty_outputs(seed: int) -> tuple[list[bytes], list[str], dict[int, tuple[int, int]]]:
    """4 images x 15 chains; output n = image n // 15, chain n % 15 (image-major)."""
    images = [jpeg(640, 480, seed + i) for i in range(4)]
    widths = [96 + 8 * k for k in range(15)]
    chains = [f"resize:w={w}" for w in widths]
    sizes = {i * 15 + k: (w, w * 480 // 640) for i in range(4) for k, w in enumerate(widths)}
    return images, chains, sizes
