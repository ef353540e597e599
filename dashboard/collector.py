"""The dashboard's ears: threads that own the bus SUB socket and poll the gateway.

Every publisher (workers, ventilator, sink, gateway) connects its PUB socket to
``settings.dashboard_bus_endpoint``; the collector binds it (the dashboard is a stable
node), subscribes to heartbeats, metrics and events, and folds each message into its
:class:`~dashboard.fleet.FleetState` (lock-protected). A second thread reads the
gateway's ``/api/metrics`` once a second for what only the job store knows (end-to-end
latency percentiles, per-stage means over every output). At start the collector asks
the ventilator for its recent events, so the event log begins with what happened
before the page (workers joined and lost, retries, failures). The Streamlit page reads
:meth:`snapshot` once a second; nothing else touches the socket.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import httpx
import zmq

from imgpipe.core.config import Settings, client_headers
from imgpipe.core.control import ask
from imgpipe.core.errors import ImgpipeError
from imgpipe.core.protocol import TOPIC_EVENT, TOPIC_HEARTBEAT, TOPIC_METRIC
from imgpipe.core.sockets import make_socket, start_authenticator
from imgpipe.dashboard.fleet import POLL_S, FleetState, SeqTracker, Snapshot

__all__ = ["Collector", "FleetState", "SeqTracker", "Snapshot"]

SEED_S = 60.0  # how long a new collector keeps asking for the ventilator's recent events

log = logging.getLogger(__name__)


class Collector(FleetState):
    """A FleetState fed by its own threads: ``start()`` binds, ``stop()`` closes."""

    def __init__(self, settings: Settings, ctx: zmq.Context[Any] | None = None, *,
                 history: int = 600, events: int = 200, poll_url: str = "") -> None:
        super().__init__(settings, history=history, events=events)
        self.poll_url = poll_url
        self._given_ctx = ctx
        self._own_ctx: zmq.Context[Any] | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._poller: threading.Thread | None = None

    @property
    def ctx(self) -> zmq.Context[Any]:
        """The process's context: the one given, else one made (and ended) by the collector."""
        if self._given_ctx is not None:
            return self._given_ctx
        if self._own_ctx is None:
            self._own_ctx = zmq.Context()
        return self._own_ctx

    def start(self, timeout: float = 5.0) -> Collector:
        """Bind and start listening; raises what the bind raised (e.g. address in use)."""
        if not self.endpoint:
            self.error = "IMGPIPE_DASHBOARD_BUS_ENDPOINT is empty: no bus to listen to"
            return self
        self._thread = threading.Thread(target=self._run, name="bus-collector", daemon=True)
        self._thread.start()
        if self.poll_url:
            self._poller = threading.Thread(target=self._poll, name="gateway-poll", daemon=True)
            self._poller.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"collector did not bind {self.endpoint} within {timeout} s")
        if self.error:
            self._thread.join(timeout)
            raise OSError(self.error)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for thread in (self._thread, self._poller):
            if thread is not None:
                thread.join(timeout)
        if self._own_ctx is not None:
            self._own_ctx.term()
            self._own_ctx = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _seed(self) -> bool:
        """Ask the ventilator for its recent events once; whether it answered."""
        try:
            rows = ask(self.ctx, self.settings, "events", timeout=1.0)
        except ImgpipeError:
            return False
        log.info("event log: %d earlier event(s) from the ventilator",
                 self.seed_events(rows if isinstance(rows, list) else []))
        return True

    def _poll(self) -> None:
        """Read the gateway's /api/metrics once a second (latency percentiles live there)."""
        url = self.poll_url.rstrip("/") + "/api/metrics"
        with httpx.Client(timeout=POLL_S, headers=client_headers()) as client:
            while not self._stop.is_set():
                try:
                    resp = client.get(url)
                    doc = resp.json() if resp.status_code == 200 else None
                    error = "" if isinstance(doc, dict) else f"{url} answered {resp.status_code}"
                except (httpx.HTTPError, ValueError) as exc:
                    doc, error = None, f"{self.poll_url} not reachable ({type(exc).__name__})"
                self.set_gateway_metrics(doc if isinstance(doc, dict) else None, time.time(),
                                         error)
                self._stop.wait(POLL_S)

    def _run(self) -> None:
        auth = None
        try:
            auth = start_authenticator(self.ctx, self.settings)
            sock = make_socket(self.ctx, zmq.SUB, self.settings, bind=self.endpoint,
                               rcvhwm=10_000,
                               subscribe=(TOPIC_HEARTBEAT, TOPIC_METRIC, TOPIC_EVENT))
        except (zmq.ZMQError, OSError, ValueError) as exc:
            self.error = f"cannot bind {self.endpoint}: {exc}"
            self._ready.set()
            if auth is not None:
                auth.stop()
            return
        self._ready.set()
        log.info("dashboard collector listening on %s", self.endpoint)
        next_sample = time.time() + 1.0
        seed_until = time.time() + SEED_S  # the ventilator may start after this page
        next_seed = 0.0
        try:
            while not self._stop.is_set():
                if seed_until and time.time() >= next_seed:
                    next_seed = time.time() + 2.0
                    if self._seed() or time.time() > seed_until:
                        seed_until = 0.0
                if sock.poll(200, zmq.POLLIN):
                    for _ in range(1000):  # drain a burst, then let sampling run
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self.handle_frames(frames, time.time())
                now = time.time()
                if now >= next_sample:
                    self.sample(now)
                    next_sample = max(next_sample + 1.0, now + 0.5)
        except Exception:  # noqa: BLE001 - keep the page alive and say why it stopped
            log.exception("collector stopped")
            self.error = "the collector thread stopped; see the dashboard log"
        finally:
            sock.close(linger=0)
            if auth is not None:
                auth.stop()
