"""The compose stack on a real Docker engine: build, health, jobs, scaling, kills, restarts.

One stack for the module, under its own compose project (``imgpipe-t<pid>``) with the
gateway and dashboard published on free loopback ports, built the way a user builds it
(``make image``: base pulled or made by compose/base-image.sh, wheels from the host).
The tests run in file order against it; the last one is ``make compose-down``. The
fixture always ends with ``down -v --remove-orphans``.

Without an engine (``docker info`` fails) the tests skip and say so; under CI=true they
fail instead, so a CI machine that lost its Docker install step cannot pass quietly
(.ci/run installs and starts one when it runs as root).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.compose.files import COMPOSE_FILE, ROOT
from tests.support import wait_for

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

# Workers in the test stack hold each task a little (test hooks), so a 60-output job
# keeps them busy long enough to kill two of them in the middle of it.
TEST_OVERRIDE = """\
services:
  worker:
    environment:
      IMGPIPE_TEST_HOOKS: "1"
      IMGPIPE_WORKER_DELAY_MS: "400"
"""
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 120,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


class ComposeStack:
    def __init__(self, project: str, override: Path) -> None:
        self.project = project
        self.cli = compose_cli()
        self.files = ["-f", str(COMPOSE_FILE), "-f", str(override)]
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
        self.env.update(PUBLISH_HOST="127.0.0.1", PUBLISH_HTTP_PORT=str(self.port),
                        PUBLISH_DASHBOARD_PORT=str(free_port()))
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return run([*self.cli, *self.files, "-p", self.project, *args], env=self.env,
                   timeout=timeout)

    def make(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        # -o: the venv these tests run in is installed; make must not reinstall it.
        return run(["make", "--no-print-directory", "-o", ".venv/.installed", *args,
                    f"PROJECT={self.project}"], env=self.env, timeout=timeout)

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

    def output_files(self, job_id: str) -> int:
        (gateway,) = self.containers("gateway")
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


# --- the stack ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeStack]:
    why = engine_answers()
    if why is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but no Docker engine: {why} (.ci/run installs one as root)")
        pytest.skip(f"no Docker engine: {why}")
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    override = tmp_path_factory.mktemp("compose") / "test-override.yml"
    override.write_text(TEST_OVERRIDE)
    s = ComposeStack(f"imgpipe-t{os.getpid()}-{uuid.uuid4().hex[:6]}", override)
    try:
        s.make("image", timeout=900)
        s.compose("up", "-d", "--scale", "worker=3")
        yield s
    finally:
        s.http.close()
        run([*s.cli, *s.files, "-p", s.project, "down", "-v", "--remove-orphans",
             "--timeout", "10"], env=s.env, timeout=180, check=False)


# --- the tests, in order --------------------------------------------------------------------------
def test_every_container_turns_healthy_and_the_readme_demo_runs(stack: ComposeStack) -> None:
    stack.wait_healthy()
    assert len(stack.containers("worker")) == 3
    stack.wait_workers(3)
    # README: curl -X POST -F "image=@test.jpg" http://localhost:8000/api/process/
    doc = stack.submit([jpeg(800, 600, seed=1)])
    assert len(doc["outputs"]) == 3
    final = stack.wait_job(doc["id"])
    c = counters(stack, final)
    assert exactly_once(c) and c["done"] == 3, dict(c)


def test_published_only_on_loopback(stack: ComposeStack) -> None:
    for service in ("gateway", "dashboard"):
        (cid,) = stack.containers(service)
        bindings = stack.inspect(cid, "{{json .HostConfig.PortBindings}}")
        assert '"HostIp":"127.0.0.1"' in bindings and '"HostIp":""' not in bindings, bindings


def test_a_24_megapixel_photo_through_the_default_outputs(stack: ComposeStack) -> None:
    photo = jpeg(6000, 4000, seed=24)
    doc = stack.submit([photo], wait=110)
    final = doc if doc["state"] in FINAL else stack.wait_job(doc["id"])
    errors = [o["error"] for o in final["outputs"] if o["state"] != "done"]
    assert final["state"] == "done", errors
    c = counters(stack, final, {0: (1920, 1280), 1: (6000, 4000), 2: (6000, 4000)})
    assert exactly_once(c), dict(c)


def test_the_data_volume_is_writable_by_uid_10001(stack: ComposeStack) -> None:
    for service in ("gateway", "ventilator", "sink"):
        (cid,) = stack.containers(service)
        out = run(["docker", "exec", cid, "sh", "-c",
                   "id -u && stat -c %u /data && touch /data/.w && rm /data/.w && echo ok"])
        assert out.stdout.split() == ["10001", "10001", "ok"], (service, out.stdout)


def crash(cid: str) -> None:
    """SIGKILL every process of the container but its init, which then exits: a crash
    (as an OOM kill), so the restart policy applies. `docker kill` is not that: since
    Engine 20.10 it counts as stopped by the user, and unless-stopped leaves it down."""
    run(["docker", "exec", "-u", "0", cid, "sh", "-c", "kill -KILL -1"], check=False)


def test_killing_two_busy_workers_loses_and_repeats_nothing(stack: ComposeStack) -> None:
    images, chains, sizes = sixty_outputs(seed=60)
    by_host = {cid[:12]: cid for cid in stack.containers("worker")}
    doc = stack.submit(images, chains)
    assert doc["progress"]["total"] == 60

    def two_busy() -> list[str] | None:
        busy = [w["host"] for w in stack.live_workers()
                if w["state"] == "busy" or w.get("inflight", 0) > 0]
        return busy[:2] if len(busy) >= 2 else None

    hosts = wait_for(two_busy, 60, interval=0.1, what="two busy workers")
    victims = [by_host[h] for h in hosts]
    restarts = {cid: int(stack.inspect(cid, "{{.RestartCount}}")) for cid in victims}
    run(["docker", "kill", victims[0]])   # an operator's kill: the engine keeps it down
    crash(victims[1])                     # a crash: the restart policy brings it back

    final = stack.wait_job(doc["id"])
    c = counters(stack, final, sizes)
    assert exactly_once(c), dict(c)

    def restarted() -> bool:
        return (stack.inspect(victims[1], "{{.State.Running}}") == "true"
                and int(stack.inspect(victims[1], "{{.RestartCount}}")) > restarts[victims[1]])

    wait_for(restarted, 60, interval=0.5, what="the crashed worker restarted by its policy")
    if stack.inspect(victims[0], "{{.State.Running}}") != "true":
        run(["docker", "start", victims[0]])
    stack.wait_workers(3)


def test_restarting_the_ventilator_and_the_sink_mid_run_loses_nothing(
        stack: ComposeStack) -> None:
    images, chains, sizes = sixty_outputs(seed=600)
    doc = stack.submit(images, chains)

    def some_done() -> bool:
        d = stack.http.get(f"/api/jobs/{doc['id']}").json()
        return 0 < d["progress"]["done"] < d["progress"]["total"]

    wait_for(some_done, 60, interval=0.1, what="the job under way")
    (ventilator,) = stack.containers("ventilator")
    (sink,) = stack.containers("sink")
    run(["docker", "restart", "--time", "20", ventilator, sink], timeout=120)
    during = stack.http.get(f"/api/jobs/{doc['id']}").json()
    assert during["state"] not in FINAL, "the job ended before the restart: a longer job, please"
    final = stack.wait_job(doc["id"])
    c = counters(stack, final, sizes)
    assert exactly_once(c), dict(c)


def test_make_scale_up_and_down(stack: ComposeStack) -> None:
    before = {w["id"] for w in stack.wait_workers(3)}
    stack.make("scale", "N=5")
    assert len(stack.containers("worker")) == 5
    after = stack.wait_workers(5, timeout=60)
    assert before <= {w["id"] for w in after}, "scaling up keeps the running workers"
    stack.make("scale", "N=2")
    assert len(stack.containers("worker")) == 2
    stack.wait_workers(2, timeout=60)


def test_make_compose_down_leaves_no_container(stack: ComposeStack) -> None:
    assert stack.containers()
    stack.make("compose-down")
    assert stack.containers(all_states=True) == []
