"""The job store's schema, versioned, and the migrations that bring a database up to it.

``schema_version`` holds one row per migration applied (``version``, ``applied`` epoch
seconds); a database's version is the highest. :func:`migrate` runs at every start of
a store, in one transaction that holds the schema lock (SQLite: the write lock of
``BEGIN IMMEDIATE``; PostgreSQL: ``pg_advisory_xact_lock``), so the gateway's workers,
the ventilator and the sink may all start at once against one database: the first
applies what is missing, the others wait for it and then find nothing to do. A
database newer than this code is refused rather than used.

Migrations are append-only: a released one is never edited, a change is a new one.
DDL is written once, in SQLite's types; the PostgreSQL backend maps them
(:meth:`~imgpipe.core.sql.Backend.ddl`). Both databases get the same tables and the
same indexes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from imgpipe.core.errors import ConfigError
from imgpipe.core.sql import Backend, Db

log = logging.getLogger(__name__)

# The counters table's rows (running totals kept in the transactions that change them).
COUNTERS = ("jobs", "outputs", "done", "failed", "retries", "cache_hits", "cache_misses",
            "jobs_expired", "jobs_evicted", "bytes")

_TABLES = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    finished REAL,
    state TEXT NOT NULL,
    total INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    owner TEXT  -- sha256 of the API key that made it (or of the client address)
);
CREATE TABLE IF NOT EXISTS images (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    format TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (job_id, idx)
);
CREATE TABLE IF NOT EXISTS outputs (
    task_id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    n INTEGER NOT NULL,
    image INTEGER NOT NULL,
    ops TEXT NOT NULL,
    cost TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    width INTEGER,
    height INTEGER,
    bytes INTEGER,
    content_type TEXT,
    format TEXT,
    error TEXT,
    queued_at REAL NOT NULL,
    dispatched_at REAL,
    finished_at REAL,
    t_queue REAL, t_decode REAL, t_filters REAL, t_encode REAL, t_total REAL,
    cached INTEGER NOT NULL DEFAULT 0,
    cache_key TEXT
);
-- Running totals, changed in the transactions that change what they count.
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
-- Jobs that expired or were evicted: they answer 410, not 404 (kept TOMBSTONE_S).
CREATE TABLE IF NOT EXISTS expired (id TEXT PRIMARY KEY, at REAL NOT NULL, owner TEXT);
-- The result cache: (image sha256, canonical chain) -> a done output holding the file.
CREATE TABLE IF NOT EXISTS cache (key TEXT PRIMARY KEY, job_id TEXT NOT NULL,
                                  n INTEGER NOT NULL)
"""
# Columns added before the schema had versions: (table, column, declaration). A
# database of those days (SQLite only) gets them when it reaches version 1.
_ADDED_COLUMNS = (
    ("jobs", "bytes", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "owner", "TEXT"),
    ("expired", "owner", "TEXT"),
    ("images", "sha256", "TEXT NOT NULL DEFAULT ''"),
    ("outputs", "cached", "INTEGER NOT NULL DEFAULT 0"),
    ("outputs", "cache_key", "TEXT"),
)
_INDEXES = """
CREATE INDEX IF NOT EXISTS outputs_job ON outputs (job_id, n);
CREATE INDEX IF NOT EXISTS outputs_open ON outputs (state, queued_at)
    WHERE state IN ('queued', 'running');
CREATE INDEX IF NOT EXISTS outputs_finished ON outputs (finished_at);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished) WHERE finished IS NOT NULL;
CREATE INDEX IF NOT EXISTS cache_job ON cache (job_id);
CREATE INDEX IF NOT EXISTS expired_at ON expired (at);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, state)
"""
_LEASES = """
-- Named leases with fencing tokens (Store.acquire_lease): one row per name, kept on
-- release so that a name's token only ever grows.
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    token INTEGER NOT NULL,
    expires REAL NOT NULL
)
"""


def _statements(script: str) -> list[str]:
    lines = [ln for ln in script.splitlines() if not ln.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def _run(backend: Backend, db: Db, script: str) -> None:
    for stmt in _statements(script):
        db.execute(backend.ddl(stmt))


def _v1_jobs(backend: Backend, db: Db, count_bytes: Callable[[], int]) -> None:
    """Jobs, images, outputs, counters, tombstones and the result cache, with their
    indexes; a database from before versions gains its missing columns and has its
    counters counted once."""
    _run(backend, db, _TABLES)
    for table, column, decl in _ADDED_COLUMNS:
        if column not in backend.columns(db, table):
            db.execute(backend.ddl(f"ALTER TABLE {table} ADD COLUMN {column} {decl}"))
    _run(backend, db, _INDEXES)
    if db.execute("SELECT COUNT(*) AS c FROM counters").fetchone()["c"] == 0:
        t = db.execute("SELECT COUNT(*) AS jobs, COALESCE(SUM(total), 0) AS outputs,"
                       " COALESCE(SUM(done), 0) AS done, COALESCE(SUM(failed), 0) AS failed"
                       " FROM jobs").fetchone()
        retries = db.execute("SELECT COALESCE(SUM(attempts - 1), 0) AS r FROM outputs"
                             " WHERE attempts > 1").fetchone()["r"]
        found = {k: t[k] for k in ("jobs", "outputs", "done", "failed")}
        found.update(retries=retries, bytes=count_bytes())
        db.executemany("INSERT INTO counters (name, value) VALUES (?, ?)",
                       [(k, int(found.get(k, 0))) for k in COUNTERS])


def _v2_leases(backend: Backend, db: Db, count_bytes: Callable[[], int]) -> None:
    """Named leases with fencing tokens."""
    _run(backend, db, _LEASES)


def _v3_gravity(backend: Backend, db: Db, count_bytes: Callable[[], int]) -> None:
    """Each output's smart-gravity note (records.Output.gravity: 'smart', 'center' or
    NULL); a database from before versions may have it already."""
    if "gravity" not in backend.columns(db, "outputs"):
        db.execute(backend.ddl("ALTER TABLE outputs ADD COLUMN gravity TEXT"))


# version -> migration; append only.
MIGRATIONS: dict[int, Callable[[Backend, Db, Callable[[], int]], None]] = {
    1: _v1_jobs,
    2: _v2_leases,
    3: _v3_gravity,
}
LATEST = max(MIGRATIONS)


def migrate(backend: Backend, count_bytes: Callable[[], int]) -> tuple[int, int]:
    """Bring the database to :data:`LATEST`; (version found, version now).

    ``count_bytes`` tells the bytes on disk, for the counters of a database that has
    none yet. Raises ConfigError for a database made by a newer imgpipe.
    """
    with backend.migration() as db:
        db.execute(backend.ddl("CREATE TABLE IF NOT EXISTS schema_version"
                               " (version INTEGER PRIMARY KEY, applied REAL NOT NULL)"))
        found = int(db.execute("SELECT COALESCE(MAX(version), 0) AS v FROM schema_version")
                    .fetchone()["v"])
        if found > LATEST:
            raise ConfigError(f"the job store's schema is version {found}, newer than this "
                              f"imgpipe knows ({LATEST}): upgrade imgpipe, or point "
                              f"IMGPIPE_STORE_URL at another database", field="store_url")
        for version in range(found + 1, LATEST + 1):
            MIGRATIONS[version](backend, db, count_bytes)
            db.execute("INSERT INTO schema_version (version, applied) VALUES (?, ?)",
                       (version, time.time()))
    if found < LATEST:
        log.info("job store (%s): schema version %d -> %d", backend.name, found, LATEST)
    return found, LATEST
