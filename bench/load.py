"""Load shared by the stress commands: submit jobs, follow them to the end, count.

A submission is one ``POST /api/process/`` without ``?wait`` (the gateway answers
``202`` at once, ``503`` with ``Retry-After`` when its queue is full, or ``429`` with
``Retry-After`` past this client's rate or concurrency limit: both are refusals, not
errors); following a
job is polling ``GET /api/jobs/{id}`` until its state is final. Completion latency is
the gateway's own ``finished - created`` when both are in the document, so polling
granularity does not blur it; otherwise the client's clock.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx

from imgpipe.bench import client as api
from imgpipe.bench.measure import percentiles
from imgpipe.core.records import FINAL_JOB

POLL_S = 0.2


@dataclass
class Submission:
    """One job as the client saw it."""

    t_submit: float
    status: int | None = None
    accept_ms: float = 0.0
    job_id: str | None = None
    error: str | None = None
    final: dict[str, Any] | None = None
    done_ms: float | None = None

    @property
    def accepted(self) -> bool:
        return self.status in (200, 202) and self.job_id is not None


def _ts(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


REFUSED = (429, 503)  # answered with Retry-After: the gateway protecting itself


def submit(http: httpx.Client, url: str, images: list[bytes], chains: list[str]) -> Submission:
    sub = Submission(t_submit=time.monotonic())
    t = time.perf_counter()
    try:
        resp = api.submit(http, url, images, chains)
    except httpx.HTTPError as exc:
        sub.error = f"{type(exc).__name__}: {exc}"
        sub.accept_ms = (time.perf_counter() - t) * 1000
        return sub
    sub.accept_ms = (time.perf_counter() - t) * 1000
    sub.status = resp.status_code
    if resp.status_code in (200, 202):
        try:
            sub.job_id = str(resp.json()["id"])
        except (ValueError, KeyError, TypeError):
            sub.error = f"HTTP {resp.status_code} without a job id: {resp.text[:120]}"
    elif resp.status_code not in REFUSED:
        sub.error = f"HTTP {resp.status_code}: {resp.text[:200]}"
    return sub


def follow(http: httpx.Client, url: str, subs: list[Submission], deadline: float,
           *, threads: int = 8) -> None:
    """Poll every accepted job until it is final or ``deadline`` (monotonic) passes."""
    pending = [s for s in subs if s.accepted and s.final is None]
    lock = threading.Lock()

    def one(sub: Submission) -> None:
        assert sub.job_id is not None
        while time.monotonic() < deadline:
            try:
                doc = api.job(http, url, sub.job_id)
            except (httpx.HTTPError, ValueError) as exc:
                with lock:
                    sub.error = f"polling: {type(exc).__name__}: {exc}"
                time.sleep(POLL_S)
                continue
            if doc.get("state") in FINAL_JOB:
                created, finished = _ts(doc.get("created")), _ts(doc.get("finished"))
                with lock:
                    sub.final = doc
                    sub.error = None
                    sub.done_ms = ((finished - created) * 1000 if created and finished
                                   else (time.monotonic() - sub.t_submit) * 1000)
                return
            time.sleep(POLL_S)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, pending))


@dataclass
class LoadSummary:
    """What a stress run prints: counts, rates, latencies, errors."""

    wall_s: float
    subs: list[Submission]
    outputs_per_job: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        subs = self.subs
        accepted = [s for s in subs if s.accepted]
        finals = Counter(s.final["state"] if s.final else "unfinished" for s in accepted)
        statuses = Counter(str(s.status) if s.status else "no answer" for s in subs)
        done_outputs = sum(int(s.final["progress"]["done"]) for s in accepted
                           if s.final and "progress" in s.final)
        errors = Counter(s.error for s in subs if s.error)
        return {
            "submitted": len(subs), "accepted": len(accepted),
            "rejected_503": statuses.get("503", 0),
            "rejected_429": statuses.get("429", 0),
            "status_counts": dict(statuses), "job_states": dict(finals),
            "unfinished": finals.get("unfinished", 0),
            "server_errors": sum(n for k, n in statuses.items()
                                 if k.isdigit() and int(k) >= 500 and k != "503"),
            "wall_s": round(self.wall_s, 2),
            "submit_rate_per_s": round(len(subs) / self.wall_s, 2) if self.wall_s else 0.0,
            "outputs_done": done_outputs,
            "outputs_per_s": round(done_outputs / self.wall_s, 2) if self.wall_s else 0.0,
            "accept_ms": percentiles([s.accept_ms for s in subs]),
            "done_ms": percentiles([s.done_ms for s in accepted if s.done_ms is not None]),
            "errors": [{"error": e, "count": n} for e, n in errors.most_common(10)],
            **self.extra,
        }

    @property
    def failed(self) -> bool:
        d = self.to_dict()
        return bool(d["unfinished"] or d["server_errors"] or d["job_states"].get("failed")
                    or d["job_states"].get("partial")
                    or any(s.error for s in self.subs if s.status not in REFUSED))
