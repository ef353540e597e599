"""The collector: folding bus messages into a snapshot, and counting telemetry gaps."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import zmq

from imgpipe.core.config import Settings
from imgpipe.core.sockets import make_socket
from imgpipe.dashboard.collector import Collector, SeqTracker
from imgpipe.dashboard.fleet import GATEWAY_STAGES
from tests.dashboard.feed import event, heartbeat, metric, publish
from tests.support import free_port, wait_for


@pytest.mark.parametrize(("seqs", "missed", "restarts"), [
    ([1, 2, 3, 4], 0, 0),
    ([7, 8, 12], 3, 0),            # joined late at 7: nothing before counts; 9..11 missed
    ([1, 3, 5, 7], 3, 0),
    ([5, 6, 0, 1, 2], 0, 1),       # publisher restarted: its numbers began again
    ([5, 6, 6], 0, 1),             # a repeat is not a gap
    ([1, 100], 98, 0),
])
def test_seq_tracker_counts_missing_numbers(seqs: list[int], missed: int, restarts: int) -> None:
    t = SeqTracker()
    for s in seqs:
        t.see("metric", "sink-1", s)
    [row] = t.rows()
    assert (row["missed"], row["restarts"], row["received"]) == (missed, restarts, len(seqs))
    assert t.missed == missed


def test_seq_tracker_keeps_sources_and_kinds_apart() -> None:
    t = SeqTracker()
    for kind, src, seq in [("heartbeat", "w1", 1), ("metric", "w1", 1), ("heartbeat", "w2", 1),
                           ("heartbeat", "w1", 2), ("metric", "w1", 3), ("heartbeat", "w2", 5)]:
        t.see(kind, src, seq)
    got = {(r["source"], r["kind"]): r["missed"] for r in t.rows()}
    assert got == {("w1", "heartbeat"): 0, ("w1", "metric"): 1, ("w2", "heartbeat"): 3}


def test_workers_go_lost_then_are_forgotten(settings: Settings) -> None:
    s = dataclasses.replace(settings, heartbeat_interval_s=1.0, heartbeat_liveness=3,
                            lost_visible_s=10.0)
    c = Collector(s, ctx=None)
    try:
        c.handle(heartbeat("w1", 1, state="busy", inflight=["t1"]), now=100.0)
        c.handle(heartbeat("w2", 1), now=100.0)
        c.handle(heartbeat("w2", 2), now=102.5)
        snap = c.snapshot(now=103.5)
        assert {w["id"]: w["state"] for w in snap.workers} == {"w1": "lost", "w2": "idle"}
        assert snap.workers[1]["age_s"] == pytest.approx(1.0)
        c.handle(heartbeat("w1", 2, state="idle"), now=104.0)       # back again
        assert {w["id"]: w["state"] for w in c.snapshot(now=104.0).workers}["w1"] == "idle"
        assert [w["id"] for w in c.snapshot(now=116.0).workers] == ["w1"]   # w2 forgotten
    finally:
        c.stop()


def test_sample_takes_throughput_queue_latency_and_stages(settings: Settings) -> None:
    c = Collector(settings)
    try:
        # No sink metric: throughput from the growth of the workers' done counters.
        c.handle(heartbeat("w1", 1, done=10), now=0.0)
        c.sample(0.0)
        c.handle(heartbeat("w1", 2, done=14, state="busy", inflight=["a", "b"]), now=1.0)
        c.handle(heartbeat("w1", 3, done=18, state="busy", inflight=["a"]), now=2.0)
        p = c.sample(2.0)
        assert p["throughput"] == pytest.approx(4.0)
        assert (p["alive"], p["busy"], p["inflight"], p["queue_depth"]) == (1, 1, 1, None)
        # A restarted worker (new pid, done back to 0) adds nothing negative.
        c.handle(heartbeat("w1", 1, done=0, pid=999), now=3.0)
        assert c.sample(3.0)["throughput"] >= 0
        c.handle(metric("vent", "ventilator", 1, queue_depth=40, inflight=6, active=1),
                 now=3.5)
        # A standby ventilator's metric (nothing queued there) does not hide the queue.
        c.handle(metric("vent2", "ventilator", 1, queue_depth=0, inflight=0, active=0),
                 now=3.55)
        c.handle(metric("w1", "worker", 1, throughput=1.5, decode_ms_mean=18.0,
                        filters_ms_mean=40.0, total_ms_mean=70.0), now=3.6)
        c.handle(metric("w2", "worker", 1, throughput=1.0), now=3.6)
        c.handle(metric("gw", "gateway", 1, latency_ms={"p50": 1, "p95": 2, "p99": 3}),
                 now=3.6)                       # HTTP request latency: not the outputs'
        c.handle(event("worker lost", worker="w9", detail="5 beats missed"), now=3.7)
        p = c.sample(4.0)
        assert (p["queue_depth"], p["inflight"], p["throughput"]) == (40, 6, 2.5)
        assert (p["p50"], p["p95"], p["p99"]) == (None, None, None)
        c.set_gateway_metrics({"queue_depth": 39, "latency_ms": {"p50": 80, "p95": 200,
                                                                 "p99": None},
                               "stages_ms": {"queue": 5.0, "decode": 20.0, "filters": None}},
                              now=4.5)
        p = c.sample(5.0)
        assert (p["p50"], p["p95"], p["p99"], p["queue_depth"]) == (80, 200, None, 40)
        snap = c.snapshot(now=5.0)
        assert snap.stages == {"w1": {"decode": 18.0, "filters": 40.0},
                               GATEWAY_STAGES: {"queue": 5.0, "decode": 20.0}}
        assert snap.events[-1]["what"] == "worker lost"
        # Stale metrics (a dead ventilator) stop feeding the live numbers.
        assert c.sample(20.0)["queue_depth"] is None
        assert set(c.snapshot(now=20.0).stages) == {"w1"}   # the stale gateway figure goes
    finally:
        c.stop()


def test_collector_counts_gaps_over_a_real_socket(settings: Settings, zctx: zmq.Context[Any]
                                                  ) -> None:
    c = Collector(settings, zctx).start()
    pub = make_socket(zctx, zmq.PUB, settings, connect=settings.dashboard_bus_endpoint)
    try:
        seq = iter(range(1, 10_000))
        last = {"n": 0}

        def joined() -> bool:            # publish until the SUB side hears us (slow joiner)
            last["n"] = next(seq)
            publish(pub, heartbeat("w-gap", last["n"]))
            return any(w["id"] == "w-gap" for w in c.snapshot().workers)

        wait_for(joined, 10, what="first heartbeat through the bus")
        n = last["n"]
        publish(pub, heartbeat("w-gap", n + 1), heartbeat("w-gap", n + 2))
        publish(pub, heartbeat("w-gap", n + 6))                  # n+3..n+5 never sent
        publish(pub, metric("sink-a", "sink", 1), metric("sink-a", "sink", 2),
                metric("sink-a", "sink", 4))                     # 3 never sent
        pub.send_multipart([b"hb", b"{not json"])                # counted, not fatal
        publish(pub, event("worker joined", worker="w-gap"))

        def settled() -> Any:
            snap = c.snapshot()
            return snap if snap.events and snap.bad == 1 else None

        snap = wait_for(settled, 10, what="all frames folded")
        rows = {(r["source"], r["kind"]): r for r in snap.gaps}
        assert rows[("w-gap", "heartbeat")]["missed"] == 3
        assert rows[("w-gap", "heartbeat")]["last_seq"] == n + 6
        assert rows[("sink-a", "metric")]["missed"] == 1
        assert snap.missed == 4
        assert snap.events[-1]["worker"] == "w-gap"
        assert c.running
    finally:
        pub.close(linger=0)
        c.stop()
    assert not c.running


def test_collector_reports_a_bind_it_cannot_make(settings: Settings, zctx: zmq.Context[Any]
                                                 ) -> None:
    s = dataclasses.replace(settings, dashboard_bus_endpoint=f"tcp://127.0.0.1:{free_port()}")
    first = Collector(s, zctx).start()
    try:
        with pytest.raises(OSError, match="cannot bind"):
            Collector(s, zctx).start()
    finally:
        first.stop()


def test_no_frame_stops_the_collector_and_peers_cannot_grow_it(settings: Settings) -> None:
    """Garbage is counted as bad; forged ids stop at MAX_PEERS until old ones expire."""
    from imgpipe.core.protocol import encode_topic
    from imgpipe.dashboard.fleet import MAX_PEERS

    c = Collector(settings, ctx=None)
    try:
        junk: list[list[bytes]] = [[b"hb", b'{"v":1,"kind":[]}'], [b"metric", b"\xff"],
                                   [b"hb", b"[" * 5000 + b"]" * 5000], [b"x"], [],
                                   [b"hb", b'{"v":1,"kind":"heartbeat","worker":[]}']]
        for frames in junk:
            c.handle_frames(frames, now=100.0)
        for i in range(MAX_PEERS + 500):
            c.handle_frames(encode_topic(metric(f"src-{i}", "worker", 1)), now=100.0)
            c.handle_frames(encode_topic(heartbeat(f"w-{i}", 1)), now=100.0)
        snap = c.snapshot(now=100.0)
        assert snap.bad == len(junk) + 2 * 500
        assert len(snap.workers) == MAX_PEERS
        assert len(c._sources) == MAX_PEERS and len(c._seq.sources) <= 2 * MAX_PEERS
        c.sample(now=1000.0)  # everything stale: room again
        c.handle_frames(encode_topic(heartbeat("late", 1)), now=1000.0)
        assert [w["id"] for w in c.snapshot(now=1000.0).workers] == ["late"]
    finally:
        c.stop()


def test_the_event_log_starts_with_what_happened_before(settings: Settings) -> None:
    c = Collector(settings, ctx=None, events=4)
    try:
        c.handle(event("worker_lost", worker="w9"), now=200.0)
        live_ts = c.snapshot(now=200.0).events[0]["ts"]
        earlier = [{"ts": live_ts - 10 + i, "source": "ventilator", "what": f"e{i}",
                    "worker": "w1", "task_id": "", "detail": ""} for i in range(5)]
        junk = ["x", {"ts": "yesterday"}, {"what": "no ts"}]
        assert c.seed_events([*earlier, *junk, {**earlier[0], "ts": live_ts + 1}]) == 3
        assert [e["what"] for e in c.snapshot(now=200.0).events] == ["e2", "e3", "e4",
                                                                     "worker_lost"]
    finally:
        c.stop()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_dashboard_started_late_shows_the_workers_joining(stack_factory: Any) -> None:
    """Over real sockets: the workers joined before the collector existed, and its
    event log still starts with them (asked of the ventilator at start)."""
    stack = stack_factory(2)
    late = dataclasses.replace(stack.settings,
                               dashboard_bus_endpoint=f"tcp://127.0.0.1:{free_port()}")
    c = Collector(late, ctx=None).start()
    try:
        joined = wait_for(lambda: [e for e in c.snapshot().events
                                   if e["what"] == "worker_joined"] or None,
                          20, what="the earlier worker_joined events")
        assert {e["worker"] for e in joined} == {w["id"] for w in stack.workers()}
    finally:
        c.stop()
