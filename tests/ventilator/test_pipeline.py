"""Ventilator, sink and real workers as processes: routing, fairness, leases, restarts.

Jobs are recorded straight in the job store (as the gateway does) and announced by the
ventilator's rescan. Every test checks the Jepsen-style counters on every output: all
done, one file each, no output announced ``done`` twice.
"""

from __future__ import annotations

import signal
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from imgpipe.core.config import Settings
from imgpipe.core.errors import ImgpipeError
from imgpipe.core.protocol import TOPIC_DONE, TOPIC_EVENT, Done, Event
from imgpipe.core.records import Output
from imgpipe.core.sockets import make_socket
from imgpipe.core.store import Store
from tests.support import make_settings, short_dir, wait_for
from tests.ventilator.procs import (
    Procs,
    ask_ok,
    bus_messages,
    check_exactly_once,
    live_workers,
    make_job,
    outputs,
    wait_final,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

LIGHT = "resize:w=64"
HEAVY = "resize:w=64|median:size=9"


class Pipeline:
    def __init__(self, settings: Settings, ctx: zmq.Context[Any]) -> None:
        self.settings = settings
        self.ctx = ctx
        self.store = Store(settings.data_dir)
        self.procs = Procs(settings, settings.data_dir.parent / "logs")
        self.dones: list[Done] = []
        self.events: list[Event] = []
        self.stop = threading.Event()
        self.listening = threading.Event()
        self.thread = threading.Thread(target=self._listen, daemon=True)
        self.thread.start()
        assert self.listening.wait(10)

    def _listen(self) -> None:
        """Done events as a gateway sees them, fleet events as the dashboard does.

        A thread keeps polling: a SUB socket sends its subscription to a new publisher
        only when its owner calls into it, so an unpolled SUB would miss everything.
        """
        s = self.settings
        done = make_socket(self.ctx, zmq.SUB, s, connect=s.event_endpoint,
                           subscribe=(TOPIC_DONE,))
        bus = make_socket(self.ctx, zmq.SUB, s, bind=s.dashboard_bus_endpoint,
                          subscribe=(TOPIC_EVENT,))
        self.listening.set()
        try:
            poller = zmq.Poller()
            poller.register(done, zmq.POLLIN)
            poller.register(bus, zmq.POLLIN)
            while not self.stop.is_set():
                poller.poll(50)
                self.dones += [m for m in bus_messages(done) if isinstance(m, Done)]
                self.events += [m for m in bus_messages(bus) if isinstance(m, Event)]
        finally:
            done.close(0)
            bus.close(0)

    def close(self) -> None:
        self.procs.stop_all()
        self.stop.set()
        self.thread.join(10)
        self.store.close()

    def workers(self, n: int, *args: str, name: str = "", **env: str) -> list[str]:
        """Start n workers (named ``name`` when one, else by count); ids once listed alive."""
        before = {w["id"] for w in self._live()}
        for _ in range(n):
            self.procs.start(name or f"worker{self.procs.count}", "worker", *args, **env)
        def started() -> set[str] | None:
            ids = {str(w["id"]) for w in self._live()} - before
            return ids if len(ids) == n else None

        return sorted(wait_for(started, 60, what=f"{n} new live workers"))

    def _live(self) -> list[dict[str, Any]]:
        try:
            return live_workers(self.ctx, self.settings)
        except ImgpipeError:
            return []

    def wait(self, jobs: list[str], timeout: float = 90) -> list[Output]:
        wait_final(self.store, jobs, timeout, self.procs)
        wait_for(lambda: self.settle(jobs), 10, what="the ventilator idle")
        outs = check_exactly_once(self.store, jobs)
        announced = Counter(d.task_id for d in self.dones if d.state == "done")
        assert not [t for t, c in announced.items() if c > 1], "an output announced twice"
        return outs

    def settle(self, jobs: list[str]) -> bool:
        """The ventilator no longer holds anything for these jobs."""
        stats = ask_ok(self.ctx, self.settings, "stats")
        return bool(stats["inflight"] == 0 and stats["queue_depth"] == 0)

    def done_count(self) -> int:
        return int(self.store.totals().done)


@pytest.fixture
def pipe(zctx: zmq.Context[Any]) -> Iterator[Pipeline]:
    root = short_dir("vp-")
    settings = make_settings(Path(root) / "data", heartbeat_interval_s=0.5,
                             heartbeat_liveness=4, task_timeout_s=30.0)
    p = Pipeline(settings, zctx)
    try:
        yield p
    finally:
        p.close()


def start_core(p: Pipeline) -> None:
    p.procs.start("ventilator", "ventilator")
    p.procs.start("sink", "sink")
    wait_for(lambda: ask_ok(p.ctx, p.settings, "ping")["role"] == "ventilator", 30,
             what="ventilator answers ping")


def test_routing_by_cost_class_and_the_control_ops(pipe: Pipeline) -> None:
    start_core(pipe)
    light = pipe.workers(1, "--serves", "light")[0]
    heavy = pipe.workers(1, "--serves", "heavy")[0]
    jobs = [make_job(pipe.store, 4, [LIGHT, HEAVY], seed=i) for i in range(3)]
    outs = pipe.wait(jobs)
    by_class = {(o.ops, o.worker) for o in outs}
    assert by_class == {(LIGHT, light), (HEAVY, heavy)}, by_class

    ping = ask_ok(pipe.ctx, pipe.settings, "ping")
    assert set(ping) == {"role", "pid", "state", "uptime_s"} and ping["uptime_s"] > 0
    assert ping["state"] == "active"  # the only ventilator holds the lease
    rows = ask_ok(pipe.ctx, pipe.settings, "workers")
    assert {r["id"]: r["serves"] for r in rows} == {light: "light", heavy: "heavy"}
    assert set(rows[0]) == {"id", "host", "pid", "state", "serves", "slots", "free",
                            "inflight", "done", "failed", "cpu", "rss", "shm_bytes", "note",
                            "last_beat_age_s", "started"}
    stats = ask_ok(pipe.ctx, pipe.settings, "stats")
    assert stats["dispatched"] == 24 and stats["retries"] == stats["lost_tasks"] == 0
    assert stats["workers"]["alive"] == 2 and {"sink", "worker"} <= set(stats["components"])
    with pytest.raises(ImgpipeError, match="unknown op"):
        ask_ok(pipe.ctx, pipe.settings, "nonsense")


def test_a_class_nobody_serves_falls_back_to_live_workers(pipe: Pipeline) -> None:
    start_core(pipe)
    only = pipe.workers(1, "--serves", "light")[0]
    jobs = [make_job(pipe.store, 3, [HEAVY, LIGHT])]
    outs = pipe.wait(jobs)
    assert {o.worker for o in outs} == {only}


def test_a_slow_worker_gets_fewer_tasks_even_when_it_connected_first(pipe: Pipeline) -> None:
    start_core(pipe)
    slow = pipe.workers(1, IMGPIPE_TEST_HOOKS="1", IMGPIPE_WORKER_DELAY_MS="1500")[0]
    fast = pipe.workers(2)
    jobs = [make_job(pipe.store, 20, [LIGHT, "resize:w=64|grayscale"], seed=i)
            for i in range(2)]
    outs = pipe.wait(jobs)
    got = Counter(o.worker for o in outs)
    assert sum(got.values()) == 80 and set(got) <= {slow, *fast}
    assert got[slow] <= 16, got  # no batch pre-assigned to the first pipe
    assert all(got[f] > 2 * got[slow] for f in fast), got


def test_a_killed_worker_loses_nothing(pipe: Pipeline) -> None:
    start_core(pipe)
    # 2 s a task: still holding the one the registry saw when the kill comes (the
    # registry is a heartbeat old; at 0.4 s a task the victim could finish it first).
    victim = pipe.workers(1, name="victim", IMGPIPE_TEST_HOOKS="1",
                          IMGPIPE_WORKER_DELAY_MS="2000")[0]
    jobs = [make_job(pipe.store, 15, [LIGHT, HEAVY], seed=i) for i in range(2)]
    wait_for(lambda: pipe.done_count() >= 4, 60, what="a few outputs done")
    pipe.workers(1)
    holding = wait_for(lambda: [w for w in ask_ok(pipe.ctx, pipe.settings, "workers")
                                if w["id"] == victim and w["inflight"] > 0], 30,
                       what="the victim holding tasks")
    assert holding
    pipe.procs.kill("victim", signal.SIGKILL)
    outs = pipe.wait(jobs)
    assert any(o.attempts >= 2 for o in outs)
    stats = ask_ok(pipe.ctx, pipe.settings, "stats")
    assert stats["lost_tasks"] >= 1 and stats["failed_tasks"] == 0
    assert stats["workers"]["lost"] == 1
    whats = {e.what for e in pipe.events if e.source.startswith("ventilator")}
    assert {"worker_lost", "task_retried"} <= whats, whats


@pytest.mark.parametrize("victim", ["ventilator", "sink"])
def test_a_killed_and_restarted_stable_node_loses_nothing(pipe: Pipeline, victim: str) -> None:
    start_core(pipe)
    pipe.workers(2, IMGPIPE_TEST_HOOKS="1", IMGPIPE_WORKER_DELAY_MS="100")
    jobs = [make_job(pipe.store, 20, [LIGHT, HEAVY], seed=i) for i in range(2)]
    wait_for(lambda: pipe.done_count() >= 15, 60, what="a quarter of the outputs done")
    pipe.procs.kill(victim, signal.SIGKILL)
    assert pipe.done_count() < 80, "the run finished before the kill; make it longer"
    pipe.procs.start(victim, victim)
    outs = pipe.wait(jobs, timeout=120)
    assert len(outs) == 80
    stats = ask_ok(pipe.ctx, pipe.settings, "stats")
    assert stats["failed_tasks"] == 0
    if victim == "ventilator":
        assert stats["recovered"] >= 1  # running outputs were leased, not resent blindly
    attempts = Counter(o.attempts for o in outputs(pipe.store, jobs))
    assert max(attempts) <= 3, attempts


def test_the_chains_used_here_have_the_classes_the_routing_tests_assume() -> None:
    from imgpipe.filters import parse_chain

    assert parse_chain(LIGHT).cost == "light"
    assert parse_chain(HEAVY).cost == "heavy"
