"""The job store's two databases behind one small interface: SQLite and PostgreSQL.

:class:`~imgpipe.core.store.Store` writes its SQL once, in the dialect both databases
speak (``?`` placeholders, ``INSERT … ON CONFLICT``, ``RETURNING``, partial indexes);
a backend here gives it connections and transactions and translates the little that
differs:

* placeholders: ``?`` for sqlite3, ``%s`` for psycopg (:func:`pg_sql`);
* column types in DDL: SQLite's ``REAL`` and ``INTEGER`` are PostgreSQL's ``DOUBLE
  PRECISION`` and ``BIGINT`` (a ``REAL`` there is 4 bytes: epoch seconds would lose
  their milliseconds) (:meth:`Backend.ddl`);
* a full disk: either database's error becomes
  :class:`~imgpipe.core.records.StorageFull` (the gateway's 507);
* transactions: SQLite's ``BEGIN IMMEDIATE`` (one writer at a time) and ``BEGIN
  DEFERRED`` (a snapshot for a multi-query read) are PostgreSQL's READ COMMITTED write
  transaction and a REPEATABLE READ, READ ONLY one. The store's writes stay correct
  under READ COMMITTED because each one that races is a single conditional statement
  (``UPDATE … WHERE state NOT IN ('done', 'failed')``: PostgreSQL re-checks the
  condition on the row a concurrent winner committed).

Rows come back as mappings (``row["name"]``) on both.

Connections: SQLite has one per thread; PostgreSQL a bounded psycopg pool per
process, opened on first use and made again in a forked child (gunicorn forks its
workers: a child never touches its parent's sockets).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from imgpipe.core.config import redact
from imgpipe.core.records import StorageFull

POSTGRES_SCHEMES = ("postgresql", "postgres")


class Db(Protocol):
    """What the store's queries run on: a connection, in or out of a transaction."""

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Any: ...

    def executemany(self, sql: str, params: Iterable[Sequence[Any]], /) -> Any: ...


class Backend(Protocol):
    name: str

    def connection(self) -> contextlib.AbstractContextManager[Db]:
        """A connection for single statements, each its own transaction."""

    def transaction(self, write: bool = True) -> contextlib.AbstractContextManager[Db]:
        """A transaction: committed when the block ends, rolled back if it raises."""

    def migration(self) -> contextlib.AbstractContextManager[Db]:
        """A write transaction that holds the schema lock (one migrator at a time)."""

    def columns(self, db: Db, table: str) -> set[str]: ...

    def ddl(self, sql: str) -> str: ...

    def close(self) -> None: ...


def is_postgres(url: str) -> bool:
    return urlsplit(url).scheme in POSTGRES_SCHEMES


def open_backend(data_dir: Path, url: str = "", *, pool_size: int = 8) -> Backend:
    """SQLite in ``data_dir`` when ``url`` is empty, else the PostgreSQL it names."""
    if not url:
        return Sqlite(data_dir / "jobs.sqlite3")
    if is_postgres(url):
        return Postgres(url, pool_size=pool_size)
    raise ValueError(f"unsupported store URL {redact(url)!r}: use postgresql://… or nothing")


# --- SQLite ---------------------------------------------------------------------------
BUSY_TIMEOUT_S = 30.0
WAL_RETRY_S = 0.02


def _set_wal(db: sqlite3.Connection, timeout_s: float = BUSY_TIMEOUT_S) -> None:
    """``PRAGMA journal_mode=WAL``, tried again while another process holds a lock.

    SQLite answers this pragma "database is locked" at once, without its busy handler,
    when another connection is mid-write on a new database (the busy wait could
    deadlock there): every component starting together on a fresh data dir raced on it,
    and the losers exited.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + WAL_RETRY_S > deadline:
                raise
        time.sleep(WAL_RETRY_S)


class Sqlite:
    """``jobs.sqlite3``: WAL, one connection per thread (made again after a fork)."""

    name = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()

    def raw(self) -> sqlite3.Connection:
        """This thread's connection (tests trace its statements)."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None or self._local.pid != os.getpid():
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            db.row_factory = sqlite3.Row
            _set_wal(db)
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
            self._local.db, self._local.pid = db, os.getpid()
        return db

    @contextlib.contextmanager
    def connection(self) -> Iterator[Db]:
        yield self.raw()

    @contextlib.contextmanager
    def transaction(self, write: bool = True) -> Iterator[Db]:
        db = self.raw()
        db.execute("BEGIN IMMEDIATE" if write else "BEGIN DEFERRED")
        try:
            yield db
        except BaseException as exc:
            db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
                raise StorageFull(f"the job store's disk is full ({exc}); retry later") from exc
            raise
        db.execute("COMMIT")

    def migration(self) -> contextlib.AbstractContextManager[Db]:
        return self.transaction(write=True)  # IMMEDIATE: the one writer is the migrator

    def columns(self, db: Db, table: str) -> set[str]:
        return {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}

    def ddl(self, sql: str) -> str:
        return sql

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None and self._local.pid == os.getpid():
            db.close()
        self._local.db = None


# --- PostgreSQL -----------------------------------------------------------------------
# pg_advisory_xact_lock key of the migrations: "imgpipe" as an integer.
SCHEMA_LOCK = int.from_bytes(b"imgpipe", "big")


@functools.lru_cache(maxsize=512)
def pg_sql(sql: str) -> str:
    """The store's ``?`` placeholders as psycopg's ``%s`` (the SQL has no other ``?``
    and no ``%``)."""
    return sql.replace("?", "%s")


_PG_TYPES = ((re.compile(r"\bREAL\b"), "DOUBLE PRECISION"), (re.compile(r"\bINTEGER\b"), "BIGINT"))


class _PgDb:
    """A psycopg connection that takes the store's SQL."""

    __slots__ = ("conn",)

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> Any:
        return self.conn.execute(pg_sql(sql), params)

    def executemany(self, sql: str, params: Iterable[Sequence[Any]], /) -> Any:
        cur = self.conn.cursor()
        cur.executemany(pg_sql(sql), list(params))
        return cur


class Postgres:
    """A PostgreSQL database through a psycopg pool of at most ``pool_size``
    connections, in autocommit mode (explicit transactions, as on SQLite)."""

    name = "postgres"

    def __init__(self, url: str, *, pool_size: int = 8) -> None:
        self.url = url
        self.pool_size = pool_size
        self._pool: Any = None
        self._pid = 0
        self._lock = threading.Lock()
        self._inherited: list[Any] = []  # a parent's pools, kept so they are never closed here

    def _get_pool(self) -> Any:
        pool = self._pool
        if pool is not None and self._pid == os.getpid():
            return pool
        with self._lock:
            if self._pool is not None and self._pid != os.getpid():
                # Forked: closing the parent's connections would end its sessions.
                self._inherited.append(self._pool)
                self._pool = None
            if self._pool is None:
                from psycopg.rows import dict_row
                from psycopg_pool import ConnectionPool

                self._pool = ConnectionPool(
                    self.url, min_size=1, max_size=self.pool_size, open=True, timeout=30,
                    kwargs={"autocommit": True, "row_factory": dict_row},
                    name=f"imgpipe-{os.getpid()}")
                self._pid = os.getpid()
            return self._pool

    @contextlib.contextmanager
    def connection(self) -> Iterator[Db]:
        with self._get_pool().connection() as conn:
            yield _PgDb(conn)

    @contextlib.contextmanager
    def transaction(self, write: bool = True) -> Iterator[Db]:
        import psycopg

        # BEGIN with its isolation level in one statement: a read costs BEGIN, its
        # queries and COMMIT, no extra round trip for SET TRANSACTION.
        with self._get_pool().connection() as conn:
            conn.execute("BEGIN" if write else
                         "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            try:
                yield _PgDb(conn)
            except BaseException as exc:
                with contextlib.suppress(psycopg.Error):  # a broken one leaves the pool
                    conn.execute("ROLLBACK")
                if isinstance(exc, psycopg.errors.DiskFull):
                    raise StorageFull(f"the job store's database is out of disk ({exc}); "
                                      "retry later") from exc
                raise
            conn.execute("COMMIT")

    @contextlib.contextmanager
    def migration(self) -> Iterator[Db]:
        """On a connection of its own, outside the pool: the store may be made in a
        process that forks later, and its pool must then be the child's."""
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(self.url, autocommit=True, row_factory=dict_row) as conn, \
                conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            yield _PgDb(conn)

    def columns(self, db: Db, table: str) -> set[str]:
        rows = db.execute("SELECT column_name FROM information_schema.columns"
                          " WHERE table_schema = current_schema() AND table_name = ?",
                          (table,)).fetchall()
        return {r["column_name"] for r in rows}

    def ddl(self, sql: str) -> str:
        for pattern, name in _PG_TYPES:
            sql = pattern.sub(name, sql)
        return sql

    def close(self) -> None:
        with self._lock:
            if self._pool is not None and self._pid == os.getpid():
                self._pool.close()
            self._pool = None
