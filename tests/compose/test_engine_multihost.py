"""Workers on other hosts, simulated on one engine: compose/multihost.yml with CURVE.

The stack runs with compose/multihost.yml and no worker of its own (``--scale
worker=0``). Its ZeroMQ ports are published on the gateway address of a second network
that this test creates, which plays the LAN address of the main host; two worker
containers on that network connect only through those published ports, started the way
docs/deploy.md's ``docker run`` does. One holds a key listed in ``authorized/``, the
other a key that is not. Jobs complete, every output on the authorised worker; the other
is never admitted: it is never listed and gets no task.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq.auth

from tests.compose.engine import ComposeStack, counters, exactly_once, jpeg, require_engine, run
from tests.compose.files import MULTIHOST_FILE

pytestmark = [pytest.mark.docker, pytest.mark.timeout(600)]

# Published by compose/multihost.yml, each on the same port as inside the stack.
PORTS = {"LIGHT_TASK": 5551, "HEAVY_TASK": 5552, "RESULT": 5553, "BUS": 5556,
         "DASHBOARD_BUS": 5557}


def make_keys(root: Path) -> Path:
    """main/ (server pair, authorized/ with server.key and worker-b.key), and for each
    remote host its own pair plus only the server's public key (docs/deploy.md)."""
    main = root / "main"
    authorized = main / "authorized"
    authorized.mkdir(parents=True)
    zmq.auth.create_certificates(main, "server")
    shutil.copy(main / "server.key", authorized)
    for name, listed in (("worker-b", True), ("intruder", False)):
        host = root / name
        host.mkdir()
        zmq.auth.create_certificates(host, name)
        shutil.copy(main / "server.key", host)
        if listed:
            shutil.copy(host / f"{name}.key", authorized)
    # The containers run as uid 10001: these throwaway keys are readable by anyone.
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


@dataclass
class Site:
    stack: ComposeStack
    address: str               # the "main host" address the remote workers connect to
    remotes: dict[str, str]    # key name -> container id


def start_remote_worker(site_address: str, network: str, name: str, keys: Path,
                        project: str) -> str:
    env = [f"IMGPIPE_{var}_ENDPOINT=tcp://{site_address}:{port}" for var, port in PORTS.items()]
    env += ["IMGPIPE_CURVE_SERVER_PUBLIC_FILE=/keys/server.key",
            f"IMGPIPE_CURVE_CLIENT_SECRET_FILE=/keys/{name}.key_secret"]
    args = ["docker", "run", "-d", "--name", f"{project}-{name}", "--network", network,
            "--init", "--shm-size", "1g", "--no-healthcheck", "-v", f"{keys}:/keys:ro"]
    for item in env:
        args += ["-e", item]
    return run([*args, "imgpipe:latest", "worker", "--serves", "all"]).stdout.strip()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    require_engine()
    keys = make_keys(tmp_path_factory.mktemp("curve"))
    stack = ComposeStack("m", [MULTIHOST_FILE], env={"CURVE_KEYS_DIR": str(keys / "main")})
    network = f"{stack.project}-remote"
    remotes: dict[str, str] = {}
    run(["docker", "network", "create", network])
    try:
        address = run(["docker", "network", "inspect", "-f",
                       "{{(index .IPAM.Config 0).Gateway}}", network]).stdout.strip()
        assert address, f"network {network} has no gateway address"
        stack.env["PUBLISH_ZMQ_HOST"] = address
        stack.make("compose-up", "N=0", timeout=900)
        for name in ("worker-b", "intruder"):
            remotes[name] = start_remote_worker(address, network, name, keys / name,
                                                stack.project)
        yield Site(stack, address, remotes)
    finally:
        for cid in remotes.values():
            run(["docker", "rm", "-f", cid], check=False)
        stack.down()
        run(["docker", "network", "rm", network], check=False)


def test_only_the_authorised_remote_worker_joins(site: Site) -> None:
    site.stack.wait_healthy()
    assert site.stack.containers("worker") == [], "the stack runs no worker of its own"
    (worker,) = site.stack.wait_workers(1)
    assert worker["host"] == site.remotes["worker-b"][:12]


def test_jobs_complete_on_the_remote_worker_and_the_intruder_gets_none(site: Site) -> None:
    stack = site.stack
    widths = [120 + 16 * k for k in range(6)]
    doc = stack.submit([jpeg(640, 480, seed=7)], [f"resize:w={w}" for w in widths])
    final = stack.wait_job(doc["id"])
    c = counters(stack, final, {n: (w, w * 480 // 640) for n, w in enumerate(widths)})
    assert exactly_once(c), dict(c)
    good = site.remotes["worker-b"][:12]
    assert {o["worker"].rsplit("-", 1)[0] for o in final["outputs"]} == {good}
    hosts = {w["host"] for w in stack.live_workers()}
    assert hosts == {good}, "a worker whose key is not authorised is never admitted"
    intruder = site.remotes["intruder"]
    assert stack.inspect(intruder, "{{.State.Running}}") == "true", \
        "the intruder was running all along (so it had every chance to take a task)"
