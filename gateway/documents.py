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
        "timings_ms": dict(o.timings_ms),
        "error": o.error,
    }


def output_url(job_id: str, n: int) -> str:
    return f"/api/jobs/{job_id}/outputs/{n}"


def iso(ts: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC with milliseconds and a ``Z``."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")
