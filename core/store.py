"""The job store: SQLite (WAL) for state, files under the data dir for images.

Layout under ``data_dir``::

    jobs.sqlite3                  jobs, images, outputs (one row per image x chain)
    originals/<job>/<i>.<ext>     uploaded images, written before the job row commits
    outputs/<job>/<n>.<ext>       results, written atomically (temp file + rename)

Every path is built from a server-generated UUID and integers only; :func:`check_id`
refuses anything else, so no request can name a file outside the data dir.

Several processes share the database (gunicorn workers, ventilator, sink): WAL lets
readers run beside the one writer, ``busy_timeout`` makes writers queue instead of
failing, and ``synchronous=NORMAL`` keeps a commit under a millisecond while staying
durable across process crashes (only a power loss may drop the last commits).
Connections are per thread.

An output moves ``queued -> running -> done | failed``; ``done`` and ``failed`` are
final and never change again, which is what makes results exactly-once: the first
:meth:`Store.complete` wins and later ones report a duplicate.
"""

from __future__ import annotations

import os
import re
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.errors import ImgpipeError
from core.protocol import STAGES

FINAL = ("done", "failed")  # final output states
FINAL_JOB = ("done", "failed", "partial")  # final job states
_PARTIAL = ".tmp-"  # name prefix of a file being written in place (see _atomic_write)
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
_EXT = {"jpeg": "jpg", "png": "png", "webp": "webp", "gif": "gif", "bmp": "bmp"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    finished REAL,
    state TEXT NOT NULL,
    total INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS images (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    format TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
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
    t_queue REAL, t_decode REAL, t_filters REAL, t_encode REAL, t_total REAL
);
CREATE INDEX IF NOT EXISTS outputs_job ON outputs (job_id, n);
CREATE INDEX IF NOT EXISTS outputs_open ON outputs (state, queued_at)
    WHERE state IN ('queued', 'running');
CREATE INDEX IF NOT EXISTS outputs_finished ON outputs (finished_at);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created);
"""


class NotFound(ImgpipeError):
    status = 404
    error = "not_found"


def new_job_id() -> str:
    return str(uuid.uuid4())


def check_id(job_id: str) -> str:
    """``job_id`` if it is a UUID this service could have made, else NotFound."""
    if not isinstance(job_id, str) or not _UUID.match(job_id):
        raise NotFound("no such job: job ids are UUIDs", field="id")
    return job_id


def task_id(job_id: str, n: int) -> str:
    return f"{job_id}:{n}"


def split_task_id(tid: str) -> tuple[str, int]:
    job_id, _, n = tid.partition(":")
    if not n.isdigit():
        raise NotFound(f"bad task id {tid!r}", field="task_id")
    return check_id(job_id), int(n)


def ext_for(fmt: str) -> str:
    return _EXT.get(fmt, "bin")


@dataclass(frozen=True)
class OpenTask:
    """An output that is not final yet: what the ventilator needs to dispatch it."""

    task_id: str
    job_id: str
    n: int
    image: int
    ops: str
    cost: str
    state: str
    attempts: int
    queued_at: float


class Store:
    """The job store under ``data_dir``. Thread-safe: one connection per thread."""

    def __init__(self, data_dir: Path | str) -> None:
        self.root = Path(data_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "originals").mkdir(exist_ok=True)
        (self.root / "outputs").mkdir(exist_ok=True)
        self.db_path = self.root / "jobs.sqlite3"
        self._local = threading.local()
        self._db().executescript(_SCHEMA)  # idempotent; executescript commits itself

    # --- connections ----------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # --- files ------------------------------------------------------------------------
    def original_path(self, job_id: str, idx: int, fmt: str) -> Path:
        return self.root / "originals" / check_id(job_id) / f"{int(idx)}.{ext_for(fmt)}"

    def output_path(self, job_id: str, n: int, fmt: str) -> Path:
        return self.root / "outputs" / check_id(job_id) / f"{int(n)}.{ext_for(fmt)}"

    def save_original(self, job_id: str, idx: int, fmt: str, data: bytes | memoryview) -> Path:
        return _atomic_write(self.original_path(job_id, idx, fmt), data)

    def adopt_original(self, job_id: str, idx: int, fmt: str, tmp: Path) -> Path:
        """Move an already-written temp file (same filesystem) into place."""
        path = self.original_path(job_id, idx, fmt)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, path)
        return path

    def remove_partial_outputs(self) -> int:
        """Output files a killed writer left half-written (call from their only writer,
        the sink, before it starts); how many were removed."""
        count = 0
        for path in (self.root / "outputs").glob(f"*/{_PARTIAL}*"):
            path.unlink(missing_ok=True)
            count += 1
        return count

    def tmp_dir(self) -> Path:
        """Scratch space on the data dir's filesystem (so renames into place are atomic)."""
        path = self.root / "tmp"
        path.mkdir(exist_ok=True)
        return path

    def read_original(self, job_id: str, image: int) -> bytes:
        row = self._db().execute("SELECT format FROM images WHERE job_id=? AND idx=?",
                                 (check_id(job_id), image)).fetchone()
        if row is None:
            raise NotFound(f"job {job_id} has no image {image}")
        return self.original_path(job_id, image, row["format"]).read_bytes()

    def write_output(self, job_id: str, n: int, fmt: str, data: bytes | memoryview) -> Path:
        return _atomic_write(self.output_path(job_id, n, fmt), data)

    # --- jobs ---------------------------------------------------------------------------
    def create_job(self, job_id: str, images: Sequence[tuple[str, int, int, int]],
                   chains: Sequence[tuple[str, str]], *, now: float | None = None) -> None:
        """Record a job whose originals are already on disk.

        ``images`` is ``(format, width, height, bytes)`` per image; ``chains`` is
        ``(canonical ops, cost class)`` per chain. Outputs are image-major.
        """
        now = time.time() if now is None else now
        check_id(job_id)
        rows = []
        for i in range(len(images)):
            for c, (ops, cost) in enumerate(chains):
                n = i * len(chains) + c
                rows.append((task_id(job_id, n), job_id, n, i, ops, cost, now))
        with self._tx() as db:
            db.execute("INSERT INTO jobs (id, created, state, total) VALUES (?, ?, 'queued', ?)",
                       (job_id, now, len(rows)))
            db.executemany("INSERT INTO images VALUES (?, ?, ?, ?, ?, ?)",
                           [(job_id, i, *img) for i, img in enumerate(images)])
            db.executemany(
                "INSERT INTO outputs (task_id, job_id, n, image, ops, cost, state, queued_at)"
                " VALUES (?, ?, ?, ?, ?, ?, 'queued', ?)", rows)

    def job(self, job_id: str) -> dict[str, Any]:
        """The job document of DESIGN.md; NotFound for an unknown or malformed id."""
        db = self._db()
        row = db.execute("SELECT * FROM jobs WHERE id=?", (check_id(job_id),)).fetchone()
        if row is None:
            raise NotFound(f"no job {job_id}", field="id")
        outs = db.execute("SELECT * FROM outputs WHERE job_id=? ORDER BY n", (job_id,))
        return _job_doc(row, [_output_doc(o) for o in outs])

    def output(self, job_id: str, n: int) -> sqlite3.Row:
        row = self._db().execute("SELECT * FROM outputs WHERE job_id=? AND n=?",
                                 (check_id(job_id), n)).fetchone()
        if row is None:
            raise NotFound(f"job {job_id} has no output {n}", field="n")
        return row

    def job_state(self, job_id: str) -> str:
        row = self._db().execute("SELECT state FROM jobs WHERE id=?",
                                 (check_id(job_id),)).fetchone()
        if row is None:
            raise NotFound(f"no job {job_id}", field="id")
        return str(row["state"])

    def recent_jobs(self, limit: int = 20) -> list[dict[str, Any]]:
        """The job documents (as :meth:`job`) of the newest ``limit`` jobs, in two queries."""
        db = self._db()
        rows = db.execute("SELECT * FROM jobs ORDER BY created DESC LIMIT ?",
                          (limit,)).fetchall()
        outputs: dict[str, list[dict[str, Any]]] = {r["id"]: [] for r in rows}
        if rows:
            marks = ",".join("?" * len(rows))
            for o in db.execute(f"SELECT * FROM outputs WHERE job_id IN ({marks})"
                                f" ORDER BY job_id, n", tuple(outputs)):
                outputs[o["job_id"]].append(_output_doc(o))
        return [_job_doc(r, outputs[r["id"]]) for r in rows]

    # --- the ventilator's side ------------------------------------------------------------
    def open_tasks(self, *, states: tuple[str, ...] = ("queued", "running"),
                   limit: int = 10_000) -> list[OpenTask]:
        """Outputs not yet final, oldest first (start-up recovery and periodic rescans)."""
        marks = ",".join("?" * len(states))
        # The literal condition is the partial index's own: with bound values alone
        # SQLite cannot prove the index covers them and scans every output ever stored.
        rows = self._db().execute(
            f"SELECT task_id, job_id, n, image, ops, cost, state, attempts, queued_at"
            f" FROM outputs WHERE state IN ('queued', 'running') AND state IN ({marks})"
            f" ORDER BY queued_at, job_id, n LIMIT ?", (*states, limit)).fetchall()
        return [OpenTask(*r) for r in rows]  # columns in field order

    def mark_dispatched(self, tid: str, attempt: int, *, now: float | None = None) -> bool:
        """Record dispatch number ``attempt``; False if the output is already final."""
        now = time.time() if now is None else now
        job_id, _ = split_task_id(tid)
        with self._tx() as db:
            cur = db.execute(
                "UPDATE outputs SET state='running', attempts=?, dispatched_at=?"
                " WHERE task_id=? AND state NOT IN ('done', 'failed')", (attempt, now, tid))
            if cur.rowcount:
                db.execute("UPDATE jobs SET state='running' WHERE id=? AND state='queued'",
                           (job_id,))
        return cur.rowcount > 0

    def is_final(self, tid: str) -> bool:
        row = self._db().execute("SELECT state FROM outputs WHERE task_id=?", (tid,)).fetchone()
        return row is None or row["state"] in FINAL

    # --- the sink's side ---------------------------------------------------------------------
    def complete(self, tid: str, *, worker: str, attempt: int, width: int, height: int,
                 nbytes: int, content_type: str, fmt: str, timings: dict[str, float],
                 now: float | None = None) -> str | None:
        """Mark an output done; the job's new state, or None when it was already final."""
        return self._finish(tid, "done", now=now, worker=worker, attempts=attempt,
                            width=width, height=height, bytes=nbytes,
                            content_type=content_type, format=fmt, error=None,
                            **_timing_fields(timings))

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

    def _finish(self, tid: str, state: str, *, now: float | None, **fields: Any) -> str | None:
        now = time.time() if now is None else now
        job_id, _ = split_task_id(tid)
        names = ", ".join(f"{k}=?" for k in fields)
        with self._tx() as db:
            cur = db.execute(
                f"UPDATE outputs SET state=?, finished_at=?, {names}"
                " WHERE task_id=? AND state NOT IN ('done', 'failed')",
                (state, now, *fields.values(), tid))
            if not cur.rowcount:
                return None
            col = "done" if state == "done" else "failed"
            db.execute(f"UPDATE jobs SET {col}={col}+1 WHERE id=?", (job_id,))
            job = db.execute("SELECT total, done, failed FROM jobs WHERE id=?",
                             (job_id,)).fetchone()
            new = _job_state(job["total"], job["done"], job["failed"])
            db.execute("UPDATE jobs SET state=?, finished=? WHERE id=?",
                       (new, now if new in FINAL_JOB else None, job_id))
        return new

    # --- numbers ---------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Outputs by state: queued, running (the open index makes this cheap)."""
        rows = self._db().execute(
            "SELECT state, COUNT(*) AS c FROM outputs WHERE state IN ('queued', 'running')"
            " GROUP BY state").fetchall()
        out = {"queued": 0, "running": 0}
        out.update({r["state"]: r["c"] for r in rows})
        return out

    def open_count(self) -> int:
        row = self._db().execute(
            "SELECT COUNT(*) FROM outputs WHERE state IN ('queued', 'running')").fetchone()
        return int(row[0])

    def done_since(self, window_s: float) -> int:
        """Outputs finished ``done`` in the last ``window_s`` seconds (a count, by index)."""
        row = self._db().execute(
            "SELECT COUNT(*) FROM outputs WHERE finished_at >= ? AND state = 'done'",
            (time.time() - window_s,)).fetchone()
        return int(row[0])

    def recent_outputs(self, window_s: float, *, now: float | None = None) -> list[sqlite3.Row]:
        """Outputs that finished in the last ``window_s`` seconds (for rates and latencies)."""
        now = time.time() if now is None else now
        return self._db().execute(
            "SELECT state, attempts, finished_at, t_queue, t_decode, t_filters, t_encode,"
            " t_total, queued_at FROM outputs WHERE finished_at >= ? ORDER BY finished_at",
            (now - window_s,)).fetchall()

    def totals(self) -> dict[str, int]:
        row = self._db().execute(
            "SELECT COUNT(*) AS jobs, COALESCE(SUM(done), 0) AS done,"
            " COALESCE(SUM(failed), 0) AS failed, COALESCE(SUM(total), 0) AS total"
            " FROM jobs").fetchone()
        retries = self._db().execute(
            "SELECT COALESCE(SUM(attempts - 1), 0) FROM outputs WHERE attempts > 1").fetchone()
        return {"jobs": row["jobs"], "done": row["done"], "failed": row["failed"],
                "outputs": row["total"], "retries": int(retries[0])}


def _job_state(total: int, done: int, failed: int) -> str:
    if done + failed < total:
        return "running"
    if failed == 0:
        return "done"
    return "failed" if done == 0 else "partial"


def _timing_fields(timings: dict[str, float]) -> dict[str, float]:
    """``t_<stage>`` columns for the known stages of ``timings`` (others are ignored)."""
    return {f"t_{k}": v for k, v in timings.items() if k in STAGES}


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def _job_doc(row: sqlite3.Row, outputs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "state": row["state"],
        "created": _iso(row["created"]),
        "finished": _iso(row["finished"]),
        "progress": {"done": row["done"], "failed": row["failed"], "total": row["total"]},
        "outputs": outputs,
    }


def _output_doc(o: sqlite3.Row) -> dict[str, Any]:
    return {
        "n": o["n"], "image": o["image"], "ops": o["ops"], "state": o["state"],
        "url": f"/api/jobs/{o['job_id']}/outputs/{o['n']}",
        "width": o["width"], "height": o["height"], "bytes": o["bytes"],
        "content_type": o["content_type"], "worker": o["worker"], "attempts": o["attempts"],
        "timings_ms": {k: o[f"t_{k}"] for k in STAGES},
        "error": o["error"],
    }


def _atomic_write(path: Path, data: bytes | memoryview) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_PARTIAL)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
