"""The compose stack on a real Docker engine: build, health, jobs, scaling, kills, restarts.

One stack for the module, under its own compose project (``imgpipe-t<pid>-<random>``),
with the gateway and dashboard published on free loopback ports, built and started the
way a user does it (``make compose-up N=3``: base pulled or made by compose/base-image.sh,
wheels from the host), with a test-only override file on top (``EXTRA_COMPOSE_FILES``).
The tests run in file order against it; the last one is ``make compose-down``. The
fixture always ends with ``down -v --remove-orphans``. Without an engine they skip, or
fail under CI=true (tests/compose/engine.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.compose.engine import (
    FINAL,
    ComposeStack,
    counters,
    exactly_once,
    jpeg,
    require_engine,
    run,
    sixty_outputs,
)
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


# --- the stack ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeStack]:
    require_engine()
    override = tmp_path_factory.mktemp("compose") / "test-override.yml"
    override.write_text(TEST_OVERRIDE)
    s = ComposeStack("t", [override])
    try:
        s.make("compose-up", "N=3", timeout=900)
        yield s
    finally:
        s.down()


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


@pytest.mark.parametrize("width, height", [(6000, 4000), (8660, 5773)], ids=["24MP", "50MP"])
def test_a_camera_photo_through_the_default_outputs(stack: ComposeStack, width: int,
                                                    height: int) -> None:
    """An ordinary 24 MP photo, and one at the 50 MP limit: frames that need far more
    than Docker's default 64 MB /dev/shm."""
    photo = jpeg(width, height, seed=width)
    doc = stack.submit([photo], wait=110)
    final = doc if doc["state"] in FINAL else stack.wait_job(doc["id"])
    errors = [o["error"] for o in final["outputs"] if o["state"] != "done"]
    assert final["state"] == "done", errors
    small = (1920, round(height * 1920 / width))
    c = counters(stack, final, {0: small, 1: (width, height), 2: (width, height)})
    assert exactly_once(c), dict(c)


def test_the_data_volume_is_writable_by_uid_10001(stack: ComposeStack) -> None:
    for service in ("gateway", "ventilator", "sink"):
        (cid,) = stack.containers(service)
        out = run(["docker", "exec", cid, "sh", "-c",
                   "id -u && stat -c %u /data && touch /data/.w && rm /data/.w && echo ok"])
        assert out.stdout.split() == ["10001", "10001", "ok"], (service, out.stdout)


def crash(cid: str) -> None:
    """SIGKILL every process of the container but its init, which then exits: a crash
    (as an OOM kill), so the restart policy applies. `docker kill` is not that: Engine
    20.10, where these tests were written, counts it as a stop by the user, and
    unless-stopped leaves the container down."""
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
