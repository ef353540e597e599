"""What the job store speaks: ids, states and typed records.

Callers of :class:`~imgpipe.core.store.Store` get these dataclasses, never database
rows: the columns and the file layout stay inside the store, and the HTTP document
is the gateway's to build from them.

An output moves ``queued -> running -> done | failed``; ``done`` and ``failed`` are
final (:data:`FINAL`) and never change again. A job is ``queued`` until its first
dispatch, ``running`` until every output is final, then ``done``, ``failed`` or
``partial`` (:data:`FINAL_JOB`).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field

from imgpipe.core.errors import ImgpipeError
from imgpipe.core.protocol import GravityNote

FINAL = ("done", "failed")  # final output states
FINAL_JOB = ("done", "failed", "partial")  # final job states
OPEN = ("queued", "running")  # output states the ventilator still owes
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


class NotFound(ImgpipeError):
    status = 404
    error = "not_found"


class Gone(ImgpipeError):
    """A job that existed and expired (``IMGPIPE_JOB_TTL_S``): its rows and files are gone."""

    status = 410
    error = "expired"


class Fenced(ImgpipeError):
    """A write guarded by a named lease, refused: the writer's fencing token is no
    longer the lease's current one (another holder took it), or the lease expired."""

    status = 409
    error = "fenced"


class StorageFull(ImgpipeError):
    """The data dir cannot take more: its disk is full, or its byte budget is spent on
    jobs that are not finished yet (nothing left to evict)."""

    status = 507
    error = "insufficient_storage"


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


def job_state(total: int, done: int, failed: int) -> str:
    """A job's state from its output counts."""
    if done + failed < total:
        return "running"
    if failed == 0:
        return "done"
    return "failed" if done == 0 else "partial"


@dataclass(frozen=True, slots=True)
class Original:
    """An uploaded image as recorded: its format, size in pixels and in bytes, and the
    SHA-256 of its bytes (the result cache's key; "" leaves it out of the cache)."""

    format: str
    width: int
    height: int
    nbytes: int
    sha256: str = ""


@dataclass(frozen=True, slots=True)
class Output:
    """One image x chain of a job. Times are epoch seconds, ``timings_ms`` per stage."""

    task_id: str
    job_id: str
    n: int
    image: int
    ops: str
    cost: str
    state: str
    attempts: int
    queued_at: float
    worker: str | None = None
    width: int | None = None
    height: int | None = None
    nbytes: int | None = None
    content_type: str | None = None
    format: str | None = None
    error: str | None = None
    dispatched_at: float | None = None
    finished_at: float | None = None
    timings_ms: dict[str, float | None] = field(default_factory=dict)
    cached: bool = False  # done at once from the result cache; no worker touched it
    gravity: GravityNote | None = None
    """Where ``gravity=smart`` steps put their window (``smart`` or ``center``, see
    :data:`~imgpipe.core.protocol.GravityNote`); None when no step placed one by it."""


@dataclass(frozen=True, slots=True)
class Job:
    """A job and, in order of ``n``, its outputs."""

    id: str
    state: str
    created: float
    finished: float | None
    total: int
    done: int
    failed: int
    outputs: tuple[Output, ...] = ()
    owner: str | None = None
    """sha256 hex of the API key that made the job (of the client address without keys)."""


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
class Finished:
    """An output that reached a final state recently (rates and latencies)."""

    state: str
    attempts: int
    queued_at: float
    finished_at: float
    timings_ms: dict[str, float | None]


@dataclass(frozen=True, slots=True)
class Lease:
    """A named lease as the store holds it: who, its fencing token, and when it expires
    (epoch seconds, on the clock of the holder that last took or renewed it; 0 once
    released)."""

    name: str
    holder: str
    token: int
    expires: float


@dataclass(frozen=True, slots=True)
class Counts:
    """Open outputs by state."""

    queued: int = 0
    running: int = 0

    @property
    def open(self) -> int:
        return self.queued + self.running


@dataclass(frozen=True, slots=True)
class Totals:
    """Running counters of everything the store has recorded (kept in the transactions
    that change them, so reading them costs the same at any history)."""

    jobs: int = 0
    outputs: int = 0
    done: int = 0
    failed: int = 0
    retries: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    jobs_expired: int = 0
    jobs_evicted: int = 0
    bytes: int = 0  # originals and outputs on disk now

    @property
    def cache_hit_ratio(self) -> float:
        looked = self.cache_hits + self.cache_misses
        return round(self.cache_hits / looked, 4) if looked else 0.0
