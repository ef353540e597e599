"""The Streamlit page, run by streamlit.testing's AppTest, fed over a real PUB socket."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import streamlit as st
import zmq
from streamlit.testing.v1 import AppTest

from imgpipe.core.config import Settings
from imgpipe.core.control import SUPERVISOR_FILE
from imgpipe.core.protocol import Reply, Request, decode, encode
from imgpipe.core.sockets import make_socket
from tests.dashboard.feed import event, heartbeat, metric, publish
from tests.support import settings_env, wait_for

APP = str(Path(__file__).resolve().parents[2] / "dashboard" / "app.py")


@pytest.fixture
def app_env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """The app's environment is the test's settings; its cached collector is released after."""
    for key, value in settings_env(settings).items():
        if key.startswith("IMGPIPE_"):
            monkeypatch.setenv(key, value)
    st.cache_resource.clear()
    yield settings
    st.cache_resource.clear()        # on_release stops the collector and its socket


def run_until(at: AppTest, check: Any, what: str) -> AppTest:
    def probe() -> bool:
        at.run(timeout=30)
        assert not at.exception, at.exception
        return bool(check(at))
    wait_for(probe, 30, interval=0.2, what=what)
    return at


def texts(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption]
    parts += [e.value for e in (*at.warning, *at.success, *at.info, *at.error)]
    return "\n".join(str(p) for p in parts)


@pytest.mark.timeout(120)
def test_page_shows_fed_workers_and_advice(app_env: Settings, zctx: zmq.Context[Any]) -> None:
    at = AppTest.from_file(APP, default_timeout=30)
    at.run()
    assert not at.exception, at.exception
    assert "No heartbeat yet" in texts(at)
    pub = make_socket(zctx, zmq.PUB, app_env, connect=app_env.dashboard_bus_endpoint)
    seq = iter(range(1, 10_000))
    try:
        def fed(at: AppTest) -> bool:
            n = next(seq)
            publish(pub, *(heartbeat(f"worker-{i}", n, state="busy", inflight=["t"])
                           for i in range(3)),
                    metric("vent", "ventilator", n, queue_depth=44, inflight=3),
                    event("worker joined", worker="worker-0"))
            frames = [getattr(t.value, "data", t.value) for t in at.table]
            shown = any("id" in f and "worker-2" in set(f["id"]) for f in frames)
            queued = {m.label: m.value for m in at.metric}.get("Queued")
            return shown and queued == "44"    # the queue arrives with the next 1 s sample

        run_until(at, fed, "the three workers in the fleet table and the queue")
        [advice] = at.warning
        assert advice.value.startswith("**SCALE_UP**")
        assert "100% of 3 workers busy with 44 queued" in advice.value
        labels = {m.label: m.value for m in at.metric}
        assert labels["Workers alive"] == "3" and labels["Busy"] == "3 / 3"
        page = texts(at)
        assert "Gateway unavailable" in page                 # no gateway in this test
        assert "No local stack" in "\n".join(c.value for c in at.sidebar.caption)
    finally:
        pub.close(linger=0)


class FakeSupervisor:
    """A ROUTER on a real socket that answers status and scale as the local stack does."""

    def __init__(self, ctx: zmq.Context[Any], settings: Settings, endpoint: str) -> None:
        self.sock = make_socket(ctx, zmq.ROUTER, settings, bind=endpoint)
        self.asked: list[Request] = []
        self.workers = 2
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)

    def serve(self) -> None:
        while not self.stop.is_set():
            if not self.sock.poll(100):
                continue
            ident, empty, *frames = self.sock.recv_multipart()
            req = decode(frames, expect=Request)
            assert isinstance(req, Request)
            self.asked.append(req)
            if req.op == "scale":
                self.workers = int(req.args["workers"])
            reply = Reply(ok=True, data={"workers": self.workers})
            self.sock.send_multipart([ident, empty, *encode(reply)])
        self.sock.close(linger=0)


@pytest.mark.timeout(120)
def test_scale_control_talks_to_the_local_supervisor(app_env: Settings,
                                                     zctx: zmq.Context[Any]) -> None:
    endpoint = app_env.control_endpoint + "-supervisor"
    app_env.data_dir.mkdir(parents=True, exist_ok=True)
    (app_env.data_dir / SUPERVISOR_FILE).write_text(json.dumps({"control": endpoint,
                                                                "pid": 1}))
    sup = FakeSupervisor(zctx, app_env, endpoint)
    sup.thread.start()
    try:
        at = AppTest.from_file(APP, default_timeout=30)
        at.run()
        assert not at.exception, at.exception
        assert at.sidebar.number_input[0].value == 2          # from op=status
        at.sidebar.number_input[0].set_value(5)
        at.sidebar.button[0].click()
        at.run()
        assert not at.exception, at.exception
        assert [r.op for r in sup.asked if r.op == "scale"] == ["scale"]
        assert next(r for r in sup.asked if r.op == "scale").args == {"workers": 5}
        assert "Asked the local stack for 5" in "\n".join(s.value for s in at.sidebar.success)
    finally:
        sup.stop.set()
        sup.thread.join(5)


def _with_supervisor(app_env: Settings, zctx: zmq.Context[Any]) -> FakeSupervisor:
    endpoint = app_env.control_endpoint + "-supervisor"
    app_env.data_dir.mkdir(parents=True, exist_ok=True)
    (app_env.data_dir / SUPERVISOR_FILE).write_text(json.dumps({"control": endpoint,
                                                                "pid": 1}))
    sup = FakeSupervisor(zctx, app_env, endpoint)
    sup.thread.start()
    return sup


@pytest.mark.timeout(120)
def test_scale_needs_the_admin_key_when_one_is_set(app_env: Settings, zctx: zmq.Context[Any],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGPIPE_ADMIN_KEY", "adm1n")
    sup = _with_supervisor(app_env, zctx)
    try:
        at = AppTest.from_file(APP, default_timeout=30)
        at.run()
        assert not at.exception, at.exception
        at.sidebar.number_input[0].set_value(5)
        at.sidebar.text_input[0].set_value("wrong")
        at.sidebar.button[0].click()
        at.run()
        assert "Wrong admin key" in "\n".join(e.value for e in at.sidebar.error)
        assert [r.op for r in sup.asked if r.op == "scale"] == []
        at.sidebar.text_input[0].set_value("adm1n")
        at.sidebar.button[0].click()
        at.run()
        assert not at.exception, at.exception
        assert [r.args for r in sup.asked if r.op == "scale"] == [{"workers": 5}]
    finally:
        sup.stop.set()
        sup.thread.join(5)


@pytest.mark.timeout(120)
def test_scale_is_hidden_beyond_loopback_without_an_admin_key(
        app_env: Settings, zctx: zmq.Context[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGPIPE_GATEWAY_HOST", "0.0.0.0")
    sup = _with_supervisor(app_env, zctx)
    try:
        at = AppTest.from_file(APP, default_timeout=30)
        at.run()
        assert not at.exception, at.exception
        assert not at.sidebar.number_input
        assert "IMGPIPE_ADMIN_KEY" in "\n".join(c.value for c in at.sidebar.caption)
    finally:
        sup.stop.set()
        sup.thread.join(5)
