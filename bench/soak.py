"""``imgpipe stress soak``: a long open-loop mix against a local stack, watching for growth.

Jobs go out on schedule (``--rate`` per second for ``--duration`` seconds), whether or
not earlier ones are done. A share of them (``--repeat``) repeats an earlier image and
chain, so the result cache is exercised; the rest are new bytes (the same photo with a
numbered JPEG comment). Each job is followed to its end by the thread that sent it.

Every ``--sample-s`` seconds the soak samples, per component of the stack behind the
URL (found from the gateway's port, as ``stress`` does): resident memory, open files
and threads; plus the stack's shared memory, the data dir's bytes and the job store's
size. What a service that runs for weeks must show is that each of these curves goes
flat after warm-up: the summary gives, per series, the change from the second quarter
of the run to the last. The samples go to ``--json``, the curves to ``--png``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import statistics
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
from PIL import Image, ImageDraw
from rich.console import Console

from imgpipe.bench import procs, work
from imgpipe.bench.images import generate, parse_size
from imgpipe.core.config import client_headers
from imgpipe.core.records import FINAL_JOB

CHAINS = (work.DEFAULT_OPS, "resize:w=640|sharpen:amount=1.2", "grayscale|resize:w=800")
SHM_PREFIX = "imgpipe-"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rate", type=float, required=True, help="jobs per second")
    p.add_argument("--duration", type=float, required=True, help="seconds of load")
    p.add_argument("--repeat", type=float, default=0.3,
                   help="share of jobs that repeat an earlier image and chain (default 0.3)")
    p.add_argument("--size", default="1920x1080", help="image size WxH (default 1920x1080)")
    p.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--data", type=Path, default=Path("data"),
                   help="the stack's data dir, for its bytes and database size")
    p.add_argument("--shm-dir", type=Path, default=Path("/dev/shm"))
    p.add_argument("--max-inflight", type=int, default=64)
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds a job may take before it counts as lost")
    p.add_argument("--json", type=Path, help="write samples and summary here")
    p.add_argument("--png", type=Path, help="draw the curves here")


def variant(base: bytes, i: int) -> bytes:
    """``base`` (a JPEG) with a numbered comment segment: new bytes, the same pixels."""
    note = f"imgpipe soak {i}".encode()
    return base[:2] + b"\xff\xfe" + (len(note) + 2).to_bytes(2, "big") + note + base[2:]


def dir_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` now; folders removed meanwhile (the sweeper
    runs beside it) are skipped."""
    total = 0
    for root, _dirs, files in os.walk(path):  # os.walk ignores folders that vanish
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, name)).st_size
    return total


class Sampler(procs.Periodic):
    """Samples the stack behind ``root`` every ``interval`` seconds, on its own thread."""

    def __init__(self, root: psutil.Process | None, data: Path, shm: Path,
                 interval: float) -> None:
        super().__init__(interval)
        self.root, self.data, self.shm = root, data, shm
        self.samples: list[dict[str, Any]] = []
        self.t0 = time.monotonic()

    def sample(self) -> dict[str, Any]:
        roles: dict[str, dict[str, float]] = {}
        for role, p in procs.labelled(self.root) if self.root is not None else []:
            try:
                with p.oneshot():
                    rss, fds, threads = p.memory_info().rss, p.num_fds(), p.num_threads()
            except psutil.Error:
                continue
            r = roles.setdefault(role, {"rss_mb": 0.0, "open_files": 0, "threads": 0})
            r["rss_mb"] += rss / 1e6
            r["open_files"] += fds
            r["threads"] += threads
        db = sum(_size(f) for f in self.data.glob("jobs.sqlite3*"))
        shm = sum(_size(f) for f in self.shm.glob(f"{SHM_PREFIX}*"))
        row = {"t": round(time.monotonic() - self.t0, 2),
               "roles": {k: {m: round(v, 1) for m, v in r.items()} for k, r in roles.items()},
               "shm_mb": round(shm / 1e6, 2), "data_mb": round(dir_bytes(self.data) / 1e6, 2),
               "db_mb": round(db / 1e6, 2)}
        self.samples.append(row)
        return row


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # gone between the listing and the stat
        return 0


def series(samples: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Every sampled quantity as (t, value) points, named ``role.metric`` or ``shm_mb``…"""
    out: dict[str, list[tuple[float, float]]] = {}
    for s in samples:
        for role, metrics in s["roles"].items():
            for m, v in metrics.items():
                out.setdefault(f"{role}.{m}", []).append((s["t"], v))
        for key in ("shm_mb", "data_mb", "db_mb"):
            out.setdefault(key, []).append((s["t"], s[key]))
    return out


def drift(points: list[tuple[float, float]]) -> float | None:
    """Change of the mean from the second quarter of the run to the last, in percent of
    the larger of the two (None with too few points): near 0 means flat after warm-up."""
    if len(points) < 8:
        return None
    q = len(points) // 4
    a = statistics.fmean(v for _, v in points[q:2 * q])
    b = statistics.fmean(v for _, v in points[-q:])
    base = max(abs(a), abs(b))
    return round(100.0 * (b - a) / base, 1) if base else 0.0


def run(ns: argparse.Namespace, console: Console) -> int:
    size = parse_size(ns.size)
    base = generate(1, size)[0]
    root = procs.stack_root(ns.url)
    total = max(1, int(ns.rate * ns.duration))
    rng = random.Random(7)
    sent: list[tuple[bytes, str]] = []
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []
    lock = threading.Lock()
    inflight = threading.BoundedSemaphore(ns.max_inflight)

    def one(http: httpx.Client, image: bytes, chain: str) -> None:
        t0 = time.monotonic()
        try:
            state = follow(http, ns.url, image, chain, t0 + ns.timeout)
        except httpx.HTTPError as exc:
            state = f"error: {type(exc).__name__}"
        finally:
            inflight.release()
        with lock:
            outcomes[state] += 1
            if state == "done":
                latencies.append((time.monotonic() - t0) * 1000)

    limits = httpx.Limits(max_connections=ns.max_inflight + 8)
    with httpx.Client(timeout=30.0, limits=limits, headers=client_headers()) as http, \
            Sampler(root, ns.data, ns.shm_dir, ns.sample_s) as sampler, \
            ThreadPoolExecutor(ns.max_inflight) as pool:
        t0 = time.monotonic()
        for i in range(total):
            delay = t0 + i / ns.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # the schedule: open-loop load
            if sent and rng.random() < ns.repeat:
                image, chain = rng.choice(sent)
            else:
                image, chain = variant(base, i), CHAINS[i % len(CHAINS)]
                sent.append((image, chain))
                del sent[:-64]  # repeats come from the recent past, as real traffic does
            if not inflight.acquire(blocking=False):
                with lock:
                    outcomes["skipped (client saturated)"] += 1
                continue
            pool.submit(one, http, image, chain)
        pool.shutdown(wait=True)
        cache = metrics(http, ns.url)
    summary = {
        "rate_per_s": ns.rate, "duration_s": ns.duration, "jobs": total,
        "outcomes": dict(outcomes),
        "latency_ms_p50": round(statistics.median(latencies), 1) if latencies else None,
        "latency_ms_p95": round(sorted(latencies)[int(0.95 * (len(latencies) - 1))], 1)
        if latencies else None,
        "cache": cache,
        "drift_pct": {k: drift(v) for k, v in sorted(series(sampler.samples).items())},
    }
    report = {"summary": summary, "samples": sampler.samples}
    print_summary(summary, console)
    if ns.json:
        ns.json.write_text(json.dumps(report, indent=2) + "\n")
    if ns.png:
        write_png(report, ns.png)
    bad = sum(n for state, n in outcomes.items() if state != "done"
              and not state.startswith("skipped"))
    return 1 if bad else 0


def follow(http: httpx.Client, url: str, image: bytes, chain: str, deadline: float) -> str:
    """Submit one job and follow it to its end: its final state, or why not."""
    resp = http.post(f"{url}/api/process/", params={"wait": 30},
                     files=[("image", ("soak.jpg", image, "image/jpeg"))], data={"ops": chain})
    if resp.status_code not in (200, 202):
        return f"http {resp.status_code}"
    doc = resp.json()
    while doc["state"] not in FINAL_JOB:
        if time.monotonic() > deadline:
            return "lost (timeout)"
        doc = http.get(f"{url}/api/jobs/{doc['id']}", params={"wait": 30}).json()
    return str(doc["state"])


def metrics(http: httpx.Client, url: str) -> dict[str, Any]:
    try:
        doc = http.get(f"{url}/api/metrics").json()
    except (httpx.HTTPError, ValueError):
        return {}
    t = doc.get("totals", {})
    return {"hits": t.get("cache_hits"), "misses": t.get("cache_misses"),
            "hit_ratio": doc.get("cache_hit_ratio"), "jobs_expired": t.get("jobs_expired"),
            "data_bytes": t.get("bytes")}


def print_summary(summary: dict[str, Any], console: Console) -> None:
    console.print(f"[bold]imgpipe stress soak[/] {summary['rate_per_s']:g}/s for "
                  f"{summary['duration_s']:g} s: {summary['jobs']} jobs")
    console.print("outcomes: " + ", ".join(f"{k} {v}" for k, v in summary["outcomes"].items()))
    console.print(f"latency p50 {summary['latency_ms_p50']} ms, p95 {summary['latency_ms_p95']} "
                  f"ms; cache {summary['cache']}")
    flat = {k: v for k, v in summary["drift_pct"].items() if v is not None}
    console.print("drift, 2nd quarter → last quarter (%): " +
                  ", ".join(f"{k} {v:+.1f}" for k, v in flat.items()) if flat
                  else "drift: too few samples")


PANELS = (("rss_mb", "resident memory, MB"), ("open_files", "open files"),
          ("threads", "threads"), ("storage", "shm, data dir and database, MB"))
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127))


def write_png(report: dict[str, Any], path: Path) -> None:
    """Four panels of curves over time, drawn with Pillow (no browser needed)."""
    all_series = series(report["samples"])
    w, h, pad = 1200, 900, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    panel_h = (h - pad) // len(PANELS)
    t_max = max((p[-1][0] for p in all_series.values() if p), default=1.0) or 1.0
    for k, (metric, title) in enumerate(PANELS):
        top = pad // 2 + k * panel_h
        box = (pad, top + 20, w - 260, top + panel_h - 20)
        names = [n for n in all_series if n.endswith("." + metric)] if metric != "storage" \
            else ["shm_mb", "data_mb", "db_mb"]
        v_max = max((v for n in names for _, v in all_series[n]), default=1.0) or 1.0
        d.rectangle(box, outline=(180, 180, 180))
        d.text((box[0], top + 4), f"{title} (max {v_max:.1f})", fill="black")
        for j, name in enumerate(sorted(names)):
            colour = COLOURS[j % len(COLOURS)]
            pts = [(box[0] + (box[2] - box[0]) * t / t_max,
                    box[3] - (box[3] - box[1]) * v / (v_max * 1.1)) for t, v in all_series[name]]
            if len(pts) > 1:
                d.line(pts, fill=colour, width=2)
            d.text((box[2] + 10, box[1] + 14 * j), name, fill=colour)
    d.text((pad, h - 22), f"seconds (0 … {t_max:.0f})", fill="black")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    path.write_bytes(buf.getvalue())
