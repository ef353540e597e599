"""Peers that lie, and strangers: a sealed stack on tcp:// survives both.

The stack runs with CURVE keys in its data dir (``imgpipe keys``). An *authorised* liar
(it holds the client key) sends garbage, wrong types, deep nesting, oversize frames,
extra frames, forged results and forged heartbeats to every endpoint it can reach; a
*stranger* (no key, or a key nobody listed) tries to take tasks and push results.
Afterwards no component has restarted, no output has changed, and a new job completes.
"""

from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import zmq
import zmq.auth
from PIL import Image

from imgpipe.core import keys
from imgpipe.core.config import Settings
from imgpipe.core.control import ask, supervisor_endpoint
from imgpipe.core.protocol import Heartbeat, Metric, Result, encode, encode_topic
from imgpipe.core.sockets import make_socket
from tests.images import jpeg
from tests.support import free_port, make_settings, start_stack, stop_stack, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ENDPOINTS = ("intake", "light_task", "heavy_task", "result", "event", "control", "bus")

# Header frames no peer should be able to stop anything with.
GARBAGE: list[list[bytes]] = [
    [b""],
    [b"\xff\xfe\x00"],
    [b"null"],
    [b"{}"],
    [b'{"v":1,"kind":[]}'],
    [b'{"v":1,"kind":{"a":1}}'],
    [b'{"v":2,"kind":"notice","job_id":"x"}'],
    [b'{"v":1,"kind":"notice","job_id":5}'],
    [b'{"v":1,"kind":"notice","job_id":' + b"[" * 4000 + b"]" * 4000 + b"}"],
    [b'{"v":1,"kind":"heartbeat","worker":"w","host":"h","pid":1,"seq":1,"ts":NaN}'],
    [b'{"v":1,"kind":"heartbeat","worker":"w","host":"h","pid":1,"seq":1,"ts":1,'
     b'"inflight":[1,{"a":[]}]}'],
    [b'{"v":1,"kind":"metric","source":"s","role":"r","seq":1,"ts":1,"values":[]}'],
    [b'{"v":1,"kind":"request","op":"stats","args":[]}'],
    [b'{"v":1,"kind":"request","op":["x"]}'],
    [b'{"v":1,"kind":"notice","job_id":"x"}', b"extra", b"frames"],
    [b"x"] * 40,
    [b"\x00" * 200_000],  # over the small-message limit: the peer is cut off
]


def tcp_settings(data: Path) -> Settings:
    eps = {f"{name}_endpoint": f"tcp://127.0.0.1:{free_port()}" for name in ENDPOINTS}
    return make_settings(data, dashboard_bus_endpoint="", **eps)


def peer(stack_data: Path, home: Path, *, key: str | None, listed: bool = False) -> Settings:
    """Settings of another peer: plain (``key`` None), or with a key pair of its own that
    knows the stack's server key, listed in the authorised folder or not."""
    if key is None:
        return make_settings(home)
    home.mkdir(parents=True)
    public, secret = zmq.auth.create_certificates(str(home), key)
    if listed:
        (stack_data / keys.KEYS_DIR / keys.AUTHORIZED / f"{key}.key").write_bytes(
            Path(public).read_bytes())
    return make_settings(home, curve_server_public_file=str(
        stack_data / keys.KEYS_DIR / "server.key"), curve_client_secret_file=secret)


def submit(url: str, chains: list[str]) -> dict[str, Any]:
    resp = httpx.post(f"{url}/api/process/", params={"wait": 60, "cache": 0},
                      files=[("image", ("a.jpg", jpeg(320, 240), "image/jpeg"))],
                      data={"ops": chains}, timeout=90)
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["state"] == "done", job
    return job


def fingerprint(url: str, job: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(state, content type, sha256 of the bytes) of every output, as served now."""
    doc = httpx.get(f"{url}/api/jobs/{job['id']}", timeout=10).json()
    out = []
    for o in doc["outputs"]:
        body = httpx.get(url + o["url"], timeout=10)
        out.append((o["state"], body.headers["content-type"],
                    hashlib.sha256(body.content).hexdigest()))
    return out


def restarts(ctx: zmq.Context[Any], settings: Settings) -> dict[str, int]:
    endpoint = supervisor_endpoint(settings.data_dir)
    assert endpoint is not None and endpoint.startswith("ipc://"), endpoint
    status = ask(ctx, settings, "status", endpoint=endpoint, timeout=5)
    return {c["name"]: c["restarts"] for c in status["children"]}


class Sprayer:
    """Sockets that send what they are given and stay open until :meth:`close`, so
    nothing queued is dropped before the stack has read it."""

    def __init__(self, ctx: zmq.Context[Any]) -> None:
        self.ctx = ctx
        self.socks: list[zmq.Socket[Any]] = []

    def __call__(self, settings: Settings, kind: int, endpoint: str,
                 messages: list[list[bytes]]) -> None:
        sock = make_socket(self.ctx, kind, settings, connect=endpoint)
        self.socks.append(sock)
        # A publisher's messages are dropped until the subscriber's subscriptions reach
        # it: wait for them (a stranger's never come, so it sends into the void).
        if kind == zmq.XPUB and sock.poll(3000, zmq.POLLIN):
            while sock.poll(200, zmq.POLLIN):
                sock.recv()
        for frames in messages:
            assert sock.poll(5000, zmq.POLLOUT), f"cannot send to {endpoint}"
            sock.send_multipart(frames, zmq.NOBLOCK)

    def close(self) -> None:
        for sock in self.socks:
            sock.close(linger=0)


@pytest.fixture
def sealed(tmp_path: Path) -> Any:
    """A stack with keys in its data dir; the liar's public key is listed before it
    starts (the authenticators read the folder at start)."""
    settings = tcp_settings(tmp_path / "stack" / "data")
    keys.write(settings.data_dir)
    peer(settings.data_dir, tmp_path / "liar", key="liar", listed=True)
    stack = start_stack(settings, 2)
    try:
        yield stack
    finally:
        assert stop_stack(stack) == 0


def test_liars_and_strangers_change_nothing(sealed: Any, tmp_path: Path) -> None:
    stack, s = sealed, sealed.settings
    # A host whose key is listed, that lies: the stack must survive it, not trust it.
    liar = make_settings(tmp_path / "liar",
                         curve_server_public_file=str(s.data_dir / "keys" / "server.key"),
                         curve_client_secret_file=str(tmp_path / "liar" / "liar.key_secret"))
    strangers = [peer(s.data_dir, tmp_path / "plain", key=None),
                 peer(s.data_dir, tmp_path / "unlisted", key="unlisted")]
    before_job = submit(stack.url, ["resize:w=64", "grayscale"])
    before = fingerprint(stack.url, before_job)
    workers = {w["id"]: w["pid"] for w in stack.workers()}
    ctx = zmq.Context()
    spray = Sprayer(ctx)
    try:
        start = restarts(ctx, s)
        done_id = before_job["id"]
        live = next(iter(workers))
        forged_result = Result(
            task_id=f"{done_id}:0", job_id=done_id, n=0, attempt=1, worker=live, ok=True,
            width=1, height=1, content_type="text/html", format="jpeg", lease="0" * 32,
            payload=b"<script>alert(1)</script>")
        forged_beat = Heartbeat(worker=live, host="elsewhere", pid=1, seq=1, ts=time.time())
        sources = [Metric(source=f"s{i}", role=f"r{i}", seq=1, ts=time.time())
                   for i in range(1500)]
        # The oversize frame last: it ends the liar's connection, and what is queued with it.
        bus_garbage = [encode_topic(forged_beat), *map(encode_topic, sources),
                       *([b"hb", *g] for g in GARBAGE if len(g) == 1)]

        # The authorised liar: any bytes, to every endpoint that reads.
        spray(liar, zmq.PUSH, s.intake_endpoint, GARBAGE)
        spray(liar, zmq.PUSH, s.result_endpoint, [*GARBAGE, encode(forged_result)])
        spray(liar, zmq.XPUB, s.bus_endpoint, bus_garbage)
        spray(liar, zmq.DEALER, s.control_endpoint, GARBAGE)
        spray(s, zmq.DEALER, supervisor_endpoint(s.data_dir) or "", GARBAGE)
        spray(liar, zmq.XSUB, s.event_endpoint,
              [[b"\x01" + b"x" * 100], [b"\x07"], [b""]])

        # Strangers: no key, and a key nobody listed.
        for stranger in strangers:
            thief = [make_socket(ctx, zmq.PULL, stranger, connect=ep)
                     for ep in (s.light_task_endpoint, s.heavy_task_endpoint)]
            try:
                spray(stranger, zmq.PUSH, s.result_endpoint, [encode(forged_result)])
                spray(stranger, zmq.XPUB, s.bus_endpoint, [encode_topic(forged_beat)])
                during = submit(stack.url, ["resize:w=32"])  # real work while they wait
                assert all(not t.poll(200, zmq.POLLIN) for t in thief), "a stranger got a task"
                assert during["outputs"][0]["worker"] in workers
            finally:
                for t in thief:
                    t.close(linger=0)

        # The garbage arrived and was dropped; the liar's beat in a worker's name refused.
        seen: dict[str, Any] = {}

        def counted() -> bool:
            seen.update(ask(ctx, s, "stats", timeout=5))
            return seen["bad_messages"] >= 16 and seen["heartbeats_refused"] >= 1

        try:
            wait_for(counted, 30, what="the ventilator to count the garbage")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {seen}") from None
        stats = seen
        assert stats["failed_tasks"] == 0
        assert restarts(ctx, s) == start, f"a component restarted:\n{stack.log()}"
    finally:
        spray.close()
        ctx.term()

    assert fingerprint(stack.url, before_job) == before
    assert all(ct.startswith("image/") for _, ct, _ in before)
    now = {w["id"]: w["pid"] for w in stack.workers()}
    assert now == workers, "the forged heartbeat took a worker's place"
    after = submit(stack.url, ["resize:w=48", "blur:radius=1"])
    with Image.open(io.BytesIO(httpx.get(stack.url + after["outputs"][0]["url"]).content)) as im:
        assert im.width == 48
    assert httpx.get(f"{stack.url}/healthz", timeout=5).status_code == 200
    wait_for(lambda: len(stack.workers()) == 2, 10, what="both workers still alive")


def test_binding_beyond_loopback_without_keys_is_refused(tmp_path: Path) -> None:
    """A stable node that would listen on every interface with no keys does not start."""
    import subprocess
    import sys

    from tests.support import settings_env

    settings = tcp_settings(tmp_path / "data").with_overrides(bind_host="0.0.0.0")
    env = settings_env(settings)
    for role in ("ventilator", "sink"):
        done = subprocess.run([sys.executable, "-m", "imgpipe", role], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode != 0
        assert "imgpipe keys" in done.stderr, done.stderr[-2000:]
    insecure = {**env, "IMGPIPE_INSECURE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "imgpipe", "sink"], env=insecure,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with pytest.raises(subprocess.TimeoutExpired):  # it runs: nothing refused it
            proc.wait(3)
    finally:
        proc.terminate()
        proc.wait(30)
