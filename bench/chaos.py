"""``imgpipe stress chaos``: SIGKILL workers while jobs run, then count every output.

Against a local stack only (the URL must be loopback and its processes visible): jobs
of one image × four chains, each chain a resize to a known size, are submitted
spread over the kill window; every ``--interval`` seconds one live worker from
``/api/workers`` is killed with SIGKILL (the supervisor respawns it), while a prober
hits the API every 100 ms. Then every job is followed to its end and every output
fetched and decoded. Jepsen-style counters: lost (accepted but not done), duplicated
(an output listed twice or counted past the total), wrong size, undecodable. Exit 1
when any is non-zero or the share of answered requests is under ``--min-answered``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from PIL import Image
from rich.console import Console

from imgpipe.bench import client as api
from imgpipe.bench import load, procs
from imgpipe.bench.client import is_loopback
from imgpipe.bench.images import generate, parse_size
from imgpipe.core.config import client_headers

SIZES = ((640, 360), (800, 450), (960, 540), (1280, 720))
PROBE_S = 0.1
RETRY_S = 15.0


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help="local gateway (default $IMGPIPE_URL or "
                   "http://127.0.0.1:8000); loopback only")
    p.add_argument("--kills", type=int, default=4, help="workers to kill (default 4)")
    p.add_argument("--interval", type=float, default=1.5, help="seconds between kills")
    p.add_argument("--outputs", type=int, default=160, help="outputs to submit (default 160)")
    p.add_argument("--size", default="1920x1080", help="input image size WxH")
    p.add_argument("--blur", type=float, default=2.0, help="blur radius in every chain")
    p.add_argument("--timeout", type=float, default=180.0,
                   help="seconds to wait for every job after the kills")
    p.add_argument("--min-answered", type=float, default=0.99,
                   help="share of requests that must be answered (default 0.99)")
    p.add_argument("--json", type=Path, help="write the counters as JSON here")


def chains(blur: float) -> list[str]:
    return [f"resize:w={w},h={h}|blur:radius={blur:g}|encode:format=jpeg,quality=85"
            for w, h in SIZES]


class Prober(threading.Thread):
    """Hits the API every PROBE_S; counts answered (status < 500) and unanswered requests."""

    def __init__(self, url: str, job_ids: list[str]) -> None:
        super().__init__(name="chaos-prober", daemon=True)
        self.url, self.job_ids = url, job_ids
        self.stop = threading.Event()
        self.counts: Counter[str] = Counter()

    def run(self) -> None:
        paths = ["/healthz", "/api/workers", "/api/metrics", "job"]
        with httpx.Client(timeout=2.0, headers=client_headers()) as http:
            i = 0
            while not self.stop.wait(PROBE_S):
                path = paths[i % len(paths)]
                i += 1
                if path == "job":
                    if not self.job_ids:
                        continue
                    path = f"/api/jobs/{self.job_ids[-1]}"
                try:
                    status = http.get(self.url + path).status_code
                except httpx.HTTPError:
                    self.counts["unanswered"] += 1
                    continue
                self.counts["answered" if status < 500 else "unanswered"] += 1
                if path == "/healthz":
                    self.counts["health_ok" if status == 200 else "health_not_ok"] += 1


def kill_one(http: httpx.Client, url: str, root: Any) -> dict[str, Any]:
    """SIGKILL one live worker of this stack (a busy one when there is); what was done."""
    try:
        alive = api.alive_workers(http, url)
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        return {"t": time.monotonic(), "killed": None, "why": f"/api/workers: {exc}"}
    alive.sort(key=lambda w: w.get("state") != "busy")
    for w in alive:
        pid = w.get("pid")
        if isinstance(pid, int) and procs.is_worker_of(pid, root):
            os.kill(pid, signal.SIGKILL)
            return {"t": time.monotonic(), "killed": pid, "worker": w.get("id"),
                    "state": w.get("state")}
    return {"t": time.monotonic(), "killed": None, "why": "no live local worker to kill"}


def kill_loop(url: str, root: Any, kills: int, interval: float, t0: float,
              out: list[dict[str, Any]]) -> None:
    """Kill one worker at t0 + interval, t0 + 2 × interval, …, ``kills`` times.

    When no live worker of this stack is listed (the killed ones are dead, the
    respawned ones not registered yet), it retries for up to RETRY_S before giving up
    on that kill, so a slow respawn delays a kill rather than skipping it.
    """
    with httpx.Client(timeout=5.0, headers=client_headers()) as http:
        for k in range(1, kills + 1):
            time.sleep(max(0.0, t0 + k * interval - time.monotonic()))
            give_up = time.monotonic() + RETRY_S
            while (done := kill_one(http, url, root))["killed"] is None \
                    and time.monotonic() < give_up:
                time.sleep(0.2)
            out.append(done)


def verify(http: httpx.Client, url: str, subs: list[load.Submission], per_job: int,
           ) -> dict[str, int]:
    """Jepsen-style counters over every output of every accepted job."""
    c: Counter[str] = Counter()
    for s in subs:
        if not s.accepted:
            continue
        c["expected"] += per_job
        doc = s.final
        if doc is None:
            c["lost"] += per_job
            continue
        outs = doc.get("outputs", [])
        ns_seen = Counter(o.get("n") for o in outs)
        c["duplicated"] += sum(n - 1 for n in ns_seen.values() if n > 1)
        prog = doc.get("progress", {})
        c["duplicated"] += max(0, int(prog.get("done", 0)) + int(prog.get("failed", 0))
                               - int(prog.get("total", per_job)))
        done = {o["n"]: o for o in outs if o.get("state") == "done"}
        c["lost"] += per_job - len([n for n in range(per_job) if n in done])
        c["failed"] += sum(1 for o in outs if o.get("state") == "failed")
        c["retried"] += sum(1 for o in outs if int(o.get("attempts") or 0) > 1)
        for n, o in done.items():
            want = SIZES[n % len(SIZES)]
            try:
                resp = http.get(url + o["url"], timeout=10.0)
                resp.raise_for_status()
                with Image.open(io.BytesIO(resp.content)) as img:
                    img.load()
                    size = img.size
            except (httpx.HTTPError, OSError) as exc:
                c["undecodable"] += 1
                c["fetch_errors:" + type(exc).__name__] += 1
                continue
            c["done"] += 1
            if size != want:
                c["wrong_size"] += 1
    return dict(c)


def run(ns: argparse.Namespace, console: Console) -> int:
    url = ns.url
    if not is_loopback(url):
        console.print(f"[red]imgpipe stress chaos: {url} is not loopback; chaos kills local "
                      "processes and runs against a local stack only[/]")
        return 2
    if not (1 <= ns.outputs <= 2000 and 0 <= ns.kills <= 50 and 0.1 <= ns.interval <= 60):
        console.print("[red]imgpipe stress chaos: --outputs 1..2000, --kills 0..50, "
                      "--interval 0.1..60[/]")
        return 2
    root = procs.stack_root(url)
    if root is None:
        console.print(f"[red]imgpipe stress chaos: no local process listens on {url}[/]")
        return 2
    specs = chains(ns.blur)
    jobs = math.ceil(ns.outputs / len(specs))
    images = generate(min(4, jobs), parse_size(ns.size), seed=11)
    window = max(ns.kills * ns.interval, 1.0)
    job_ids: list[str] = []
    subs: list[load.Submission] = []
    kills: list[dict[str, Any]] = []
    prober = Prober(url, job_ids)
    with httpx.Client(timeout=30.0, headers=client_headers()) as http:
        start_workers = len(api.alive_workers(http, url))
        t0 = time.monotonic()
        prober.start()
        killer = threading.Thread(target=kill_loop, name="chaos-killer", daemon=True,
                                  args=(url, root, ns.kills, ns.interval, t0, kills))
        killer.start()
        for j in range(jobs):
            time.sleep(max(0.0, t0 + window * j / jobs - time.monotonic()))
            s = load.submit(http, url, [images[j % len(images)]], specs)
            subs.append(s)
            if s.job_id:
                job_ids.append(s.job_id)
        killer.join()
        load.follow(http, url, subs, time.monotonic() + ns.timeout)
        prober.stop.set()
        prober.join()
        wall = time.monotonic() - t0
        counters = verify(http, url, subs, len(specs))
        end_workers = len(api.alive_workers(http, url))
        try:
            sink_dups = api_metrics(http, url).get("duplicates")
        except (httpx.HTTPError, ValueError):
            sink_dups = None
    sub_answered = sum(1 for s in subs if s.status is not None and s.status < 500)
    answered = prober.counts["answered"] + sub_answered
    total = prober.counts["answered"] + prober.counts["unanswered"] + len(subs)
    share = answered / total if total else 0.0
    result: dict[str, Any] = {
        "outputs_submitted": len([s for s in subs if s.accepted]) * len(specs),
        "jobs_submitted": len(subs), "jobs_accepted": len([s for s in subs if s.accepted]),
        "kills": kills, "killed": sum(1 for k in kills if k.get("killed")),
        "workers_before": start_workers, "workers_after": end_workers,
        "counters": {k: counters.get(k, 0) for k in ("expected", "done", "lost", "duplicated",
                                                     "wrong_size", "undecodable", "failed",
                                                     "retried")},
        "sink_duplicates_dropped": sink_dups,
        "requests": {"total": total, "answered": answered, "share": round(share, 4),
                     "health_ok": prober.counts["health_ok"],
                     "health_not_ok": prober.counts["health_not_ok"]},
        "wall_s": round(wall, 2),
    }
    for k in kills:
        k["t"] = round(k["t"] - t0, 2)
    c: dict[str, int] = result["counters"]
    console.print(f"chaos against {url}: {result['jobs_accepted']} job(s), "
                  f"{c['expected']} output(s), {result['killed']}/{ns.kills} worker(s) killed "
                  f"(workers {start_workers} before, {end_workers} after), {wall:.1f} s")
    console.print("  counters: " + ", ".join(f"{k} {v}" for k, v in c.items())
                  + f"; sink dropped {sink_dups} late duplicate(s)")
    console.print(f"  requests answered during it: {answered}/{total} = {100 * share:.2f} % "
                  f"(goal ≥ {100 * ns.min_answered:g} %); /healthz 200 on "
                  f"{prober.counts['health_ok']} of "
                  f"{prober.counts['health_ok'] + prober.counts['health_not_ok']} probes")
    if ns.json:
        ns.json.write_text(json.dumps(result, indent=2) + "\n")
    bad = c["lost"] or c["duplicated"] or c["wrong_size"] or c["undecodable"]
    if bad or share < ns.min_answered:
        console.print("[red]FAILED[/]")
        return 1
    console.print("[green]every output done exactly once[/]")
    return 0


def api_metrics(http: httpx.Client, url: str) -> dict[str, Any]:
    resp = http.get(f"{url}/api/metrics", timeout=5.0)
    resp.raise_for_status()
    return dict(resp.json())
