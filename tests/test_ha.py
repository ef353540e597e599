"""Beyond one host: two ventilators (one active, fenced by the store's lease), several
sinks, several gateways — real processes on ipc:// endpoints, on each store backend.

Every test counts, over every accepted output: lost (not done), duplicated (announced
``done`` twice, a second file, the store's done counter past the output count).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from imgpipe.core.config import Settings, endpoints
from imgpipe.core.control import ask
from imgpipe.core.errors import ImgpipeError
from imgpipe.core.protocol import TOPIC_DONE, Done
from imgpipe.core.sockets import make_socket
from imgpipe.core.store import Store
from tests.gateway.live import Stack
from tests.images import jpeg
from tests.support import make_settings, short_dir, wait_for
from tests.ventilator.procs import Procs, bus_messages, check_exactly_once, make_job, wait_final

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

CHAINS = ["resize:w=64", "resize:w=64|invert"]   # both 64x43 from the 96x64 test images
VENTILATOR_ENDPOINTS = ("intake_endpoint", "light_task_endpoint", "heavy_task_endpoint",
                        "control_endpoint", "bus_endpoint")
SINK_ENDPOINTS = ("result_endpoint", "event_endpoint")


def ha_settings(root: Path, store_url: str, *, ventilators: int = 1, sinks: int = 1,
                **overrides: Any) -> Settings:
    """Private ipc:// endpoints, with a list of ``ventilators`` or ``sinks`` entries
    where there are several; every process of the test gets these same settings."""
    base = make_settings(root / "data", store_url=store_url, **overrides)
    d = short_dir("ha-")
    lists = {name: ",".join(f"ipc://{d}/{name.split('_endpoint')[0]}{i}" for i in range(n))
             for names, n in ((VENTILATOR_ENDPOINTS, ventilators), (SINK_ENDPOINTS, sinks))
             if n > 1 for name in names}
    return dataclasses.replace(base, **lists).validate()


class Dones:
    """``Done`` events as gateways hear them, one SUB per sink, counted per sink."""

    def __init__(self, ctx: zmq.Context[Any], settings: Settings) -> None:
        self.by_sink: list[list[Done]] = []
        self.stop = threading.Event()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._listen, args=(ctx, settings, ready),
                                       daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def _listen(self, ctx: zmq.Context[Any], settings: Settings, ready: threading.Event) -> None:
        subs = [make_socket(ctx, zmq.SUB, settings, connect=ep, subscribe=(TOPIC_DONE,))
                for ep in endpoints(settings.event_endpoint)]
        self.by_sink = [[] for _ in subs]
        ready.set()
        poller = zmq.Poller()
        for s in subs:
            poller.register(s, zmq.POLLIN)
        try:
            while not self.stop.is_set():
                poller.poll(50)
                for s, got in zip(subs, self.by_sink, strict=True):
                    got += [m for m in bus_messages(s) if isinstance(m, Done)]
        finally:
            for s in subs:
                s.close(0)

    def announced_twice(self) -> list[str]:
        done = Counter(d.task_id for got in self.by_sink for d in got if d.state == "done")
        return [t for t, c in done.items() if c > 1]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


class Rig:
    """Processes, the store and the Done listener of one test."""

    def __init__(self, settings: Settings, ctx: zmq.Context[Any]) -> None:
        self.settings = settings
        self.ctx = ctx
        self.store = Store.from_settings(settings)
        self.procs = Procs(settings, settings.data_dir.parent / "logs")
        self.dones = Dones(ctx, settings)

    def close(self) -> None:
        self.procs.stop_all()
        self.dones.close()
        self.store.close()

    def ask(self, i: int, op: str) -> Any:
        """Ventilator ``i`` (by its control entry) alone."""
        return ask(self.ctx, self.settings, op, timeout=2.0,
                   endpoint=endpoints(self.settings.control_endpoint)[i])

    def ventilator(self, i: int, state: str) -> dict[str, Any]:
        """Start ventilator ``i`` and wait until it answers on entry ``i`` as ``state``."""
        self.procs.start(f"ventilator{i}", "ventilator")
        return self.wait_state(i, state)

    def wait_state(self, i: int, state: str, timeout: float = 60) -> dict[str, Any]:
        def answers() -> dict[str, Any] | None:
            ping = self.ask(i, "ping")
            return ping if ping["state"] == state else None

        try:
            return wait_for(answers, timeout, what=f"ventilator {i} {state}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.procs.log_tail()}") from None

    def workers(self, n: int, delay_ms: int = 300) -> None:
        for i in range(n):
            self.procs.start(f"worker{i}", "worker", IMGPIPE_TEST_HOOKS="1",
                             IMGPIPE_WORKER_DELAY_MS=str(delay_ms))

        def live() -> bool:
            try:
                rows = ask(self.ctx, self.settings, "workers", timeout=2.0)
            except ImgpipeError:
                return False
            return sum(w["state"] != "lost" for w in rows) == n

        wait_for(live, 60, what=f"{n} live workers")

    def done(self) -> int:
        return int(self.store.totals().done)

    def finish(self, jobs: list[str], outputs: int, *, sinks_killed: int = 0) -> None:
        """Every output done once: one file each, announced once, counted once.

        A sink killed mid-write leaves its temp file (one: it writes one result at a
        time) for the leftover walk; it is never an output."""
        wait_final(self.store, jobs, 180, self.procs)
        partials = list(self.settings.data_dir.glob("outputs/*/.tmp-*"))
        assert len(partials) <= sinks_killed, partials
        for path in partials:
            path.unlink()
        outs = check_exactly_once(self.store, jobs)
        assert len(outs) == outputs
        assert self.done() == outputs, "the store counted an output done twice"
        assert not self.dones.announced_twice(), "an output announced done twice"
        assert max(o.attempts for o in outs) <= self.settings.max_attempts


@pytest.fixture
def rig_for(zctx: zmq.Context[Any], store_url: str) -> Iterator[Any]:
    rigs: list[Rig] = []

    def make(**kw: Any) -> Rig:
        rig = Rig(ha_settings(short_dir("har-"), store_url, **kw), zctx)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


LEASE = {"ventilator_lease_s": 4.0, "heartbeat_interval_s": 0.5, "heartbeat_liveness": 4}


def test_two_ventilators_one_dispatches_and_the_standby_takes_over_when_it_is_killed(
        rig_for: Any) -> None:
    rig = rig_for(ventilators=2, **LEASE)
    first = rig.ventilator(0, "active")
    rig.ventilator(1, "standby")
    rig.procs.start("sink", "sink")
    rig.workers(2)
    jobs = [make_job(rig.store, 10, CHAINS, seed=i) for i in range(2)]   # 40 outputs
    wait_for(lambda: rig.done() >= 6, 60, what="some outputs done before the kill")
    assert rig.ask(1, "stats")["dispatched"] == 0, "the standby dispatched"
    rig.procs.kill("ventilator0", signal.SIGKILL)
    assert rig.done() < 40, "the run finished before the kill; make it longer"
    rig.wait_state(1, "active")
    rig.finish(jobs, 40)
    lease = rig.ask(1, "stats")["lease"]
    took = lease["takeover"]
    assert took is not None and took["previous"].endswith(f":{first['pid']}"), lease
    assert took["first_dispatch_s"] is not None, lease
    assert lease["lease_token"] == took["token"] and lease["takeovers"] == 1
    print(f"\ntakeover ({rig.store.backend}): lease taken {took['took_s']} s and first "
          f"dispatch {took['first_dispatch_s']} s after the killed ventilator's last renew "
          f"(ventilator_lease_s={rig.settings.ventilator_lease_s:g})")


def test_a_paused_ventilator_does_not_dispatch_once_the_standby_holds_the_lease(
        rig_for: Any) -> None:
    rig = rig_for(ventilators=2, **LEASE)
    rig.ventilator(0, "active")
    rig.ventilator(1, "standby")
    rig.procs.start("sink", "sink")
    rig.workers(2, delay_ms=1000)
    jobs = [make_job(rig.store, 4, CHAINS, seed=0)]
    # Paused with nothing left to send, so it is not inside a write (which would hold
    # SQLite's write lock through the pause: a pause every SQLite user shares).
    wait_for(lambda: (lambda st: st["dispatched"] >= 8 and st["queue_depth"] == 0)(
        rig.ask(0, "stats")), 60, what="everything dispatched by the first ventilator")
    paused = rig.procs.procs["ventilator0"]
    os.kill(paused.pid, signal.SIGSTOP)
    try:
        rig.wait_state(1, "active")
        jobs.append(make_job(rig.store, 4, CHAINS, seed=1))  # new work, in the store only
        wait_for(lambda: rig.ask(1, "stats")["lease"]["last_dispatch_at"], 60,
                 what="the second ventilator dispatching")
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    resumed = rig.wait_state(0, "standby", timeout=30)
    rig.finish(jobs, 16)
    old, new = rig.ask(0, "stats"), rig.ask(1, "stats")
    assert old["lease"]["leases_lost"] == 1 and old["inflight"] == old["queue_depth"] == 0
    assert old["lease"]["last_dispatch_at"] < new["lease"]["active_since"], (old, new)
    assert new["lease"]["lease_token"] > 1 and resumed["state"] == "standby"


def test_two_sinks_and_two_gateways_share_the_work_and_survive_losing_one_of_each(
        rig_for: Any) -> None:
    """Workers push to both sinks; a job submitted on one gateway is waited for and
    fetched on the other; then one sink and one gateway are killed mid-run."""
    rig = rig_for(sinks=2, heartbeat_interval_s=0.5, heartbeat_liveness=4)
    web = Stack(rig.settings, rig.settings.data_dir.parent / "web-logs")
    gateways = []
    try:
        rig.ventilator(0, "active")
        rig.procs.start("sink0", "sink")
        rig.procs.start("sink1", "sink")
        rig.workers(2)
        a, b = web.extra_gateway(), web.extra_gateway()
        gateways += [a, b]
        a.wait_healthy()
        files = [("image", (f"{i}.jpg", jpeg(96, 64, seed=i), "image/jpeg")) for i in range(8)]
        sent = a.http.post("/api/process/", files=files, data={"ops": CHAINS})
        assert sent.status_code == 202, sent.text
        first = sent.json()["id"]
        waited = b.http.get(f"/api/jobs/{first}", params={"wait": 60})
        assert waited.status_code == 200 and waited.json()["state"] == "done", waited.text
        out = b.http.get(f"/api/jobs/{first}/outputs/0")
        assert out.status_code == 200 and out.content[:2] == b"\xff\xd8"
        assert all(rig.dones.by_sink), "every sink should have finished some outputs"

        later = [make_job(rig.store, 10, CHAINS, seed=i) for i in range(2)]
        base = rig.done()
        wait_for(lambda: rig.done() >= base + 6, 60, what="progress before the kills")
        rig.procs.kill("sink0", signal.SIGKILL)
        a.kill()
        after = b.http.post("/api/process/", files=files[:2], data={"ops": CHAINS},
                            params={"wait": 90})
        assert after.status_code == 200 and after.json()["state"] == "done", after.text
        rig.finish([first, *later, after.json()["id"]], 16 + 40 + 4, sinks_killed=1)
        b.wait_healthy()  # the other sink is heard: healthy
    finally:
        for gw in gateways:
            gw.close()
        web.stop()
