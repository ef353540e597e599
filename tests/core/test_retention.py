"""The data dir's lifecycle on a real store: TTL, byte budget, leftovers, result cache,
and counters whose cost does not grow with history."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from imgpipe.core import retention
from imgpipe.core.blobs import DirBlobs
from imgpipe.core.records import Gone, NotFound, Original, new_job_id, task_id
from imgpipe.core.store import Store
from tests.support import make_settings, original_bytes, output_bytes

PNG = b"\x89PNG fake bytes of an output"


def job(store: Store, *, sha: str = "", chains: int = 2, now: float = 1000.0,
        cache: bool = True, original: bytes = b"\xff\xd8orig") -> str:
    j = new_job_id()
    store.save_original(j, 0, "jpeg", original)
    store.create_job(j, [Original("jpeg", 8, 6, len(original), sha)],
                     [(f"resize:w={c + 1}", "light") for c in range(chains)], now=now,
                     cache=cache)
    return j


def finish(store: Store, j: str, *, now: float, data: bytes = PNG) -> None:
    for out in store.job(j).outputs:
        if out.state != "done":
            store.complete(out.task_id, data, worker="w", attempt=1, width=2, height=3,
                           content_type="image/png", fmt="png", timings={}, now=now)


def test_finished_jobs_expire_after_the_ttl_and_then_answer_gone(
        tmp_path: Path, store: Store) -> None:
    settings = make_settings(tmp_path, job_ttl_s=60.0)
    old, young, running = job(store), job(store), job(store)
    finish(store, old, now=1000.0)
    finish(store, young, now=1050.0)
    assert output_bytes(store, old, 0) == PNG and original_bytes(store, old, 0) is not None
    swept = retention.sweep(store, settings, now=1070.0)
    assert (swept.expired, swept.evicted) == (1, 0)
    assert swept.freed == len(b"\xff\xd8orig") + 2 * len(PNG)
    with pytest.raises(Gone):
        store.job(old)
    with pytest.raises(Gone):
        store.output(old, 0)
    with pytest.raises(NotFound):  # never existed: still 404, not 410
        store.job(new_job_id())
    assert output_bytes(store, old, 0) is None and original_bytes(store, old, 0) is None
    assert output_bytes(store, young, 0) == PNG
    assert store.job(young).state == "done" and store.job(running).state == "queued"
    assert store.totals().jobs_expired == 1
    assert retention.sweep(store, make_settings(tmp_path, job_ttl_s=0.0), now=1e9).expired == 0


def test_the_byte_budget_evicts_the_oldest_finished_first(tmp_path: Path, store: Store) -> None:
    per_job = len(b"\xff\xd8orig") + 2 * len(PNG)
    jobs = [job(store) for _ in range(4)]
    for i, j in enumerate(jobs[:3]):
        finish(store, j, now=1000.0 + i)  # finished in order 0, 1, 2; job 3 stays open
    open_bytes = len(b"\xff\xd8orig")
    settings = make_settings(tmp_path, job_ttl_s=0.0,
                             max_data_bytes=per_job + open_bytes + 1)
    assert store.totals().bytes == 3 * per_job + open_bytes
    swept = retention.sweep(store, settings, now=2000.0)
    assert swept.evicted == 2
    with pytest.raises(Gone):
        store.job(jobs[0])
    with pytest.raises(Gone):
        store.job(jobs[1])
    assert store.job(jobs[2]).state == "done"
    assert store.totals().bytes == per_job + open_bytes
    # Only an open job left over the cap: nothing more to evict, the gateway refuses.
    retention.sweep(store, dataclasses.replace(settings, max_data_bytes=1), now=2001.0)
    assert retention.over_budget(store, dataclasses.replace(settings, max_data_bytes=1))
    assert store.job(jobs[3]).state == "queued"


def test_crash_leftovers_are_swept_once_old(store: Store) -> None:
    kept = job(store)
    fd, staged = store.stage_upload()              # an upload cut off mid-body
    os.close(fd)
    orphan = new_job_id()                          # originals moved, row never written
    store.save_original(orphan, 0, "jpeg", b"x")
    partial = None
    if isinstance(store._blobs, DirBlobs):         # (an object is never half-written)
        partial = store._blobs.output_path(kept, 0, "png").parent / ".tmp-half"
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(b"half")               # a writer killed mid-file
    assert store.sweep_leftovers(older_than=time.time() - 600) == 0  # all young: kept
    assert store.sweep_leftovers(older_than=time.time() + 1) == 2 + (partial is not None)
    assert not staged.exists() and original_bytes(store, orphan, 0) is None
    assert partial is None or not partial.exists()
    assert original_bytes(store, kept, 0) == b"\xff\xd8orig"


def test_a_repeat_is_served_from_the_cache_and_cache_0_bypasses_it(store: Store) -> None:
    first = job(store, sha="abc")
    finish(store, first, now=1000.0, data=b"one")
    again = store.job(job(store, sha="abc", now=1001.0))
    assert again.state == "done" and again.finished == 1001.0
    assert [o.cached for o in again.outputs] == [True, True]
    for out in again.outputs:
        with store.open_output(out) as a, store.open_output(store.output(first, out.n)) as b:
            assert a.read() == b.read() == b"one"
        assert (out.width, out.height, out.nbytes, out.content_type) == (2, 3, 3, "image/png")
    bypass = store.job(job(store, sha="abc", cache=False))
    assert [o.state for o in bypass.outputs] == ["queued", "queued"]
    finish(store, bypass.id, now=1002.0, data=b"two")  # a bypass fills no entry either
    third = store.job(job(store, sha="abc", now=1003.0)).outputs[0]
    with store.open_output(third) as fh:
        assert third.cached and fh.read() == b"one"
    other = store.job(job(store, sha="def"))
    assert [o.cached for o in other.outputs] == [False, False]
    t = store.totals()
    assert (t.cache_hits, t.cache_misses) == (4, 2 + 2)  # the bypass is no lookup
    # The first job expires: the repeat keeps its file, and now holds the cache entry.
    store.drop_jobs([first], now=1100.0)
    with store.open_output(again.outputs[0]) as a:
        assert a.read() == b"one"
    assert store.job(job(store, sha="abc")).outputs[0].cached is True
    store.drop_jobs([again.id], now=1100.0)
    assert store.job(job(store, sha="abc")).outputs[0].cached is True  # the newest holds it


def test_a_cached_output_carries_the_gravity_note_of_the_one_it_copies(store: Store) -> None:
    first = job(store, sha="abc", chains=3)
    for n, gravity in enumerate(("smart", "center", None)):
        store.complete(task_id(first, n), PNG, worker="w", attempt=1, width=2, height=3,
                       content_type="image/png", fmt="png", timings={}, gravity=gravity)
    again = store.job(job(store, sha="abc", chains=3))
    assert [(o.cached, o.gravity) for o in again.outputs] == [
        (True, "smart"), (True, "center"), (True, None)]


def test_an_old_database_gains_the_gravity_column(tmp_path: Path) -> None:
    store = Store(tmp_path)
    j = job(store, chains=1)
    store.close()
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    # as a store of schema version 2, before the column
    db.execute("ALTER TABLE outputs DROP COLUMN gravity")
    db.execute("DELETE FROM schema_version WHERE version >= 3")
    db.commit()
    db.close()
    store = Store(tmp_path)
    try:
        assert store.job(j).outputs[0].gravity is None
        store.complete(task_id(j, 0), PNG, worker="w", attempt=1, width=2, height=3,
                       content_type="image/png", fmt="png", timings={}, gravity="center")
        assert store.job(j).outputs[0].gravity == "center"
    finally:
        store.close()


def test_failed_outputs_are_never_reused(store: Store) -> None:
    first = job(store, sha="abc", chains=1)
    store.fail(task_id(first, 0), "corrupt image")
    assert store.job(job(store, sha="abc", chains=1)).outputs[0].state == "queued"


def _steps(db_path: Path, statements: list[str]) -> int:
    """SQLite virtual-machine steps the statements take: the same on any machine, any load."""
    db = sqlite3.connect(db_path)
    count = 0

    def tick() -> int:
        nonlocal count
        count += 1
        return 0

    db.set_progress_handler(tick, 1)
    for sql in statements:
        db.execute(sql).fetchall()
    db.close()
    return count


def _add_history(db_path: Path, rows: int) -> None:
    """``rows`` more finished outputs, finished long ago."""
    db = sqlite3.connect(db_path)
    base = db.execute("SELECT COUNT(*) FROM outputs").fetchone()[0]
    db.executemany(
        "INSERT INTO outputs (task_id, job_id, n, image, ops, cost, state, attempts,"
        " queued_at, finished_at, bytes) VALUES (?, 'j', ?, 0, 'x', 'light', 'done', 2,"
        " 1.0, 2.0, 10)", ((f"j:{i}", i) for i in range(base, base + rows)))
    db.commit()
    db.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_metrics_cost_the_same_at_a_million_outputs(tmp_path: Path) -> None:
    """Every statement the store runs for /api/metrics and /metrics, counted in VM steps
    with a thousand and with a million rows of finished history: the same work (SQLite;
    on PostgreSQL the same statements use the same indexes)."""
    store = Store(tmp_path)
    statements: list[str] = []
    db = store._sql.raw()  # type: ignore[attr-defined]  # SQLite: its connection
    db.set_trace_callback(statements.append)  # the SQL as run, values bound
    store.counts()
    store.totals()
    store.done_since(30.0)
    store.recent_outputs(60.0)
    db.set_trace_callback(None)
    store.close()
    assert len(statements) == 4, statements
    path = tmp_path / "jobs.sqlite3"
    _add_history(path, 1000)
    small = _steps(path, statements)
    _add_history(path, 1_000_000)
    large = _steps(path, statements)
    assert large <= small * 1.05 + 50, (small, large, statements)


def test_metrics_use_the_same_indexes_on_postgres(tmp_path: Path, pg_server: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The statements above, as the store runs them on PostgreSQL, planned over 200,000
    rows of finished history: every read of ``outputs`` goes through an index."""
    import psycopg

    from imgpipe.core import sql

    url = pg_server.new_database()
    store = Store(tmp_path, url)
    ran: list[tuple[str, tuple[Any, ...]]] = []
    real = sql._PgDb.execute

    def record(self: Any, text: str, params: Any = (), /) -> Any:
        ran.append((text, tuple(params)))
        return real(self, text, params)

    monkeypatch.setattr(sql._PgDb, "execute", record)
    store.counts()
    store.totals()
    store.done_since(30.0)
    store.recent_outputs(60.0)
    store.open_tasks()
    monkeypatch.undo()
    store.close()
    assert len(ran) == 5, ran
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("INSERT INTO outputs (task_id, job_id, n, image, ops, cost, state,"
                   " attempts, queued_at, finished_at, bytes) SELECT 'j:' || i, 'j', i, 0,"
                   " 'x', 'light', 'done', 2, 1.0, 2.0, 10 FROM generate_series(1, 200000) i")
        db.execute("ANALYZE")
        for text, params in ran:
            plan = "\n".join(r[0] for r in db.execute("EXPLAIN " + sql.pg_sql(text), params))
            if "outputs" in text:
                assert "Seq Scan on outputs" not in plan and "Index" in plan, (text, plan)
