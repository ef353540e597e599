"""compose/ha.yml on a real Docker engine: two of every stable node, and kills.

One stack for the module (its own compose project), started the way a user does
(``make ha-up N=2``, no dashboard), with a test-only override on top that publishes both
gateways on loopback beside the load balancer, slows the workers a little (test hooks)
so a run lasts long enough to kill something in its middle, and shortens the task
deadline so a result lost with a killed sink is dispatched again within the test's
patience. The tests run in file order:

1. jobs submitted round-robin to gateway1, gateway2 and the load balancer all finish,
   each output once;
2. ``docker kill`` of the ventilator holding the job store's lease mid-run: the standby
   takes over (the time from the kill to its first dispatch is printed), every output
   done once;
3. ``docker kill`` of one gateway and one sink: requests through the load balancer and
   the other gateway still succeed and every output finishes.

Only 127.0.0.1 and the project's own containers are touched; the fixture ends with
``down -v --remove-orphans``. Without an engine the tests skip, or fail under CI=true.
"""

from __future__ import annotations

import ipaddress
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import pytest

from tests.compose.engine import FINAL, ComposeStack, jpeg, require_engine, run
from tests.compose.files import HA_FILE
from tests.support import free_port, wait_for

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

TEST_OVERRIDE = """\
services:
  gateway1:
    ports: ["127.0.0.1:${TEST_GATEWAY1_PORT}:8000"]
  gateway2:
    ports: ["127.0.0.1:${TEST_GATEWAY2_PORT}:8000"]
  ventilator1:
    environment: {IMGPIPE_TASK_TIMEOUT_S: "20"}
  ventilator2:
    environment: {IMGPIPE_TASK_TIMEOUT_S: "20"}
  worker:
    environment:
      IMGPIPE_TEST_HOOKS: "1"
      IMGPIPE_WORKER_DELAY_MS: "400"
"""


@dataclass
class Site:
    stack: ComposeStack
    doors: dict[str, httpx.Client]          # gateway1, gateway2, lb
    killed: list[str] = field(default_factory=list)

    def open_doors(self) -> list[httpx.Client]:
        return [c for name, c in self.doors.items() if name not in self.killed]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    require_engine()
    override = tmp_path_factory.mktemp("compose") / "test-override.yml"
    override.write_text(TEST_OVERRIDE)
    ports = {"gateway1": free_port(), "gateway2": free_port()}
    stack = ComposeStack("ha", [override], stack_file=HA_FILE, data_service="sink2",
                         env={"TEST_GATEWAY1_PORT": str(ports["gateway1"]),
                              "TEST_GATEWAY2_PORT": str(ports["gateway2"]),
                              "HA_NET": free_net()})
    doors = {name: httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
             for name, port in ports.items()}
    doors["lb"] = stack.http
    try:
        stack.make("ha-up", "N=2", "PROFILES=", timeout=900)
        yield Site(stack, doors)
    finally:
        for name in ("gateway1", "gateway2"):
            doors[name].close()
        stack.down()


# --- helpers ------------------------------------------------------------------------------
def free_net() -> str:
    """HA_NET for the stack: a 10.97.X /24 that no network of this engine overlaps (a
    second stack from compose/ha.yml on the same engine needs its own)."""
    ids = run(["docker", "network", "ls", "-q"]).stdout.split()
    used = [ipaddress.ip_network(n) for n in run(
        ["docker", "network", "inspect", "-f", "{{range .IPAM.Config}}{{.Subnet}} {{end}}",
         *ids]).stdout.split() if ":" not in n]
    for third in random.sample(range(1, 255), 254):
        net = ipaddress.ip_network(f"10.97.{third}.0/24")
        if not any(net.overlaps(u) for u in used):
            return f"10.97.{third}"
    raise AssertionError("no free /24 in 10.97.0.0/16 for the test stack")


def submit_round_robin(site: Site, count: int, chains: list[str], seed: int) -> list[str]:
    """``count`` one-image jobs, each to the next open door in turn; their ids."""
    doors = site.open_doors()
    ids = []
    for i in range(count):
        files = [("image", ("a.jpg", jpeg(160, 120, seed + i), "image/jpeg"))]
        resp = doors[i % len(doors)].post("/api/process/", files=files,
                                          data={"ops": chains}, params={"cache": "0"})
        assert resp.status_code == 202, resp.text
        ids.append(resp.json()["id"])
    return ids


def finals(site: Site, ids: list[str], timeout: float = 240) -> dict[str, dict[str, Any]]:
    """Every job's final document, asked of the open doors in turn."""
    done: dict[str, dict[str, Any]] = {}

    def all_final() -> bool:
        doors = site.open_doors()
        for k, job_id in enumerate([j for j in ids if j not in done]):
            doc = doors[k % len(doors)].get(f"/api/jobs/{job_id}").json()
            if doc["state"] in FINAL:
                done[job_id] = doc
        return len(done) == len(ids)

    try:
        wait_for(all_final, timeout, interval=1.0, what=f"{len(ids)} jobs final")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{site.stack.logs()}") from None
    return done


def tally(site: Site, docs: dict[str, dict[str, Any]]) -> Counter[str]:
    """Every output done exactly once, fetched through an open door and one file on the
    data volume each (bench/chaos.py's counters, for many jobs at once)."""
    c: Counter[str] = Counter()
    doors = site.open_doors()
    for k, doc in enumerate(docs.values()):
        total = int(doc["progress"]["total"])
        c["expected"] += total
        seen = Counter(o["n"] for o in doc["outputs"])
        c["duplicated"] += sum(v - 1 for v in seen.values() if v > 1)
        c["duplicated"] += max(0, doc["progress"]["done"] + doc["progress"]["failed"] - total)
        done = [o for o in doc["outputs"] if o["state"] == "done"]
        c["lost"] += total - len({o["n"] for o in done})
        failed = [o for o in doc["outputs"] if o["state"] == "failed"]
        c["failed"] += len(failed)
        for o in failed:
            c[f"error: {o['error']}"] += 1
        for o in done:
            resp = doors[k % len(doors)].get(o["url"])
            c["done" if resp.status_code == 200 and resp.content[:2] == b"\xff\xd8"
              else "unfetchable"] += 1
    data = site.stack.containers(site.stack.data_service)[0]
    listing = run(["docker", "exec", data, "sh", "-c",
                   "cd /data/outputs && for d in " + " ".join(docs)
                   + "; do ls \"$d\" | wc -l; done"]).stdout.split()
    c["files"] = sum(int(n) for n in listing)
    return c


def assert_exactly_once(c: Counter[str]) -> None:
    assert c["done"] == c["expected"] == c["files"], dict(c)
    assert not (c["lost"] or c["duplicated"] or c["failed"] or c["unfetchable"]), dict(c)


def lease(site: Site) -> tuple[str, int]:
    """(container id, fencing token) of the ventilator holding the job store's lease."""
    (db,) = site.stack.containers("db")
    row = run(["docker", "exec", db, "psql", "-d", "imgpipe", "-tAc",
               "SELECT holder, token FROM leases WHERE name = 'ventilator'"]).stdout.strip()
    holder, token = row.split("|")
    host = holder.split("@", 1)[1].rsplit(":", 1)[0]   # ventilator@HOSTNAME:PID
    for service in ("ventilator1", "ventilator2"):
        for cid in site.stack.containers(service):
            if site.stack.inspect(cid, "{{.Config.Hostname}}") == host:
                return cid, int(token)
    raise AssertionError(f"the lease holder {holder!r} is no ventilator of this project")


def log_line(cid: str, needle: str) -> tuple[float, str] | None:
    """When the container first logged a line containing ``needle`` (epoch seconds, by
    the engine's clock), and what follows the needle."""
    proc = run(["docker", "logs", "-t", cid], check=False)
    for line in (proc.stdout + proc.stderr).splitlines():
        if needle in line:
            stamp = line.split(" ", 1)[0]            # RFC 3339 with nanoseconds, UTC
            whole, _, frac = stamp.rstrip("Z").partition(".")
            at = datetime.fromisoformat(whole + "+00:00").timestamp() + float(f"0.{frac or 0}")
            return at, line.split(needle, 1)[1].strip()
    return None


# --- the tests, in order ----------------------------------------------------------------------
def test_jobs_round_robin_over_both_gateways_and_the_balancer_all_finish(site: Site) -> None:
    site.stack.wait_healthy(timeout=240)
    assert len(site.stack.containers("worker")) == 2
    site.stack.wait_workers(2)
    ids = submit_round_robin(site, 40, ["resize:w=64"], seed=100)
    docs = finals(site, ids)
    # A job made through one gateway reads the same through the other.
    for job_id in ids[:3]:
        states = {site.doors[d].get(f"/api/jobs/{job_id}").json()["state"]
                  for d in ("gateway1", "gateway2", "lb")}
        assert states == {"done"}, states
    c = tally(site, docs)
    print(f"\nround robin: {dict(c)}")
    assert_exactly_once(c)
    assert c["expected"] == 40


def test_killing_the_active_ventilator_mid_run_hands_over_to_the_standby(site: Site) -> None:
    active, token = wait_for(lambda: lease(site), 30, interval=0.5, what="a ventilator lease")
    standby = next(cid for s in ("ventilator1", "ventilator2")
                   for cid in site.stack.containers(s) if cid != active)
    ids = submit_round_robin(site, 40, ["resize:w=64", "resize:w=48"], seed=200)

    def some_final() -> bool:
        door = site.doors["lb"]
        return sum(door.get(f"/api/jobs/{j}").json()["state"] in FINAL for j in ids[:8]) >= 4

    wait_for(some_final, 120, interval=0.3, what="the run under way")
    last = site.doors["lb"].get(f"/api/jobs/{ids[-1]}").json()
    assert last["state"] not in FINAL, "the run ended before the kill: a longer one, please"
    killed_at = time.time()
    run(["docker", "kill", active])
    site.killed.append("ventilator")
    docs = finals(site, ids)

    new, new_token = lease(site)
    assert new == standby and new_token > token, (new, new_token, token)
    first, own = wait_for(lambda: log_line(standby, "ventilator_takeover"), 30, interval=0.5,
                          what="the standby's takeover logged")
    took = log_line(standby, "ventilator active")
    print(f"\nventilator takeover: lease taken {(took[0] if took else first) - killed_at:.2f} s "
          f"and first dispatch {first - killed_at:.2f} s after `docker kill` of the active "
          f"one (lease token {token} -> {new_token}); the standby's own account: {own}")
    c = tally(site, docs)
    print(f"ventilator killed mid-run: {dict(c)}")
    assert_exactly_once(c)
    assert c["expected"] == 80
    assert site.stack.inspect(active, "{{.State.Running}}") == "false"


def test_killing_one_gateway_and_one_sink_leaves_the_others_serving(site: Site) -> None:
    gateway = site.stack.containers("gateway1")[0]
    sink = site.stack.containers("sink1")[0]
    run(["docker", "kill", gateway, sink])
    site.killed.append("gateway1")
    ids = submit_round_robin(site, 12, ["resize:w=64", "resize:w=48"], seed=300)
    docs = finals(site, ids)
    c = tally(site, docs)
    print(f"\ngateway1 and sink1 killed: {dict(c)}")
    assert_exactly_once(c)
    assert c["expected"] == 24
    for cid in (gateway, sink):
        assert site.stack.inspect(cid, "{{.State.Running}}") == "false", \
            "a killed container came back: the others did not carry on alone"
