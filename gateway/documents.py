"""The job document of the HTTP API (DESIGN.md), built from the store's records."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from imgpipe.core.records import Job, Output


def job_doc(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "state": job.state,
        "created": iso(job.created),
        "finished": iso(job.finished),
        "progress": {"done": job.done, "failed": job.failed, "total": job.total},
        "outputs": [output_doc(o) for o in job.outputs],
    }


def output_doc(o: Output) -> dict[str, Any]:
    return {
        "n": o.n, "image": o.image, "ops": o.ops, "state": o.state,
        "url": output_url(o.job_id, o.n),
        "width": o.width, "height": o.height, "bytes": o.nbytes,
        "content_type": o.content_type, "worker": o.worker, "attempts": o.attempts,
        "cached": o.cached, "gravity": o.gravity,
        "timings_ms": {**o.timings_ms, **hop_timings(o)},
        "error": o.error,
    }


def hop_timings(o: Output) -> dict[str, float | None]:
    """Where a done output's time went outside the worker, in ms, from the store's
    timestamps: ``dispatch`` from queued to sent by the ventilator (its last attempt)
    and ``store`` from the result ready at the worker to its file written by the sink. With
    the worker's ``queue`` (queued -> received) and ``total`` they add up to queued ->
    finished; the hop to the worker is ``queue - dispatch``. They compare clocks of the
    gateway, ventilator, worker and sink: across hosts, any skew shows in them. None
    when not known (not done, or done from the result cache)."""
    q, total = o.timings_ms.get("queue"), o.timings_ms.get("total")
    if (o.state != "done" or o.cached or o.dispatched_at is None or o.finished_at is None
            or q is None or total is None):
        return {"dispatch": None, "store": None}
    return {"dispatch": round((o.dispatched_at - o.queued_at) * 1000, 3),
            "store": round((o.finished_at - o.queued_at) * 1000 - q - total, 3)}


def output_url(job_id: str, n: int) -> str:
    return f"/api/jobs/{job_id}/outputs/{n}"


def iso(ts: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC with milliseconds and a ``Z``."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")
