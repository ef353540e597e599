"""The job store: jobs in SQL (SQLite or PostgreSQL), images in a
:class:`~imgpipe.core.blobs.Blobs` (files beside the database by default, or a
shared directory or an S3 bucket). Callers get the records of
:mod:`imgpipe.core.records`, never rows, paths or keys.

Two databases, one contract, the SQL written once (:mod:`imgpipe.core.sql` translates
the little that differs; :mod:`imgpipe.core.schema` versions the tables):

* **SQLite** (the default, ``jobs.sqlite3`` in the data dir): WAL lets readers run
  beside the one writer, ``busy_timeout`` makes writers queue instead of failing, and
  ``synchronous=NORMAL`` keeps a commit under a millisecond while staying durable
  across process crashes (only a power loss may drop the last commits). Connections
  are per thread.
* **PostgreSQL** (``IMGPIPE_STORE_URL=postgresql://…``): a bounded psycopg pool per
  process; writes run at READ COMMITTED, multi-query reads in a REPEATABLE READ
  snapshot.

Results are exactly-once because ``done`` and ``failed`` are final: the first
:meth:`Store.complete` or :meth:`Store.fail` wins and later ones report a duplicate.
The claim is one conditional ``UPDATE … WHERE state NOT IN ('done', 'failed')`` on
both databases (on PostgreSQL a concurrent loser waits for the winner's row, re-checks
the condition and updates nothing). Counters are bumped with ``value = value + ?``
in the winner's transaction, always in the order of their names (so two transactions
never wait on each other's counters), after every other row the transaction locks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from imgpipe.core import schema
from imgpipe.core.blobs import BlobFile, Blobs, DirBlobs, open_blobs, partial_grace
from imgpipe.core.config import Settings
from imgpipe.core.protocol import STAGES, GravityNote
from imgpipe.core.records import (
    FINAL,
    FINAL_JOB,
    Counts,
    Fenced,
    Finished,
    Gone,
    Job,
    Lease,
    NotFound,
    OpenTask,
    Original,
    Output,
    Totals,
    check_id,
    job_state,
    split_task_id,
    task_id,
)
from imgpipe.core.schema import COUNTERS
from imgpipe.core.sql import Db, open_backend

Row = Mapping[str, Any]

__all__ = ["Store", "NotFound", "Fenced"]

# The columns of an OpenTask, named as its fields.
OPEN_TASK_COLUMNS = ", ".join(f.name for f in dataclasses.fields(OpenTask))
TOMBSTONE_S = 86400.0  # how long an expired job answers 410 before it is unknown (a row each)


class Store:
    """The job store under ``data_dir``, its rows in SQLite there or in the PostgreSQL
    database ``url`` names, its images in ``blobs`` (by default files under
    ``data_dir``). Thread-safe."""

    def __init__(self, data_dir: Path | str, url: str = "", *, pool_size: int = 8,
                 blobs: Blobs | None = None) -> None:
        self.root = Path(data_dir)
        self._blobs = blobs if blobs is not None else DirBlobs(self.root)
        self._sql = open_backend(self.root, url, pool_size=pool_size)
        schema.migrate(self._sql, self._blobs.bytes_used)

    @classmethod
    def from_settings(cls, settings: Settings) -> Store:
        return cls(settings.data_dir, settings.store_url, pool_size=settings.store_pool_size,
                   blobs=open_blobs(settings))

    @property
    def backend(self) -> str:
        """``sqlite`` or ``postgres``."""
        return self._sql.name

    # --- connections ----------------------------------------------------------------
    def _db(self) -> contextlib.AbstractContextManager[Db]:
        """A connection for one statement (its own transaction)."""
        return self._sql.connection()

    def _tx(self, mode: str = "IMMEDIATE") -> contextlib.AbstractContextManager[Db]:
        """A transaction: IMMEDIATE to write, DEFERRED for a consistent read."""
        return self._sql.transaction(write=mode == "IMMEDIATE")

    def close(self) -> None:
        self._sql.close()

    # --- blobs --------------------------------------------------------------------------
    def save_original(self, job_id: str, idx: int, fmt: str, data: bytes | memoryview) -> None:
        self._blobs.put_original(job_id, idx, fmt, data)

    def stage_upload(self) -> tuple[int, Path]:
        """A new local temp file (fd, path) for an upload being received (for a
        directory blob store, on its filesystem, so :meth:`adopt_original` is a rename)."""
        return self._blobs.stage()

    def prepare_outputs(self, job_id: str) -> None:
        """Ready the blob store for the job's outputs (see :meth:`Blobs.prepare_outputs`)."""
        self._blobs.prepare_outputs(job_id)

    def adopt_original(self, job_id: str, idx: int, fmt: str, tmp: Path) -> None:
        """Put a staged upload in place as original ``idx`` of ``job_id`` (the staged
        file is gone after)."""
        self._blobs.adopt_original(job_id, idx, fmt, tmp)

    def discard_originals(self, job_id: str) -> None:
        """Remove the originals of a job that was never recorded."""
        self._blobs.remove_originals(job_id)

    def read_original(self, job_id: str, image: int) -> bytes:
        with self._db() as db:
            row = db.execute("SELECT format FROM images WHERE job_id=? AND idx=?",
                             (check_id(job_id), image)).fetchone()
        if row is None:
            raise NotFound(f"job {job_id} has no image {image}")
        return self._blobs.read_original(job_id, image, row["format"])

    def open_output(self, out: Output) -> BlobFile:
        """The bytes of a done output, open for streaming (``size`` known); NotFound
        when it has none."""
        fh = self._blobs.open_output(out.job_id, out.n, out.format or "bin")
        if fh is None:
            raise NotFound(f"output {out.n} of job {out.job_id} has no file", field="n")
        return fh

    def remove_partial_outputs(self) -> int:
        """Output files a killed writer left half-written (call from their writer, the
        sink, before it starts): those of a process of this host that is gone, and any
        older than a minute; never one another sink sharing the store is writing now.
        How many were removed."""
        return self._blobs.remove_partial_outputs(partial_grace())

    # --- jobs ---------------------------------------------------------------------------
    def create_job(self, job_id: str, images: Sequence[Original],
                   chains: Sequence[tuple[str, str]], *, now: float | None = None,
                   cache: bool = True, owner: str | None = None) -> None:
        """Record a job whose originals are already in place.

        ``chains`` is ``(canonical ops, cost class)`` per chain. Outputs are image-major.
        With ``cache``, an output whose image bytes and chain match a done output still
        on disk is done at once: its file is linked from that output's, no worker runs.
        Without it the job neither reads nor fills the cache: its outputs get no key.
        ``owner`` is an opaque hash the gateway checks reads against (never a key); the
        cache is per owner.
        """
        now = time.time() if now is None else now
        check_id(job_id)
        originals = sum(im.nbytes for im in images)
        with self._tx() as db:
            rows, hits = [], []
            for i, im in enumerate(images):
                for c, (ops, cost) in enumerate(chains):
                    n = i * len(chains) + c
                    # Per owner: one key's uploads never learn what another key asked for.
                    key = f"{owner or ''}:{im.sha256}:{ops}" if cache and im.sha256 else None
                    src = self._cached(db, key, job_id, n) if key else None
                    if src is not None:
                        hits.append((src, n, i, ops, cost))
                    else:
                        rows.append((task_id(job_id, n), job_id, n, i, ops, cost, now, key))
            cached_bytes = sum(src["bytes"] or 0 for src, *_ in hits)
            done = len(hits)
            total = done + len(rows)
            state = job_state(total, done, 0) if done else "queued"
            db.execute("INSERT INTO jobs (id, created, finished, state, total, done, bytes,"
                       " owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (job_id, now, now if state in FINAL_JOB else None, state, total, done,
                        originals + cached_bytes, owner))
            db.executemany("INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?)",
                           [(job_id, i, im.format, im.width, im.height, im.nbytes, im.sha256)
                            for i, im in enumerate(images)])
            db.executemany(
                "INSERT INTO outputs (task_id, job_id, n, image, ops, cost, state, queued_at,"
                " cache_key) VALUES (?, ?, ?, ?, ?, ?, 'queued', ?, ?)", rows)
            db.executemany(
                "INSERT INTO outputs (task_id, job_id, n, image, ops, cost, state, queued_at,"
                " finished_at, width, height, bytes, content_type, format, gravity, cached,"
                " t_queue, t_decode, t_filters, t_encode, t_total)"
                " VALUES (?, ?, ?, ?, ?, ?, 'done', ?, ?, ?, ?, ?, ?, ?, ?, 1, 0, 0, 0, 0, 0)",
                [(task_id(job_id, n), job_id, n, i, ops, cost, now, now, src["width"],
                  src["height"], src["bytes"], src["content_type"], src["format"],
                  src["gravity"])
                 for src, n, i, ops, cost in hits])
            looked = total if cache else 0
            _bump(db, jobs=1, outputs=total, done=done, bytes=originals + cached_bytes,
                  cache_hits=done, cache_misses=looked - done)

    def _cached(self, db: Db, key: str, job_id: str, n: int) -> Row | None:
        """The done output ``key`` names, its file linked as output ``n`` of ``job_id``;
        None on a miss (or when the file went missing: the entry is dropped). The entry
        then names the new copy, so an image asked for again and again stays cached
        while older jobs that held it expire."""
        src = db.execute("SELECT o.* FROM cache c JOIN outputs o ON o.job_id = c.job_id"
                         " AND o.n = c.n WHERE c.key = ? AND o.state = 'done'",
                         (key,)).fetchone()
        if src is None:
            return None
        try:
            self._blobs.link_output(src["job_id"], src["n"], job_id, n, src["format"])
        except FileNotFoundError:
            db.execute("DELETE FROM cache WHERE key = ?", (key,))
            return None
        db.execute("UPDATE cache SET job_id = ?, n = ? WHERE key = ?", (job_id, n, key))
        return src

    def job(self, job_id: str, *, owner: str | None = None) -> Job:
        """The job with its outputs, read in one snapshot; NotFound for an unknown id,
        Gone for an expired one. With ``owner`` (here and in the other reads), another
        owner's job is NotFound too."""
        with self._tx("DEFERRED") as db:
            row = db.execute("SELECT * FROM jobs WHERE id=?", (check_id(job_id),)).fetchone()
            if row is None or not _owns(row, owner):
                raise self._missing(db, job_id, owner, row)
            outs = db.execute("SELECT * FROM outputs WHERE job_id=? ORDER BY n",
                              (job_id,)).fetchall()
        return _job(row, tuple(map(_output, outs)))

    def output(self, job_id: str, n: int, *, owner: str | None = None) -> Output:
        self.job_state(job_id, owner=owner)  # NotFound or Gone for the job first
        with self._db() as db:
            row = db.execute("SELECT * FROM outputs WHERE job_id=? AND n=?",
                             (job_id, n)).fetchone()
        if row is None:
            raise NotFound(f"job {job_id} has no output {n}", field="n")
        return _output(row)

    def job_state(self, job_id: str, *, owner: str | None = None) -> str:
        with self._db() as db:
            row = db.execute("SELECT state, owner FROM jobs WHERE id=?",
                             (check_id(job_id),)).fetchone()
            if row is None or not _owns(row, owner):
                raise self._missing(db, job_id, owner, row)
        return str(row["state"])

    @staticmethod
    def _missing(db: Db, job_id: str, owner: str | None, row: Row | None) -> NotFound | Gone:
        """Gone for a job of ``owner`` that expired (while its tombstone lasts), else
        NotFound: an unknown id, or another owner's job, live or expired."""
        if row is None:
            gone = db.execute("SELECT owner FROM expired WHERE id=?", (job_id,)).fetchone()
            if gone is not None and _owns(gone, owner):
                return Gone(f"job {job_id} expired (finished jobs are kept IMGPIPE_JOB_TTL_S)",
                            field="id")
        return NotFound(f"no job {job_id}", field="id")

    def recent_jobs(self, limit: int = 20, *, owner: str | None = None) -> list[Job]:
        """The newest ``limit`` jobs (of ``owner`` if given) with their outputs, newest
        first, in two queries."""
        with self._tx("DEFERRED") as db:
            if owner is None:
                rows = db.execute("SELECT * FROM jobs ORDER BY created DESC LIMIT ?",
                                  (limit,)).fetchall()
            else:
                rows = db.execute("SELECT * FROM jobs WHERE owner=? ORDER BY created DESC"
                                  " LIMIT ?", (owner, limit)).fetchall()
            outputs: dict[str, list[Output]] = {r["id"]: [] for r in rows}
            if rows:
                marks = ",".join("?" * len(rows))
                for o in db.execute(f"SELECT * FROM outputs WHERE job_id IN ({marks})"
                                    f" ORDER BY job_id, n", tuple(outputs)):
                    outputs[o["job_id"]].append(_output(o))
        return [_job(r, tuple(outputs[r["id"]])) for r in rows]

    # --- the ventilator's side ------------------------------------------------------------
    def open_tasks(self, *, states: tuple[str, ...] = ("queued", "running"),
                   limit: int = 10_000) -> list[OpenTask]:
        """Outputs not yet final, oldest first (start-up recovery and periodic rescans)."""
        marks = ",".join("?" * len(states))
        # The literal condition is the partial index's own: with bound values alone
        # SQLite cannot prove the index covers them and scans every output ever stored.
        with self._db() as db:
            rows = db.execute(
                f"SELECT {OPEN_TASK_COLUMNS} FROM outputs"
                f" WHERE state IN ('queued', 'running') AND state IN ({marks})"
                f" ORDER BY queued_at, job_id, n LIMIT ?", (*states, limit)).fetchall()
        return [OpenTask(**r) for r in rows]

    def open_tasks_of(self, job_ids: Sequence[str]) -> list[OpenTask]:
        """The outputs of ``job_ids`` not yet final, oldest first: what a notice of
        those jobs adds, read by the job index instead of scanning every open output."""
        if not job_ids:
            return []
        marks = ",".join("?" * len(job_ids))
        with self._db() as db:
            rows = db.execute(
                f"SELECT {OPEN_TASK_COLUMNS} FROM outputs"
                f" WHERE job_id IN ({marks}) AND state IN ('queued', 'running')"
                f" ORDER BY queued_at, job_id, n", tuple(job_ids)).fetchall()
        return [OpenTask(**r) for r in rows]

    def mark_dispatched(self, tid: str, attempt: int, *, now: float | None = None,
                        fence: tuple[str, int] | None = None) -> bool:
        """Record dispatch number ``attempt``; False if the output is already final.

        With ``fence`` (a lease name and the caller's fencing token) the write happens
        only while that token is the lease's current one and the lease has not expired
        (at ``now``): a dispatcher that lost its lease — paused past its expiry, cut off
        — is refused with :class:`Fenced`, in the same statement, whatever its timers
        believe.
        """
        now = time.time() if now is None else now
        job_id, _ = split_task_id(tid)
        guard = ""
        args: tuple[Any, ...] = ()
        if fence is not None:
            guard = (" AND EXISTS (SELECT 1 FROM leases WHERE name = ? AND token = ?"
                     " AND expires > ?)")
            args = (fence[0], fence[1], now)
        with self._tx() as db:
            cur = db.execute(
                "UPDATE outputs SET state='running', attempts=?, dispatched_at=?"
                " WHERE task_id=? AND state NOT IN ('done', 'failed')" + guard,
                (attempt, now, tid, *args))
            if not cur.rowcount and fence is not None:
                held = db.execute("SELECT token, expires FROM leases WHERE name = ?",
                                  (fence[0],)).fetchone()
                if held is None or held["token"] != fence[1] or held["expires"] <= now:
                    raise Fenced(f"lease {fence[0]!r}: token {fence[1]} is no longer current"
                                 f" (now {None if held is None else held['token']})")
            if cur.rowcount:
                db.execute("UPDATE jobs SET state='running' WHERE id=? AND state='queued'",
                           (job_id,))
                if attempt > 1:
                    _bump(db, retries=1)
        return cur.rowcount > 0

    def is_final(self, tid: str) -> bool:
        with self._db() as db:
            row = db.execute("SELECT state FROM outputs WHERE task_id=?", (tid,)).fetchone()
        return row is None or row["state"] in FINAL

    # --- the sink's side ---------------------------------------------------------------------
    def complete(self, tid: str, data: bytes | memoryview, *, worker: str, attempt: int,
                 width: int, height: int, content_type: str, fmt: str,
                 timings: dict[str, float], now: float | None = None,
                 gravity: GravityNote | None = None) -> str | None:
        """Write the output's file, then mark it done: the job's new state, or None when
        the output was already final (a file written for an output that failed
        meanwhile is removed again). ``gravity`` is the output's smart-gravity note."""
        job_id, n = split_task_id(tid)
        self._blobs.write_output(job_id, n, fmt, data)
        state = self._finish(tid, "done", now=now, nbytes=len(data), worker=worker,
                             attempts=attempt, width=width, height=height, bytes=len(data),
                             content_type=content_type, format=fmt, error=None,
                             gravity=gravity, **_timing_fields(timings))
        if state is None and self.output(job_id, n).state == "failed":
            self._blobs.remove_output(job_id, n, fmt)
        return state

    def fail(self, tid: str, error: str, *, worker: str | None = None,
             attempt: int | None = None, timings: dict[str, float] | None = None,
             now: float | None = None) -> str | None:
        """Mark an output failed with ``error``; the job's new state, or None if already final."""
        fields: dict[str, Any] = {"error": error[:2000]}
        if worker is not None:
            fields["worker"] = worker
        if attempt is not None:
            fields["attempts"] = attempt
        fields.update(_timing_fields(timings or {}))
        return self._finish(tid, "failed", now=now, **fields)

    def _finish(self, tid: str, state: str, *, now: float | None, nbytes: int = 0,
                **fields: Any) -> str | None:
        now = time.time() if now is None else now
        job_id, n = split_task_id(tid)
        names = ", ".join(f"{k}=?" for k in fields)
        with self._tx() as db:
            cur = db.execute(
                f"UPDATE outputs SET state=?, finished_at=?, {names}"
                " WHERE task_id=? AND state NOT IN ('done', 'failed')"
                " RETURNING cache_key", (state, now, *fields.values(), tid))
            hit = cur.fetchone()
            if hit is None:
                return None
            col = "done" if state == "done" else "failed"
            job = db.execute(f"UPDATE jobs SET {col}={col}+1, bytes=bytes+? WHERE id=?"
                             " RETURNING total, done, failed", (nbytes, job_id)).fetchone()
            new = job_state(job["total"], job["done"], job["failed"])
            db.execute("UPDATE jobs SET state=?, finished=? WHERE id=?",
                       (new, now if new in FINAL_JOB else None, job_id))
            if state == "done" and hit["cache_key"]:
                db.execute("INSERT INTO cache (key, job_id, n) VALUES (?, ?, ?)"
                           " ON CONFLICT (key) DO UPDATE SET job_id = excluded.job_id,"
                           " n = excluded.n", (hit["cache_key"], job_id, n))
            _bump(db, **{col: 1, "bytes": nbytes})
        return new

    # --- numbers ---------------------------------------------------------------------------
    def open_jobs_of(self, owner: str) -> int:
        """Jobs of ``owner`` not final yet (queued or running), by the owner index."""
        with self._db() as db:
            row = db.execute("SELECT COUNT(*) AS c FROM jobs WHERE owner=?"
                             " AND state IN ('queued', 'running')", (owner,)).fetchone()
        return int(row["c"])

    def counts(self) -> Counts:
        """Open outputs by state (the open index makes this cheap)."""
        with self._db() as db:
            rows = db.execute(
                "SELECT state, COUNT(*) AS c FROM outputs WHERE state IN ('queued', 'running')"
                " GROUP BY state").fetchall()
        return Counts(**{r["state"]: r["c"] for r in rows})

    def open_count(self) -> int:
        return self.counts().open

    def done_since(self, window_s: float) -> int:
        """Outputs finished ``done`` in the last ``window_s`` seconds (a count, by index)."""
        with self._db() as db:
            row = db.execute(
                "SELECT COUNT(*) AS c FROM outputs WHERE finished_at >= ? AND state = 'done'",
                (time.time() - window_s,)).fetchone()
        return int(row["c"])

    def recent_outputs(self, window_s: float, *, now: float | None = None) -> list[Finished]:
        """Outputs that finished in the last ``window_s`` seconds, oldest first."""
        now = time.time() if now is None else now
        with self._db() as db:
            rows = db.execute(
                "SELECT state, attempts, queued_at, finished_at, t_queue, t_decode, t_filters,"
                " t_encode, t_total FROM outputs WHERE finished_at >= ? ORDER BY finished_at",
                (now - window_s,)).fetchall()
        return [Finished(r["state"], r["attempts"], r["queued_at"], r["finished_at"],
                         _timings(r)) for r in rows]

    def totals(self) -> Totals:
        """The running counters (one indexed read, whatever the history)."""
        with self._db() as db:
            rows = db.execute("SELECT name, value FROM counters").fetchall()
        return Totals(**{r["name"]: r["value"] for r in rows if r["name"] in COUNTERS})

    # --- named leases ---------------------------------------------------------------------
    def acquire_lease(self, name: str, holder: str, ttl_s: float, *,
                      now: float | None = None) -> int | None:
        """Take or renew the lease ``name`` for ``ttl_s`` seconds: its fencing token, or
        None while another holder's lease is live.

        The token grows by one each time the lease changes hands or is taken again after
        it expired or was released, and stays the same when a live holder renews: every
        tenure has its own token, larger than any before it, so whatever the lease
        guards can refuse a write carrying an older one (a holder that paused past its
        expiry). One statement, so two holders racing cannot both win. Expiry is judged
        on the callers' clocks (``now``): they must agree to well within ``ttl_s``.
        """
        now = time.time() if now is None else now
        with self._db() as db:
            row = db.execute(
                "INSERT INTO leases (name, holder, token, expires) VALUES (?, ?, 1, ?)"
                " ON CONFLICT (name) DO UPDATE SET"
                " token = CASE WHEN leases.holder = excluded.holder AND leases.expires > ?"
                " THEN leases.token ELSE leases.token + 1 END,"
                " holder = excluded.holder, expires = excluded.expires"
                " WHERE leases.holder = excluded.holder OR leases.expires <= ?"
                " RETURNING token", (name, holder, now + ttl_s, now, now)).fetchone()
        return None if row is None else int(row["token"])

    def release_lease(self, name: str, holder: str) -> bool:
        """Give the lease up now if ``holder`` has it (its token is kept for the next
        holder to exceed); whether it did."""
        with self._db() as db:
            cur = db.execute("UPDATE leases SET expires = 0 WHERE name = ? AND holder = ?"
                             " AND expires > 0", (name, holder))
            return bool(cur.rowcount)

    def lease(self, name: str) -> Lease | None:
        """The lease ``name`` as stored (live, expired or released), or None if never taken."""
        with self._db() as db:
            row = db.execute("SELECT holder, token, expires FROM leases WHERE name = ?",
                             (name,)).fetchone()
        return None if row is None else Lease(name, str(row["holder"]), int(row["token"]),
                                              float(row["expires"]))

    def lease_holder(self, name: str, *, now: float | None = None) -> str | None:
        """Who holds the lease ``name`` now, or None when nobody does."""
        now = time.time() if now is None else now
        held = self.lease(name)
        return held.holder if held is not None and held.expires > now else None

    # --- retention ----------------------------------------------------------------------------
    def finished_jobs(self, *, before: float | None = None, limit: int = 200) -> list[str]:
        """Ids of finished jobs, oldest first; only those finished before ``before``."""
        with self._db() as db:
            rows = db.execute(
                "SELECT id FROM jobs WHERE finished IS NOT NULL AND finished < ?"
                " ORDER BY finished LIMIT ?",
                (float("inf") if before is None else before, limit)).fetchall()
        return [r["id"] for r in rows]

    def drop_jobs(self, job_ids: Sequence[str], *, why: str = "expired",
                  now: float | None = None) -> int:
        """Forget finished jobs (rows, cache entries, files); each answers 410 for
        TOMBSTONE_S. ``why`` is ``expired`` (TTL) or ``evicted`` (byte budget). Returns
        the bytes freed. Rows go first: a crash in between leaves files without rows,
        which :meth:`sweep_leftovers` removes."""
        now = time.time() if now is None else now
        ids = [check_id(j) for j in job_ids]
        if not ids:
            return 0
        marks = ",".join("?" * len(ids))
        with self._tx() as db:
            gone = db.execute(f"SELECT id, bytes, owner FROM jobs WHERE id IN ({marks})"
                              f" AND finished IS NOT NULL", ids).fetchall()
            ids = [r["id"] for r in gone]
            freed = sum(r["bytes"] for r in gone)
            if not ids:
                return 0
            marks = ",".join("?" * len(ids))
            for table, col in (("outputs", "job_id"), ("images", "job_id"),
                               ("cache", "job_id"), ("jobs", "id")):
                db.execute(f"DELETE FROM {table} WHERE {col} IN ({marks})", ids)
            db.executemany("INSERT INTO expired (id, at, owner) VALUES (?, ?, ?)"
                           " ON CONFLICT (id) DO UPDATE SET at = excluded.at,"
                           " owner = excluded.owner",
                           [(r["id"], now, r["owner"]) for r in gone])
            db.execute("DELETE FROM expired WHERE at < ?", (now - TOMBSTONE_S,))
            _bump(db, bytes=-freed, **{f"jobs_{why}": len(ids)})
        self._blobs.remove_jobs(ids)
        return freed

    def sweep_leftovers(self, *, older_than: float) -> int:
        """Remove what crashes left (uploads cut off, originals or outputs of jobs that
        were never recorded or were dropped, half-written outputs) whose files are older
        than ``older_than`` (epoch seconds); how many were removed."""
        def known(job_id: str) -> bool:
            with self._db() as db:
                return db.execute("SELECT 1 FROM jobs WHERE id=?",
                                  (job_id,)).fetchone() is not None

        return self._blobs.sweep(known, older_than)

def _timing_fields(timings: dict[str, float]) -> dict[str, float]:
    """``t_<stage>`` columns for the known stages of ``timings`` (others are ignored)."""
    return {f"t_{k}": v for k, v in timings.items() if k in STAGES}


def _timings(row: Row) -> dict[str, float | None]:
    return {k: row[f"t_{k}"] for k in STAGES}


def _job(row: Row, outputs: tuple[Output, ...]) -> Job:
    return Job(id=row["id"], state=row["state"], created=row["created"],
               finished=row["finished"], total=row["total"], done=row["done"],
               failed=row["failed"], outputs=outputs, owner=row["owner"])


def _output(r: Row) -> Output:
    return Output(
        task_id=r["task_id"], job_id=r["job_id"], n=r["n"], image=r["image"], ops=r["ops"],
        cost=r["cost"], state=r["state"], attempts=r["attempts"], queued_at=r["queued_at"],
        worker=r["worker"], width=r["width"], height=r["height"], nbytes=r["bytes"],
        content_type=r["content_type"], format=r["format"], error=r["error"],
        dispatched_at=r["dispatched_at"], finished_at=r["finished_at"],
        timings_ms=_timings(r), cached=bool(r["cached"]), gravity=r["gravity"])


def _owns(row: Row, owner: str | None) -> bool:
    return owner is None or row["owner"] == owner


def _bump(db: Db, **deltas: int) -> None:
    """Add to counters inside the caller's transaction, in the order of their names (the
    order PostgreSQL locks their rows in: two bumps never wait on each other)."""
    db.executemany("UPDATE counters SET value = value + ? WHERE name = ?",
                   [(v, k) for k, v in sorted(deltas.items()) if v])
