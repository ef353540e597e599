"""Recent jobs and their output thumbnails, read from the gateway's HTTP API.

The dashboard never opens the job store itself (it may run on another host); it asks
the gateway ``GET /api/jobs?limit=N`` and fetches ``/api/jobs/{id}/outputs/{n}``.
Thumbnails are shrunk here so the browser gets a few kilobytes, not a 4K image.
"""

from __future__ import annotations

import io
from typing import Any

import httpx
from PIL import Image

from imgpipe.core.config import client_headers

THUMB_PX = 160


class GatewayUnavailable(Exception):
    """The gateway did not answer (down, restarting, or another URL)."""


def recent_jobs(base_url: str, limit: int = 6, timeout: float = 1.5) -> list[dict[str, Any]]:
    """The newest ``limit`` job documents, newest first."""
    url = f"{base_url.rstrip('/')}/api/jobs"
    try:
        resp = httpx.get(url, params={"limit": limit}, timeout=timeout,
                         headers=client_headers())
    except httpx.HTTPError as exc:
        raise GatewayUnavailable(f"{base_url} not reachable ({type(exc).__name__})") from None
    if resp.status_code != 200:
        raise GatewayUnavailable(f"GET {url} answered {resp.status_code}")
    try:
        body = resp.json()
    except ValueError:
        raise GatewayUnavailable(f"GET {url} did not answer JSON") from None
    jobs = body.get("jobs", []) if isinstance(body, dict) else body
    return [j for j in jobs if isinstance(j, dict)][:limit] if isinstance(jobs, list) else []




def job_document(base_url: str, job_id: str, timeout: float = 2.0) -> dict[str, Any]:
    """``GET /api/jobs/{id}``: the whole job document, outputs included."""
    url = f"{base_url.rstrip('/')}/api/jobs/{job_id}"
    doc = _get(url, timeout).json()
    if not isinstance(doc, dict):
        raise GatewayUnavailable(f"GET {url} did not answer a job document")
    return doc


def output_url(base_url: str, job: dict[str, Any], output: dict[str, Any]) -> str:
    path = output.get("url") or f"/api/jobs/{job.get('id')}/outputs/{output.get('n')}"
    return f"{base_url.rstrip('/')}{path}"


def fetch_thumbnail(url: str, size: int = THUMB_PX, timeout: float = 3.0) -> bytes:
    """A JPEG of at most ``size`` px on its longer side; raises GatewayUnavailable."""
    return thumbnail(_get(url, timeout).content, size)


def _get(url: str, timeout: float) -> httpx.Response:
    """``GET url``, answered 200, or GatewayUnavailable."""
    try:
        resp = httpx.get(url, timeout=timeout, headers=client_headers())
    except httpx.HTTPError as exc:
        raise GatewayUnavailable(f"{url}: {type(exc).__name__}") from None
    if resp.status_code != 200:
        raise GatewayUnavailable(f"GET {url} answered {resp.status_code}")
    return resp


def thumbnail(data: bytes, size: int = THUMB_PX) -> bytes:
    """``data`` (any format Pillow reads) shrunk to fit ``size``×``size``, as JPEG."""
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (size, size))
        small = img.convert("RGB")
        small.thumbnail((size, size))
        out = io.BytesIO()
        small.save(out, "JPEG", quality=80)
        return out.getvalue()


def job_caption(job: dict[str, Any]) -> str:
    """``abc123 · done · 3/3`` (failed ones counted when present)."""
    prog = job.get("progress") or {}
    done, total, failed = prog.get("done", 0), prog.get("total", 0), prog.get("failed", 0)
    tail = f", {failed} failed" if failed else ""
    return f"{str(job.get('id', '?'))[:12]} · {job.get('state', '?')} · {done}/{total}{tail}"
