"""The dispatcher's state machine on a fake clock: leases, liveness, routing, recovery."""

from __future__ import annotations

from typing import Any

import pytest

from imgpipe.core.config import Settings
from imgpipe.core.protocol import Claim, Done, Event, Heartbeat, Metric
from imgpipe.core.records import OpenTask
from imgpipe.ventilator.dispatcher import Dispatcher, Fail

JOB = "0f5a1c2e-3b4d-4e6f-8a9b-0c1d2e3f4a5b"
S = Settings(task_timeout_s=60.0, max_attempts=3, heartbeat_interval_s=1.0,
             heartbeat_liveness=5, lost_visible_s=60.0, rescan_interval_s=1.0)


def task(n: int, cost: str = "light", *, state: str = "queued", attempts: int = 0,
         queued_at: float | None = None) -> OpenTask:
    return OpenTask(task_id=f"{JOB}:{n}", job_id=JOB, n=n, image=0, ops="resize:w=64",
                    cost=cost, state=state, attempts=attempts,
                    queued_at=float(n) if queued_at is None else queued_at)


def hb(worker: str, now: float, *, serves: str = "all", inflight: tuple[str, ...] = (),
       pid: int = 100, seq: int = 1) -> Heartbeat:
    return Heartbeat(worker=worker, host="h", pid=pid, seq=seq, ts=now, serves=serves,
                     inflight=list(inflight), state="busy" if inflight else "idle")


def tid(n: int) -> str:
    return f"{JOB}:{n}"


def detail(action: Any) -> str:
    assert isinstance(action, Event)
    return action.detail


def whats(actions: list[Any]) -> list[str]:
    return [a.what for a in actions if isinstance(a, Event)]


@pytest.fixture
def d() -> Dispatcher:
    return Dispatcher(S, start=0.0)


def sink_seen(d: Dispatcher, now: float) -> None:
    d.on_metric(Metric(source="sink@h:1", role="sink", seq=1, ts=now), now)


def test_tasks_wait_until_a_worker_is_alive(d: Dispatcher) -> None:
    d.load([task(0), task(1)], 0.0, complete=True)
    assert d.next_task("light", 0.0) is None and not d.has_work("light")
    assert whats(d.on_heartbeat(hb("w1", 0.5), 0.5)) == ["worker_joined"]
    e = d.next_task("light", 0.6)
    assert e is not None and e.task.task_id == tid(0) and e.attempt == 1
    assert d.stats(0.6)["inflight"] == 1 and d.stats(0.6)["queued"] == {"light": 1, "heavy": 0}


def test_routing_by_class_and_fallback(d: Dispatcher) -> None:
    d.load([task(0, "light"), task(1, "heavy")], 0.0, complete=True)
    d.on_heartbeat(hb("lw", 0.0, serves="light"), 0.0)
    d.on_heartbeat(hb("hw", 0.0, serves="heavy"), 0.0)
    assert d.next_task("light", 0.1).task.cost == "light"  # type: ignore[union-attr]
    assert d.next_task("light", 0.1) is None
    assert d.next_task("heavy", 0.1).task.cost == "heavy"  # type: ignore[union-attr]


def test_a_class_nobody_serves_falls_back_to_the_other_socket_oldest_first() -> None:
    d = Dispatcher(S)
    d.load([task(0, "heavy", queued_at=1.0), task(1, "light", queued_at=2.0),
            task(2, "heavy", queued_at=3.0)], 0.0, complete=True)
    d.on_heartbeat(hb("lw", 0.0, serves="light"), 0.0)
    assert not d.has_work("heavy")
    order = [d.next_task("light", 0.1).task.n for _ in range(3)]  # type: ignore[union-attr]
    assert order == [0, 1, 2]
    # Once a heavy worker appears, heavy work goes to its own socket again.
    d.load([task(3, "heavy", queued_at=4.0)], 0.2, complete=False)
    d.on_heartbeat(hb("hw", 0.2, serves="heavy"), 0.2)
    assert d.next_task("light", 0.3) is None
    assert d.next_task("heavy", 0.3).task.n == 3  # type: ignore[union-attr]


def test_lost_worker_tasks_are_redispatched_with_the_next_attempt(d: Dispatcher) -> None:
    d.load([task(0), task(1)], 0.0, complete=True)
    d.on_heartbeat(hb("w1", 0.0), 0.0)
    d.on_heartbeat(hb("w2", 0.0), 0.0)
    a, b = d.next_task("light", 0.1), d.next_task("light", 0.1)
    assert a is not None and b is not None
    d.on_claim(Claim(worker="w1", task_id=a.task.task_id, attempt=1, ts=0.2), 0.2)
    d.on_claim(Claim(worker="w2", task_id=b.task.task_id, attempt=1, ts=0.2), 0.2)
    # w2 keeps beating, w1 goes silent.
    for t in range(1, 7):
        d.on_heartbeat(hb("w2", t, inflight=(b.task.task_id,), seq=t), float(t))
        acts = d.tick(float(t))
        if t < 6:
            assert acts == []
    assert whats(acts) == ["worker_lost", "task_retried"]
    assert [w["state"] for w in d.registry.listing(6.0)] == ["lost", "busy"]
    again = d.next_task("light", 6.1)
    assert again is not None and again.task.task_id == a.task.task_id and again.attempt == 2
    assert d.counters["lost_tasks"] == 1 and d.counters["retries"] == 1


def test_deadline_expiry_redispatches(d: Dispatcher) -> None:
    d.load([task(0)], 0.0, complete=True)
    e = d.next_task("light", 0.0) if d.on_heartbeat(hb("w", 0.0), 0.0) else None
    assert e is not None
    d.on_claim(Claim(worker="w", task_id=tid(0), attempt=1, ts=0.1), 0.1)
    t, acts = 0.0, []
    while t < S.task_timeout_s + 3:
        t += 1.0
        d.on_heartbeat(hb("w", t, inflight=(tid(0),), seq=int(t)), t)  # still busy with it
        got = d.tick(t)
        if t <= S.task_timeout_s:
            assert got == [], t
        acts += got
    assert whats(acts) == ["task_retried"] and "deadline passed on w" in detail(acts[0])
    assert d.next_task("light", t).attempt == 2  # type: ignore[union-attr]


def test_max_attempts_fails_with_every_reason(d: Dispatcher) -> None:
    d.load([task(0)], 0.0, complete=True)
    d.on_heartbeat(hb("w", 0.0), 0.0)
    actions: list[Any] = []
    for attempt in (1, 2, 3):
        e = d.next_task("light", 0.0)
        assert e is not None and e.attempt == attempt
        actions = d.on_done(Done(task_id=tid(0), job_id=JOB, n=0, state="retry",
                                 attempt=attempt, error="filter process died"), 0.0)
    fail = [a for a in actions if isinstance(a, Fail)]
    assert len(fail) == 1 and fail[0].attempt == 3
    assert fail[0].reason.startswith("lost on 3 attempts: filter process died")
    assert fail[0].reason.count("filter process died") == 3
    assert whats(actions) == ["task_failed"]
    assert d.next_task("light", 0.0) is None and tid(0) not in d.entries
    assert d.counters["failed_tasks"] == 1


def test_stale_retry_and_claim_from_an_older_attempt_are_ignored(d: Dispatcher) -> None:
    d.load([task(0)], 0.0, complete=True)
    d.on_heartbeat(hb("w", 0.0), 0.0)
    d.next_task("light", 0.0)
    d.on_done(Done(task_id=tid(0), job_id=JOB, n=0, state="retry", attempt=1), 0.1)
    e = d.next_task("light", 0.2)
    assert e is not None and e.attempt == 2
    assert d.on_done(Done(task_id=tid(0), job_id=JOB, n=0, state="retry", attempt=1), 0.3) == []
    d.on_claim(Claim(worker="old", task_id=tid(0), attempt=1, ts=0.3), 0.3)
    assert e.worker is None and e.state == "inflight"


def test_done_drops_the_lease_and_duplicates_are_counted(d: Dispatcher) -> None:
    d.load([task(0)], 0.0, complete=True)
    d.on_heartbeat(hb("w", 0.0), 0.0)
    d.next_task("light", 0.0)
    d.on_done(Done(task_id=tid(0), job_id=JOB, n=0, state="done", attempt=1), 0.5)
    d.on_done(Done(task_id=tid(0), job_id=JOB, n=0, state="duplicate", attempt=1), 0.6)
    assert d.entries == {} and d.counters["duplicates"] == 1
    assert whats(d.tick(200.0)) == ["worker_lost"]  # and no task to re-dispatch
    assert d.stats(200.0)["inflight"] == 0


def test_restart_recovery_reclaims_by_heartbeat_and_redispatches_the_rest(
        d: Dispatcher) -> None:
    d.load([task(0, state="running", attempts=1), task(1, state="running", attempts=1),
            task(2)], 0.0, complete=True)
    assert d.stats(0.0)["inflight"] == 2 and d.counters["recovered"] == 2
    d.on_heartbeat(hb("w", 0.5, inflight=(tid(0),)), 0.5)
    assert d.entries[tid(0)].worker == "w"
    fresh = d.next_task("light", 0.6)
    assert fresh is not None and fresh.task.n == 2  # recovered ones are not sent again
    acts: list[Any] = []
    t = 0.5
    while not acts and t < 10:
        t += 0.5
        d.on_heartbeat(hb("w", t, inflight=(tid(0), tid(2)), seq=int(t * 2)), t)
        acts = d.tick(t)
    assert t == pytest.approx(S.liveness_s)  # one grace after the restart
    assert whats(acts) == ["task_retried"] and "ventilator restart" in detail(acts[0])
    again = d.next_task("light", t)
    assert again is not None and again.task.n == 1 and again.attempt == 2
    assert d.counters["adopted"] == 1


def test_recovered_task_at_max_attempts_fails_instead_of_looping(d: Dispatcher) -> None:
    d.load([task(0, state="running", attempts=3)], 0.0, complete=True)
    acts = d.tick(S.liveness_s + 0.1)
    assert [type(a) for a in acts] == [Fail, Event]


def test_rescan_forgets_outputs_that_became_final(d: Dispatcher) -> None:
    d.load([task(0), task(1)], 0.0, complete=True)
    d.load([task(1)], 1.0, complete=False)
    assert set(d.entries) == {tid(0), tid(1)}  # a cut scan proves nothing
    d.load([task(1)], 2.0, complete=True)
    assert set(d.entries) == {tid(1)}


def test_a_result_that_never_reaches_the_sink_is_redispatched() -> None:
    finals: set[str] = set()
    d = Dispatcher(S, is_final=finals.__contains__)
    d.load([task(0), task(1)], 0.0, complete=True)
    d.on_heartbeat(hb("w", 0.0), 0.0)
    for _ in range(2):
        d.next_task("light", 0.0)
    for n in (0, 1):
        d.on_claim(Claim(worker="w", task_id=tid(n), attempt=1, ts=0.0), 0.0)
    finals.add(tid(0))  # output 0 reached the store, its Done event was missed
    acts: list[Any] = []
    t = 0.0
    while t < 20:
        t += 1.0
        sink_seen(d, t)
        d.on_heartbeat(hb("w", t, seq=int(t)), t)  # w no longer lists either task
        acts += d.tick(t)
    assert whats(acts) == ["task_retried"] and "never reached the sink" in detail(acts[0])
    assert tid(0) not in d.entries and d.entries[tid(1)].state == "queued"


def test_handed_off_results_wait_while_the_sink_is_down() -> None:
    d = Dispatcher(S)
    d.load([task(0)], 0.0, complete=True)
    d.on_heartbeat(hb("w", 0.0), 0.0)
    d.next_task("light", 0.0)
    d.on_claim(Claim(worker="w", task_id=tid(0), attempt=1, ts=0.0), 0.0)
    for t in range(1, 30):
        d.on_heartbeat(hb("w", t, seq=t), float(t))
        assert d.tick(float(t)) == []  # no sink heard: the result waits in w's queue
    acts: list[Any] = []
    t = 30
    while not acts and t < 45:
        sink_seen(d, t)
        d.on_heartbeat(hb("w", t, seq=t), float(t))
        acts = d.tick(float(t))
        t += 1
    assert t - 1 <= 30 + 2 * S.liveness_s  # within one grace of the sink's return
    assert whats(acts) == ["task_retried"] and "never reached the sink" in detail(acts[0])


def test_unclaimed_tasks_of_a_lost_worker_are_suspected_then_redispatched(
        d: Dispatcher) -> None:
    d.load([task(0)], 0.0, complete=True)
    d.on_heartbeat(hb("w1", 0.0), 0.0)
    d.next_task("light", 0.0)  # sits unread in some worker's buffer, no claim yet
    acts = d.tick(5.5)
    assert whats(acts) == ["worker_lost"]
    acts = d.tick(5.5 + S.liveness_s + 0.1)
    assert whats(acts) == ["task_retried"] and "not claimed" in detail(acts[0])


def test_a_restarted_worker_under_the_same_id_loses_its_old_tasks(d: Dispatcher) -> None:
    d.load([task(0)], 0.0, complete=True)
    d.on_heartbeat(hb("w", 0.0, pid=1), 0.0)
    d.next_task("light", 0.0)
    d.on_claim(Claim(worker="w", task_id=tid(0), attempt=1, ts=0.0), 0.0)
    acts = d.on_heartbeat(hb("w", 1.0, pid=2), 1.0)
    assert whats(acts) == ["worker_joined", "task_retried"]


def test_lost_worker_stays_listed_then_returns_or_is_forgotten(d: Dispatcher) -> None:
    d.on_heartbeat(hb("w", 0.0), 0.0)
    d.on_heartbeat(hb("v", 0.0), 0.0)
    assert whats(d.tick(6.0)) == ["worker_lost", "worker_lost"]
    assert whats(d.on_heartbeat(hb("v", 7.0, seq=2), 7.0)) == ["worker_returned"]
    d.on_heartbeat(hb("v", 60.0, seq=3), 60.0)
    d.tick(60.0)
    assert {w["id"]: w["state"] for w in d.registry.listing(60.0)} == {"v": "idle", "w": "lost"}
    d.tick(66.5)
    assert [w["id"] for w in d.registry.listing(66.5)] == ["v"]


def test_listing_carries_what_a_worker_says_about_its_shared_memory(d: Dispatcher) -> None:
    note = "slots lowered from 2 to 1: /dev/shm has 64 MB free ..."
    d.on_heartbeat(Heartbeat(worker="w", host="h", pid=1, seq=1, ts=0.0, slots=1, free=1,
                             shm_bytes=25 << 20, note=note), 0.0)
    d.on_heartbeat(hb("old", 0.0), 0.0)  # a peer that predates the fields
    rows = {w["id"]: w for w in d.registry.listing(0.5)}
    assert (rows["w"]["slots"], rows["w"]["shm_bytes"], rows["w"]["note"]) == (1, 25 << 20, note)
    assert (rows["old"]["shm_bytes"], rows["old"]["note"]) == (0, "")


def test_put_back_keeps_the_attempt_and_the_place(d: Dispatcher) -> None:
    d.load([task(0), task(1)], 0.0, complete=True)
    d.on_heartbeat(hb("w", 0.0), 0.0)
    e = d.next_task("light", 0.0)
    assert e is not None
    d.put_back(e.task.task_id)
    again = d.next_task("light", 0.1)
    assert again is not None and again.task.n == 0 and again.attempt == 1
    assert d.counters["dispatched"] == 1


def test_stats_and_metric_shapes(d: Dispatcher) -> None:
    d.load([task(0), task(1, "heavy")], 0.0, complete=True)
    d.on_heartbeat(hb("w", 0.0), 0.0)
    sink_seen(d, 0.5)
    s = d.stats(1.0)
    assert set(s) >= {"queue_depth", "queued", "inflight", "dispatched", "retries",
                      "lost_tasks", "failed_tasks", "workers", "components", "uptime_s"}
    assert s["queue_depth"] == 2 and s["workers"] == {"alive": 1, "busy": 0, "idle": 1,
                                                      "lost": 0}
    assert s["components"] == {"sink": 0.5, "worker": 1.0}
    m = d.metric_values(1.0)
    assert m["queued_light"] == 1 and m["queued_heavy"] == 1 and m["workers_alive"] == 1
    assert all(isinstance(v, int | float) for v in m.values())


def test_tasks_parked_behind_a_busy_worker_are_copied_to_an_idle_one(d: Dispatcher) -> None:
    d.load([task(0), task(1)], 0.0, complete=True)
    busy = Heartbeat(worker="slow", host="h", pid=1, seq=1, ts=0.0, slots=2, free=0)
    d.on_heartbeat(busy, 0.0)
    d.on_heartbeat(hb("fast", 0.0), 0.0)
    parked = d.next_task("light", 0.0)
    assert parked is not None and parked.attempt == 1
    assert d.tick(1.5) == []  # too early, and the queue still has task 1
    d.next_task("light", 1.5)
    d.on_claim(Claim(worker="fast", task_id=tid(1), attempt=1, ts=1.6), 1.6)
    d.on_done(Done(task_id=tid(1), job_id=JOB, n=1, state="done", attempt=1), 1.7)
    d.on_heartbeat(hb("fast", 2.5, seq=2), 2.5)  # idle a beat after task 0 went out
    d.on_heartbeat(Heartbeat(worker="slow", host="h", pid=1, seq=2, ts=2.5, slots=2, free=0,
                             inflight=["x", "y"]), 2.5)
    acts = d.tick(2.6)
    assert whats(acts) == ["task_retried"] and "copy" in detail(acts[0])
    copy = d.next_task("light", 2.7)
    assert copy is not None and copy.task.n == 0 and copy.attempt == 2
    assert d.counters["stolen"] == 1 and d.counters["lost_tasks"] == 0
    # The last attempt is never copied: stealing cannot fail an output.
    d.on_done(Done(task_id=tid(0), job_id=JOB, n=0, state="retry", attempt=2), 2.8)
    last = d.next_task("light", 2.9)
    assert last is not None and last.attempt == 3
    d.on_heartbeat(hb("fast", 5.0, seq=3), 5.0)
    d.on_heartbeat(Heartbeat(worker="slow", host="h", pid=1, seq=3, ts=5.0, slots=2, free=0),
                   5.0)
    assert d.tick(5.1) == []


def test_recent_events_are_kept_for_late_listeners(d: Dispatcher) -> None:
    d.load([task(0)], 0.0, complete=True)
    d.on_heartbeat(hb("w1", 0.0), 0.0)
    e = d.next_task("light", 0.1)
    assert e is not None
    d.on_claim(Claim(worker="w1", task_id=e.task.task_id, attempt=1, ts=0.2), 0.2)
    for t in range(1, 7):
        d.tick(float(t))
    assert [ev.what for ev in d.recent_events] == ["worker_joined", "worker_lost",
                                                   "task_retried"]
    assert d.counters["workers_lost"] == 1


def test_a_live_worker_id_answers_only_for_its_own_key(d: Dispatcher) -> None:
    d.on_heartbeat(hb("w1", 0.0), 0.0, peer="key-a")
    assert d.on_heartbeat(hb("w1", 0.5, pid=999), 0.5, peer="key-b") == []
    assert d.registry.refused == 1
    assert d.registry.listing(0.6)[0]["pid"] == 100
    d.on_heartbeat(hb("w1", 1.0, seq=2), 1.0, peer="key-a")  # the real one goes on
    assert d.registry.refused == 1


def test_a_notice_queues_its_job_and_leaves_the_rescan_where_it_was(d: Dispatcher) -> None:
    from imgpipe.ventilator.dispatcher import NOTICED_MAX

    d.load([], 0.0, complete=True)
    assert not d.wants_rescan(0.5) and d.next_rescan == 1.0
    d.on_notice(JOB, 0.5)
    assert d.take_noticed() == [JOB] and d.take_noticed() == []
    d.load([task(0)], 0.5, complete=False, scan=False)
    assert d.next_rescan == 1.0 and list(d.entries) == [tid(0)]
    d.on_heartbeat(hb("w1", 0.5), 0.5)
    e = d.next_task("light", 0.5)
    assert e is not None and e.task.task_id == tid(0)
    # A flood of notices: past the cap, one full rescan instead of reads by id.
    for i in range(NOTICED_MAX + 5):
        d.on_notice(f"{i:08d}-0000-4000-8000-000000000000", 0.6)
    assert len(d.noticed) == NOTICED_MAX and d.wants_rescan(0.6)
    d.load([], 0.6, complete=True)
    assert d.noticed == set() and not d.wants_rescan(0.6)
