"""Jobs over HTTP: submit (``POST /api/process/``), status, outputs, recent jobs.

A job is recorded in the store — originals moved into place, then one transaction for
the job and its outputs — before the ``202`` and before the ventilator hears of it, so
a gateway killed at any moment either never answered (nothing was promised) or left a
job the ventilator will find on its next rescan.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Iterator

import falcon

from imgpipe.core.blobs import ObjectStoreError
from imgpipe.core.config import Settings
from imgpipe.core.records import (
    FINAL,
    FINAL_JOB,
    NotFound,
    Original,
    StorageFull,
    check_id,
    new_job_id,
)
from imgpipe.core.retention import make_room, over_budget
from imgpipe.core.store import Store
from imgpipe.gateway.access import owner_of
from imgpipe.gateway.documents import job_doc
from imgpipe.gateway.errors import BadParam, BlobStoreDown, OutputFailed, QueueFull
from imgpipe.gateway.limits import ClientLimits, check_cost
from imgpipe.gateway.pipeline import Pipeline
from imgpipe.gateway.upload import Upload, check_length, parse_upload

log = logging.getLogger(__name__)

# An output never changes, but it is the client's: shared caches must not keep it.
IMMUTABLE = "private, max-age=31536000, immutable"
# Image answers: never sniffed into another type, never run as a document.
IMAGE_HEADERS = {"X-Content-Type-Options": "nosniff",
                 "Content-Security-Policy": "default-src 'none'"}
MAX_LIST = 100


class ProcessResource:
    """``POST /api/process/``: validate, record, notify, optionally wait."""

    def __init__(self, settings: Settings, store: Store, pipeline: Pipeline) -> None:
        self.settings = settings
        self.store = store
        self.pipeline = pipeline
        self.waiter = Waiter(settings, store, pipeline)
        self.limits = ClientLimits(settings, store)

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        wait_s = parse_wait(req, self.settings)
        use_cache = parse_cache(req)
        check_length(req, self.settings)
        self.check_capacity(0)  # refuse before reading a body that cannot be queued
        owner = str(req.context.owner)
        self.limits.admit(owner)
        self.check_storage()
        with storage_errors():
            upload = parse_upload(req, self.settings, self.store, digest=use_cache)
            req.context.upload_bytes = upload.body_bytes
            try:
                check_cost([(i.width, i.height) for i in upload.images],
                           [ops for ops, _ in upload.chains], self.settings)
            except BaseException:
                upload.discard()
                raise
            job_id = self.record(upload, owner, cache=use_cache)
        self.pipeline.notify(job_id, upload.outputs)
        self.pipeline.stats.accepted()
        prepare_outputs(self.store, job_id)
        resp.set_header("Location", f"/api/jobs/{job_id}")
        if upload.negotiated:  # the recorded chain depends on Accept
            resp.append_header("Vary", "Accept")
        final = wait_s > 0 and self.waiter.wait(job_id, wait_s)
        if final and upload.outputs == 1 and wants_image(req):
            serve_output(req, resp, self.store, job_id, 0, owner=owner_of(req))
            if not upload.negotiated:  # image or JSON: chosen by Accept
                resp.append_header("Vary", "Accept")
            return
        resp.status = falcon.HTTP_200 if final else falcon.HTTP_202
        resp.media = job_doc(self.store.job(job_id))

    def check_capacity(self, new_outputs: int) -> None:
        """503 + Retry-After when ``new_outputs`` would push the queue over its limit.

        A job larger than the whole limit is still taken when nothing is open, so no
        job is refused forever.
        """
        open_now = self.store.open_count()
        limit = self.settings.queue_limit
        full = open_now + new_outputs > limit if new_outputs else open_now >= limit
        if open_now == 0 or not full:
            return
        rate = self.store.done_since(30.0) / 30.0
        excess = max(1, open_now + new_outputs - limit)
        retry = math.ceil(excess / rate) if rate > 0 else 5
        raise QueueFull(f"the queue is full ({open_now} outputs open, limit {limit}); "
                        f"retry in about {retry} s", retry_after=min(120, max(1, retry)))

    def check_storage(self) -> None:
        """507 when the data dir is over its byte budget and evicting finished jobs
        cannot bring it back (everything there still belongs to open jobs)."""
        if not over_budget(self.store, self.settings):
            return
        make_room(self.store, self.settings, time.time())
        if over_budget(self.store, self.settings):
            raise StorageFull(f"the data dir holds {self.store.totals().bytes} bytes of "
                              f"unfinished jobs, at its cap (IMGPIPE_MAX_DATA_BYTES="
                              f"{self.settings.max_data_bytes}); retry when they finish")

    def record(self, upload: Upload, owner: str | None = None, *, cache: bool = True) -> str:
        """Adopt the originals and create the job; undo the files on any error."""
        job_id = new_job_id()
        try:
            self.check_capacity(upload.outputs)
            for i, img in enumerate(upload.images):
                self.store.adopt_original(job_id, i, img.format, img.tmp)
            self.store.create_job(
                job_id, [Original(i.format, i.width, i.height, i.nbytes, i.sha256)
                         for i in upload.images], upload.chains, cache=cache, owner=owner)
        except BaseException:
            upload.discard()
            self.store.discard_originals(job_id)
            raise
        log.info("job %s: %d image(s) x %d chain(s)", job_id, len(upload.images),
                 len(upload.chains))
        return job_id


class Waiter:
    """Blocks a request until a job is final, for ``?wait``; shared by both routes.

    A wait holds a request thread, so at most half the threads of a process may wait
    at once; past that a request answers at once, as if it had not asked to wait.
    """

    def __init__(self, settings: Settings, store: Store, pipeline: Pipeline) -> None:
        self.store = store
        self.pipeline = pipeline
        self.slots = threading.BoundedSemaphore(max(1, settings.gateway_threads // 2))

    def wait(self, job_id: str, wait_s: float) -> bool | None:
        """True if the job became final in time, False if not, None if no slot was free."""
        if not self.slots.acquire(blocking=False):
            return None
        try:
            return self.pipeline.wait_final(
                job_id, wait_s, lambda: self.store.job_state(job_id) in FINAL_JOB)
        finally:
            self.slots.release()


class JobResource:
    """``GET /api/jobs/{job_id}[?wait=S]``: the job document, once final if asked to wait."""

    def __init__(self, settings: Settings, store: Store, waiter: Waiter) -> None:
        self.settings = settings
        self.store = store
        self.waiter = waiter

    def on_get(self, req: falcon.Request, resp: falcon.Response, job_id: str) -> None:
        wait_s = parse_wait(req, self.settings)
        owner = owner_of(req)
        # 404 (an unknown id or another key's job) before waiting on it
        self.store.job_state(check_id(job_id), owner=owner)
        if wait_s > 0:
            self.waiter.wait(job_id, wait_s)
        resp.media = job_doc(self.store.job(job_id, owner=owner))


class JobListResource:
    """``GET /api/jobs?limit=N``: the caller's most recent job documents, newest first."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        raw = req.get_param("limit") or "20"
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIST:
            raise BadParam(f"limit must be a whole number from 1 to {MAX_LIST}", field="limit")
        jobs = self.store.recent_jobs(int(raw), owner=owner_of(req))
        resp.media = {"jobs": [job_doc(j) for j in jobs]}


class OutputResource:
    """``GET /api/jobs/{job_id}/outputs/{n}``: the output's bytes, cacheable once done."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def on_get(self, req: falcon.Request, resp: falcon.Response, job_id: str, n: str) -> None:
        if not n.isdigit() or len(n) > 6:
            raise NotFound(f"no output {n!r}: outputs are numbered from 0", field="n")
        serve_output(req, resp, self.store, check_id(job_id), int(n), owner=owner_of(req))


def prepare_outputs(store: Store, job_id: str) -> None:
    """Ready the job's output folder while the ventilator and a worker are busy with it:
    off the path from a result to the answer. A failure here only leaves that to the
    sink, so it is logged, not answered."""
    try:
        store.prepare_outputs(job_id)
    except OSError as exc:
        log.warning("could not prepare the outputs of %s: %s", job_id, exc)


def serve_output(req: falcon.Request, resp: falcon.Response, store: Store, job_id: str,
                 n: int, *, owner: str | None = None) -> None:
    """Stream output ``n`` with its content type, ETag and immutable caching."""
    out = store.output(job_id, n, owner=owner)
    if out.state == "failed":
        raise OutputFailed(f"output {n} failed: {out.error or 'unknown error'}", field="n")
    if out.state not in FINAL:
        raise NotFound(f"output {n} of job {job_id} is {out.state}; it exists once done",
                       field="n")
    tag = hashlib.sha1(f"{out.task_id}:{out.nbytes}:{out.finished_at}".encode())
    etag = f'"{tag.hexdigest()[:20]}"'
    resp.set_header("ETag", etag)
    resp.set_headers(IMAGE_HEADERS)
    resp.cache_control = [IMMUTABLE]
    resp.status = falcon.HTTP_200
    if _matches(req.get_header("If-None-Match"), etag):
        resp.status = falcon.HTTP_304
        return
    with storage_errors():
        fh = store.open_output(out)
    resp.content_type = out.content_type or "application/octet-stream"
    resp.set_stream(fh, fh.size)


def _matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or etag in tags


def parse_cache(req: falcon.Request) -> bool:
    """``?cache=0`` bypasses the result cache; ``1`` (the default) uses it."""
    raw = req.get_param("cache")
    if raw in (None, "", "1", "true"):
        return True
    if raw in ("0", "false"):
        return False
    raise BadParam("cache must be 0 or 1", field="cache")


@contextlib.contextmanager
def storage_errors() -> Iterator[None]:
    """A full disk while staging an upload or writing the job's rows is a 507; the blob
    store (S3) unreachable is a 503 with Retry-After."""
    try:
        yield
    except ObjectStoreError as exc:
        log.warning("blob store unavailable: %s", exc)
        raise BlobStoreDown("the blob store is unavailable; retry later") from None
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise StorageFull(f"the data dir's disk is full ({exc.strerror}); retry later") from None
    except sqlite3.OperationalError as exc:
        if "full" not in str(exc):
            raise
        raise StorageFull(f"the job store's disk is full ({exc}); retry later") from None


def parse_wait(req: falcon.Request, settings: Settings) -> float:
    """``?wait=S`` in seconds, capped at ``max_wait_s``; 0 when absent."""
    raw = req.get_param("wait")
    if raw is None or raw == "":
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise BadParam(f"wait must be a number of seconds from 0 to {settings.max_wait_s:g}",
                       field="wait")
    return min(value, settings.max_wait_s)


def wants_image(req: falcon.Request) -> bool:
    """True when ``Accept`` names an image type (``image/*``, ``image/png``, ...)."""
    accept = req.get_header("Accept") or ""
    for item in accept.split(","):
        media, _, params = item.partition(";")
        if media.strip().lower().startswith("image/") and not _q_zero(params):
            return True
    return False


def _q_zero(params: str) -> bool:
    for p in params.split(";"):
        key, _, value = p.strip().partition("=")
        if key == "q":
            try:
                return float(value) == 0
            except ValueError:
                return False
    return False

