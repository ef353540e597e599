"""What the sink does with one result, without sockets: exactly-once finishing.

An output is final once ``done`` or ``failed`` in the job store, and a final output
never changes (``Store.complete``/``fail`` only touch rows that are not final). So
the first result for a task id wins and every later one — a re-dispatched copy, a
paused worker that wakes up late — is counted as a duplicate and dropped before its
bytes touch the output file. The sink is the only process that completes outputs
and it handles results one at a time, so check-then-write cannot race with itself.

Before any of that, a result must carry the lease token of a dispatch of its task
(:mod:`imgpipe.core.lease`): anything else is dropped and counted as ``forged``. The
stored content type comes from the output format through a fixed table, never from
the result's header, so no result can make an output be served as, say, HTML.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from imgpipe.core import lease
from imgpipe.core.errors import ImgpipeError, ProtocolError
from imgpipe.core.media import OUTPUT_FORMATS, content_type
from imgpipe.core.protocol import Done, Result
from imgpipe.core.records import task_id
from imgpipe.core.store import Store

log = logging.getLogger(__name__)


@dataclass
class Counters:
    results: int = 0
    written: int = 0
    duplicates: int = 0
    failed: int = 0
    retries: int = 0
    errors: int = 0
    forged: int = 0
    expired: int = 0  # jobs this sink's retention passes dropped
    bytes: int = 0
    write_ms: list[float] = field(default_factory=list)  # since the last snapshot

    def snapshot(self) -> dict[str, Any]:
        """Metric values; write latency covers the results since the previous call."""
        lat = sorted(self.write_ms)
        self.write_ms = []
        return {
            "results": self.results, "written": self.written, "duplicates": self.duplicates,
            "failed": self.failed, "retries": self.retries, "errors": self.errors,
            "forged": self.forged, "expired": self.expired,
            "bytes": self.bytes,
            "write_ms_avg": round(sum(lat) / len(lat), 3) if lat else 0.0,
            "write_ms_p95": round(lat[int(0.95 * (len(lat) - 1))], 3) if lat else 0.0,
            "write_ms_max": round(lat[-1], 3) if lat else 0.0,
        }


class ResultHandler:
    """Turns each :class:`Result` into store writes and the :class:`Done` to publish."""

    def __init__(self, store: Store, lease_key: bytes) -> None:
        self.store = store
        self.lease_key = lease_key
        self.counters = Counters()

    def handle(self, res: Result) -> Done:
        """The Done to publish for ``res``; ProtocolError if its ids disagree or it
        holds no lease of its task."""
        c = self.counters
        c.results += 1
        if res.task_id != task_id(res.job_id, res.n):
            c.errors += 1
            raise ProtocolError(f"result {res.task_id!r} names job {res.job_id!r} output {res.n}")
        if not lease.valid(self.lease_key, res.task_id, res.attempt, res.lease):
            c.forged += 1
            raise ProtocolError(f"result for {res.task_id} attempt {res.attempt} from "
                                f"{res.worker[:80]!r} holds no lease of that dispatch")
        if res.ok and res.format not in OUTPUT_FORMATS:
            c.errors += 1
            raise ProtocolError(f"result for {res.task_id}: no output format {res.format[:20]!r}")
        base: dict[str, Any] = {"task_id": res.task_id, "job_id": res.job_id, "n": res.n,
                                "attempt": res.attempt}
        try:
            if self.store.is_final(res.task_id):
                return self._duplicate(res, base)
            if res.ok:
                return self._complete(res, base)
            if res.retry:
                c.retries += 1
                return Done(state="retry", error=res.error, **base)
            state = self.store.fail(res.task_id, res.error or "failed without a reason",
                                    worker=res.worker, attempt=res.attempt,
                                    timings=res.timings)
            if state is None:
                return self._duplicate(res, base)
            c.failed += 1
            return Done(state="failed", job_state=state, error=res.error, **base)
        except (ImgpipeError, OSError) as exc:
            # Not the worker's fault (disk full, store busy): give it back for another try.
            c.errors += 1
            log.exception("could not finish %s", res.task_id)
            return Done(state="retry", error=f"sink could not store the result: {exc}", **base)

    def _complete(self, res: Result, base: dict[str, Any]) -> Done:
        c = self.counters
        t0 = time.perf_counter()
        state = self.store.complete(
            res.task_id, res.payload, worker=res.worker, attempt=res.attempt,
            width=res.width, height=res.height, content_type=content_type(res.format),
            fmt=res.format, timings=res.timings, gravity=res.gravity)
        if state is None:
            return self._duplicate(res, base)
        c.write_ms.append((time.perf_counter() - t0) * 1000)
        c.written += 1
        c.bytes += len(res.payload)
        return Done(state="done", job_state=state, **base)

    def _duplicate(self, res: Result, base: dict[str, Any]) -> Done:
        self.counters.duplicates += 1
        log.info("duplicate result for %s (attempt %d from %s) dropped",
                 res.task_id, res.attempt, res.worker)
        return Done(state="duplicate", **base)
