"""The job store's versioned schema on both backends: what a new database gets, many
processes starting at once, a database newer than the code, a store across a fork."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from imgpipe.core import schema
from imgpipe.core.errors import ConfigError
from imgpipe.core.records import Original, Totals, new_job_id
from imgpipe.core.store import Store

INDEXES = {"outputs_job", "outputs_open", "outputs_finished", "jobs_created", "jobs_finished",
           "cache_job", "expired_at", "jobs_owner"}
TABLES = {"jobs", "images", "outputs", "counters", "expired", "cache", "leases",
          "schema_version"}


def catalog(store: Store) -> tuple[set[str], set[str]]:
    """(tables, indexes made by name) of the store's database."""
    with store._sql.connection() as db:
        if store.backend == "sqlite":
            rows = db.execute("SELECT type, name FROM sqlite_master"
                              " WHERE sql IS NOT NULL").fetchall()
            return ({r["name"] for r in rows if r["type"] == "table"},
                    {r["name"] for r in rows if r["type"] == "index"})
        tables = db.execute("SELECT tablename AS name FROM pg_tables"
                            " WHERE schemaname = current_schema()").fetchall()
        indexes = db.execute("SELECT indexname AS name FROM pg_indexes"
                             " WHERE schemaname = current_schema()").fetchall()
        return ({r["name"] for r in tables},
                {r["name"] for r in indexes if not r["name"].endswith("_pkey")})


def versions(store: Store) -> list[int]:
    with store._sql.connection() as db:
        return [r["version"] for r in
                db.execute("SELECT version FROM schema_version ORDER BY version")]


def test_a_new_database_gets_every_table_and_the_same_indexes_on_both(store: Store) -> None:
    tables, indexes = catalog(store)
    assert tables == TABLES
    assert indexes == INDEXES
    assert versions(store) == list(range(1, schema.LATEST + 1))
    assert store.totals().jobs == 0  # the counters exist, at zero


def test_stores_starting_at_once_migrate_the_database_once(tmp_path: Path,
                                                           store_url: str) -> None:
    """Six stores (as the gateway's workers, the ventilator and the sink) open one new
    database at the same moment: each starts, the migrations ran once."""
    start = threading.Barrier(6)
    opened: list[Store] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        start.wait(10)
        try:
            opened.append(Store(tmp_path, store_url))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors and len(opened) == 6
        assert versions(opened[0]) == list(range(1, schema.LATEST + 1))
        assert opened[0].totals() == Totals()  # counted once, at zero
        with opened[0]._sql.connection() as db:
            assert db.execute("SELECT COUNT(*) AS c FROM counters").fetchone()["c"] == len(
                schema.COUNTERS)
    finally:
        for s in opened:
            s.close()


def test_a_database_newer_than_this_code_is_refused(tmp_path: Path, store: Store,
                                                    store_url: str) -> None:
    with store._sql.connection() as db:
        db.execute("INSERT INTO schema_version (version, applied) VALUES (?, 0)",
                   (schema.LATEST + 1,))
    with pytest.raises(ConfigError, match="newer than this imgpipe"):
        Store(tmp_path, store_url)


def test_a_forked_child_gets_its_own_connections(store: Store) -> None:
    """The parent uses its store, forks (as gunicorn does), the child uses the same
    object, exits; the parent's connections still work."""
    job = new_job_id()
    store.create_job(job, [Original("jpeg", 1, 1, 1)], [("invert", "light")])
    assert store.job_state(job) == "queued"
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            ok = store.job_state(job) == "queued" and store.mark_dispatched(f"{job}:0", 1)
            code = 0 if ok else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.job_state(job) == "running"  # the child's write, on the parent's connection
    assert store.totals().jobs == 1


def test_a_postgres_store_holds_at_most_its_pool_size_of_connections(
        tmp_path: Path, pg_server: Any) -> None:
    """Eight threads reading at once through a store whose pool has 2 connections: the
    server sees at most 2 sessions of that database, and every read succeeds."""
    import psycopg

    url = pg_server.new_database()
    store = Store(tmp_path, url, pool_size=2)
    job = new_job_id()
    store.create_job(job, [Original("jpeg", 1, 1, 1)], [("invert", "light")])
    name = url.split("/")[3].split("?")[0]
    start = threading.Barrier(8)
    seen: list[int] = []
    errors: list[BaseException] = []

    def read() -> None:
        start.wait(10)
        try:
            for _ in range(20):
                store.job(job)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(8)]
    for t in threads:
        t.start()
    with psycopg.connect(pg_server.url(), autocommit=True) as admin:
        while any(t.is_alive() for t in threads):
            seen.append(admin.execute("SELECT COUNT(*) FROM pg_stat_activity"
                                      " WHERE datname = %s", (name,)).fetchone()[0])
            threads[0].join(0.01)
    for t in threads:
        t.join(30)
    store.close()
    assert not errors and seen and max(seen) <= 2, (errors, seen)
