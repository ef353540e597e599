from __future__ import annotations

import threading
from pathlib import Path

import pytest

from imgpipe.core.records import (
    Counts,
    NotFound,
    Original,
    check_id,
    new_job_id,
    split_task_id,
    task_id,
)
from imgpipe.core.store import Store


def make_job(store: Store, images: int = 2, chains: int = 3) -> str:
    job = new_job_id()
    for i in range(images):
        store.save_original(job, i, "jpeg", b"\xff\xd8img%d" % i)
    store.create_job(job, [Original("jpeg", 10, 8, 6)] * images,
                     [(f"resize:w={c + 1}", "light") for c in range(chains)])
    return job


def test_job_outputs_are_image_major(store: Store) -> None:
    job = make_job(store)
    rec = store.job(job)
    assert rec.state == "queued" and rec.finished is None
    assert (rec.done, rec.failed, rec.total) == (0, 0, 6)
    assert [(o.n, o.image, o.ops, o.task_id) for o in rec.outputs] == [
        (0, 0, "resize:w=1", f"{job}:0"), (1, 0, "resize:w=2", f"{job}:1"),
        (2, 0, "resize:w=3", f"{job}:2"), (3, 1, "resize:w=1", f"{job}:3"),
        (4, 1, "resize:w=2", f"{job}:4"), (5, 1, "resize:w=3", f"{job}:5")]
    assert set(rec.outputs[0].timings_ms) == {"queue", "decode", "filters", "encode", "total"}
    assert store.read_original(job, 1) == b"\xff\xd8img1"
    assert store.recent_jobs(5) == [rec]


def test_first_completion_wins_and_job_state_follows(store: Store) -> None:
    job = make_job(store, images=1, chains=2)
    t0, t1 = task_id(job, 0), task_id(job, 1)
    assert store.mark_dispatched(t0, 1)
    assert store.job_state(job) == "running"
    meta = dict(worker="w1", attempt=1, width=1, height=1, content_type="image/png",
                fmt="png", timings={"total": 5.0, "bogus": 1.0})
    assert store.complete(t0, b"png", **meta) == "running"  # type: ignore[arg-type]
    assert store.complete(t0, b"png2", **{**meta, "worker": "w2"}) is None  # type: ignore[arg-type]
    assert store.fail(t0, "late") is None
    assert not store.mark_dispatched(t0, 2)  # final outputs are never dispatched again
    assert store.fail(t1, "corrupt image", attempt=1) == "partial"
    rec = store.job(job)
    first = rec.outputs[0]
    assert (first.worker, first.nbytes, first.timings_ms["total"]) == ("w1", 3, 5)
    assert rec.outputs[1].error == "corrupt image"
    assert rec.finished is not None and rec.failed == 1
    with store.open_output(first) as fh:
        assert fh.read() == b"png2"  # the duplicate's file write is harmless: same output


def test_job_states_done_and_failed(store: Store) -> None:
    ok, bad = make_job(store, 1, 1), make_job(store, 1, 1)
    store.complete(task_id(ok, 0), b"x", worker="w", attempt=1, width=1, height=1,
                   content_type="image/png", fmt="png", timings={})
    store.fail(task_id(bad, 0), "lost on 3 attempts")
    assert store.job_state(ok) == "done" and store.job_state(bad) == "failed"


def test_open_tasks_and_counts(store: Store) -> None:
    job = make_job(store, images=1, chains=3)
    store.mark_dispatched(task_id(job, 1), 1)
    store.fail(task_id(job, 2), "x")
    assert store.counts() == Counts(queued=1, running=1)
    assert store.open_count() == 2
    assert [t.n for t in store.open_tasks()] == [0, 1]
    assert [t.n for t in store.open_tasks(states=("running",))] == [1]
    assert store.open_tasks(states=("running",))[0].attempts == 1


def test_open_tasks_of_reads_only_the_named_jobs(store: Store) -> None:
    a, b, c = make_job(store, 1, 2), make_job(store, 1, 2), make_job(store, 1, 1)
    store.mark_dispatched(task_id(a, 1), 1)
    store.fail(task_id(b, 0), "x")
    got = store.open_tasks_of([a, b])
    assert [(t.job_id, t.n, t.state) for t in got] == [
        (a, 0, "queued"), (a, 1, "running"), (b, 1, "queued")]
    assert store.open_tasks_of([]) == [] and [t.job_id for t in store.open_tasks_of([c])] == [c]


@pytest.mark.parametrize("bad", ["../etc", "%2e%2e", "", "0" * 36, new_job_id().upper(),
                                 new_job_id() + "/x", None, 5])
def test_hostile_ids_never_reach_the_filesystem(store: Store, bad: object) -> None:
    with pytest.raises(NotFound):
        check_id(bad)  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        store.job(bad)  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        store.read_original(bad, 0)  # type: ignore[arg-type]


def test_unknown_job_and_task_ids(store: Store) -> None:
    with pytest.raises(NotFound):
        store.job(new_job_id())
    with pytest.raises(NotFound):
        split_task_id("abc:1")
    job = make_job(store, 1, 1)
    with pytest.raises(NotFound):
        store.output(job, 5)


def test_concurrent_writers_from_threads_and_a_second_store(tmp_path: Path, store: Store,
                                                            store_url: str) -> None:
    a, b = store, Store(tmp_path, store_url, blobs=store._blobs)
    jobs = [make_job(a, 1, 4) for _ in range(5)]
    errors: list[BaseException] = []

    def finish(store: Store, n: int) -> None:
        try:
            for job in jobs:
                store.complete(task_id(job, n), b"x", worker=f"w{n}", attempt=1, width=1,
                               height=1, content_type="image/png", fmt="png", timings={})
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=finish, args=(s, n))
               for n, s in enumerate([a, b, a, b])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert all(a.job_state(j) == "done" for j in jobs)
    assert a.totals().done == 20
    b.close()


def test_many_completions_of_one_task_at_once_one_wins(tmp_path: Path, store: Store,
                                                       store_url: str) -> None:
    """Eight threads over two stores complete the same output at the same moment: one
    wins, seven are told it was final, the counters count it once."""
    other = Store(tmp_path, store_url)
    job = make_job(store, images=1, chains=1)
    tid = task_id(job, 0)
    start = threading.Barrier(8)
    won: list[str | None] = []

    def finish(s: Store, k: int) -> None:
        start.wait(10)
        won.append(s.complete(tid, b"x%d" % k, worker=f"w{k}", attempt=1, width=1, height=1,
                              content_type="image/png", fmt="png", timings={}))

    threads = [threading.Thread(target=finish, args=((store, other)[k % 2], k))
               for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    other.close()
    assert len(won) == 8 and won.count("done") == 1 and won.count(None) == 7, won
    rec = store.job(job)
    assert (rec.state, rec.done, rec.failed) == ("done", 1, 0)
    assert (store.totals().done, store.totals().outputs) == (1, 1)


def test_a_lease_has_one_holder_and_its_token_grows_with_each_tenure(store: Store) -> None:
    t0 = 1000.0
    first = store.acquire_lease("ventilator", "a", 10.0, now=t0)
    assert first is not None
    assert store.acquire_lease("ventilator", "b", 10.0, now=t0 + 1) is None  # a holds it
    assert store.lease_holder("ventilator", now=t0 + 1) == "a"
    # Renewing a live lease keeps its token (the same tenure) and moves its expiry.
    assert store.acquire_lease("ventilator", "a", 10.0, now=t0 + 5) == first
    assert store.acquire_lease("ventilator", "b", 10.0, now=t0 + 12) is None  # renewed
    # Expired: another holder takes it with a larger token; the old holder is out.
    second = store.acquire_lease("ventilator", "b", 10.0, now=t0 + 16)
    assert second == first + 1
    assert store.acquire_lease("ventilator", "a", 10.0, now=t0 + 17) is None
    assert store.lease_holder("ventilator", now=t0 + 17) == "b"
    # Released: nobody holds it; the next tenure, even of the same holder, is a new token.
    assert not store.release_lease("ventilator", "a")
    assert store.release_lease("ventilator", "b")
    assert store.lease_holder("ventilator", now=t0 + 18) is None
    assert store.acquire_lease("ventilator", "b", 10.0, now=t0 + 18) == second + 1
    # Leases are per name.
    assert store.acquire_lease("other", "a", 10.0, now=t0 + 18) == 1
    assert store.lease_holder("nobody") is None


def test_holders_racing_for_a_free_lease_one_gets_it(tmp_path: Path, store: Store,
                                                     store_url: str) -> None:
    stores = [store, Store(tmp_path, store_url)]
    start = threading.Barrier(6)
    got: dict[str, int | None] = {}

    def take(k: int) -> None:
        start.wait(10)
        got[f"h{k}"] = stores[k % 2].acquire_lease("fenced", f"h{k}", 30.0)

    threads = [threading.Thread(target=take, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    stores[1].close()
    winners = {h: tok for h, tok in got.items() if tok is not None}
    assert len(got) == 6 and len(winners) == 1, got
    assert store.lease_holder("fenced") == next(iter(winners))


def test_a_store_opened_while_another_process_writes_a_new_database_waits(
        tmp_path: Path) -> None:
    """SQLite refuses ``journal_mode=WAL`` at once, busy timeout or not, while another
    connection is mid-write on a database still in rollback mode (every component
    starting together on a fresh data dir): opening the store waits it out instead."""
    import sqlite3

    path = tmp_path / "jobs.sqlite3"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("CREATE TABLE early (x)")
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO early VALUES (1)")
    probe = sqlite3.connect(path, isolation_level=None, timeout=30)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        probe.execute("PRAGMA journal_mode=WAL")  # the refusal this guards against
    probe.close()
    opened: list[Store] = []
    errors: list[BaseException] = []

    def open_store() -> None:
        try:
            opened.append(Store(tmp_path))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=open_store)
    thread.start()
    thread.join(0.5)
    assert thread.is_alive() and not errors  # waiting for the writer, not failed
    other.execute("COMMIT")
    other.close()
    thread.join(30)
    assert not errors and len(opened) == 1
    assert opened[0].totals().jobs == 0
    opened[0].close()
