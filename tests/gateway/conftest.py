"""Fixtures for the gateway: an in-process app, and a ventilator stand-in.

The in-process app runs the real Falcon app over a real job store and real ZeroMQ
sockets (its notices go to a PULL the test binds; its ``Done`` subscription listens to
a PUB the test binds). ``FakeVentilator`` is a ROUTER answering ``stats`` and
``workers`` in the shape ``core.control`` documents, so health and metrics logic can be
checked without the real pipeline (which the integration tests run).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from falcon import testing

from imgpipe.core.config import Settings
from imgpipe.core.protocol import Reply, Request, decode, encode
from imgpipe.core.sockets import make_socket
from imgpipe.core.store import Store
from imgpipe.gateway.app import create_app
from imgpipe.gateway.pipeline import Pipeline


class Gateway:
    """The app under test plus the store and pipeline it uses."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = Store.from_settings(settings)
        self.pipeline = Pipeline(settings)
        self.app = create_app(settings, store=self.store, pipeline=self.pipeline)
        self.client = testing.TestClient(self.app)

    def post(self, body: bytes, ctype: str, *, params: dict[str, str] | None = None,
             headers: dict[str, str] | None = None) -> testing.Result:
        return self.client.simulate_post("/api/process/", body=body, params=params,
                                         headers={"Content-Type": ctype, **(headers or {})})

    def close(self) -> None:
        self.pipeline.close()
        self.store.close()


@pytest.fixture
def make_gateway() -> Iterator[Any]:
    made: list[Gateway] = []

    def make(settings: Settings) -> Gateway:
        gw = Gateway(settings)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.close()


@pytest.fixture
def gateway(settings: Settings, make_gateway: Any) -> Gateway:
    return make_gateway(settings)  # type: ignore[no-any-return]


class FakeVentilator:
    """A ROUTER on ``control_endpoint`` answering ``stats`` and ``workers`` from ``self.data``."""

    def __init__(self, ctx: zmq.Context[Any], settings: Settings) -> None:
        self.data: dict[str, Any] = {
            "stats": {"queue_depth": 0, "inflight": 0, "retries": 0, "duplicates": 2,
                      "workers": {"alive": 1, "busy": 0, "idle": 1, "lost": 0},
                      "components": {"sink": 0.4, "worker": 0.2}, "uptime_s": 3.0},
            "workers": [{"id": "w-1", "host": "h", "pid": 1, "state": "idle", "done": 0,
                         "cpu": 0.0, "rss": 1, "last_beat_age_s": 0.2}],
        }
        self.asked: list[str] = []
        self._sock = make_socket(ctx, zmq.ROUTER, settings, bind=settings.control_endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(50, zmq.POLLIN):
                continue
            ident, empty, *frames = self._sock.recv_multipart()
            req = decode(frames, expect=Request)
            assert isinstance(req, Request)
            self.asked.append(req.op)
            reply = Reply(ok=req.op in self.data, data=self.data.get(req.op),
                          error="" if req.op in self.data else "unknown op")
            self._sock.send_multipart([ident, empty, *encode(reply)])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close(linger=0)


@pytest.fixture
def ventilator(zctx: zmq.Context[Any], settings: Settings) -> Iterator[FakeVentilator]:
    fake = FakeVentilator(zctx, settings)
    yield fake
    fake.close()
