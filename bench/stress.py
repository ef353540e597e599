"""``imgpipe stress``: bounded load against a gateway — burst, continuous, chaos.

``burst N``        N submissions at once, then every accepted job followed to its end.
``continuous``     an open-loop stream: ``--rate`` submissions per second for
                   ``--duration`` seconds, on schedule whether or not earlier ones are done
                   (a client that waits for answers would hide the queueing it causes).
``chaos``          the worker-kill scenario against a local stack (see bench/chaos.py).
``soak``           a long open-loop mix (with repeats that hit the result cache) against a
                   local stack, sampling each component's memory, files and threads, shared
                   memory, data-dir bytes and database size (see bench/soak.py).

Every run is bounded in count and time and goes to loopback only unless
``--allow-remote`` is given. It prints the achieved rate, latency percentiles, status
counts and errors, and exits 1 when an accepted job did not finish done, a request
got a 5xx other than 503 (backpressure), or a request went unanswered; a 429 (the
client's own rate or concurrency limit) is counted as a refusal, like a 503.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from imgpipe.bench import load, procs, soak, work
from imgpipe.bench.client import check_target, default_url, is_loopback
from imgpipe.bench.images import generate, parse_size
from imgpipe.core.config import client_headers

MAX_BURST = 10_000
MAX_RATE = 1_000.0
MAX_DURATION_S = 3_600.0
MAX_SOAK_S = 7 * 86_400.0


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help="gateway URL (default $IMGPIPE_URL or "
                   "http://127.0.0.1:8000)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--image", type=Path, help="image file to submit")
    src.add_argument("--size", default="3840x2160", help="generated image size WxH (default 4K)")
    p.add_argument("--ops", default=work.DEFAULT_OPS, help="the chain of every job")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds to wait for every job after the load (default 300)")
    p.add_argument("--json", type=Path, help="write the summary as JSON here")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="imgpipe stress", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="kind", required=True)
    b = sub.add_parser("burst", help="N concurrent submissions, then wait for all")
    b.add_argument("n", type=int, metavar="N")
    b.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --url")
    add_common(b)
    c = sub.add_parser("continuous", help="steady open-loop load")
    c.add_argument("--rate", type=float, required=True, help="submissions per second")
    c.add_argument("--duration", type=float, required=True, help="seconds of load")
    c.add_argument("--max-inflight", type=int, default=64,
                   help="submissions in the air at once; beyond it one is counted as skipped")
    c.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --url")
    add_common(c)
    from imgpipe.bench import chaos

    chaos.add_args(sub.add_parser("chaos", help="kill workers while jobs run (local stack)"))
    s = sub.add_parser("soak", help="a long mixed load, watching every resource for growth")
    s.add_argument("--url", default=None, help="gateway URL of a local stack")
    soak.add_args(s)
    ns = p.parse_args(argv)
    ns.url = (ns.url or default_url()).rstrip("/")
    if ns.kind == "burst" and not 1 <= ns.n <= MAX_BURST:
        p.error(f"N must be 1..{MAX_BURST}")
    if ns.kind in ("continuous", "soak") and not (0 < ns.rate <= MAX_RATE
                                                  and 0 < ns.duration <= MAX_SOAK_S):
        p.error(f"--rate must be in (0, {MAX_RATE:g}] and --duration in (0, {MAX_DURATION_S:g}]")
    if ns.kind == "continuous" and ns.duration > MAX_DURATION_S:
        p.error(f"--duration must be at most {MAX_DURATION_S:g} s (use soak for longer)")
    if ns.timeout <= 0:
        p.error("--timeout must be positive")
    try:
        parse_size(ns.size)
    except ValueError as exc:
        p.error(str(exc))
    if getattr(ns, "image", None) and not ns.image.is_file():
        p.error(f"--image {ns.image}: no such file")
    if ns.kind in ("chaos", "soak") and not is_loopback(ns.url):
        p.error(f"{ns.url} is not loopback: {ns.kind} watches (or kills) local processes, "
                "so it runs against a local stack only")
    if err := check_target(ns.url, getattr(ns, "allow_remote", False)):
        p.error(err)
    return ns


def the_image(ns: argparse.Namespace) -> bytes:
    if getattr(ns, "image", None):
        return bytes(ns.image.read_bytes())
    return generate(1, parse_size(ns.size))[0]


def burst(ns: argparse.Namespace, http: httpx.Client, image: bytes) -> load.LoadSummary:
    t0 = time.monotonic()
    with ThreadPoolExecutor(min(ns.n, 64)) as pool:
        subs = list(pool.map(lambda _: load.submit(http, ns.url, [image], [ns.ops]),
                             range(ns.n)))
    load.follow(http, ns.url, subs, time.monotonic() + ns.timeout)
    return load.LoadSummary(time.monotonic() - t0, subs, 1)


def continuous(ns: argparse.Namespace, http: httpx.Client, image: bytes) -> load.LoadSummary:
    total = max(1, int(ns.rate * ns.duration))
    subs: list[load.Submission] = []
    skipped = 0
    inflight = threading.BoundedSemaphore(ns.max_inflight)
    lock = threading.Lock()

    def one() -> None:
        try:
            s = load.submit(http, ns.url, [image], [ns.ops])
            with lock:
                subs.append(s)
        finally:
            inflight.release()

    t0 = time.monotonic()
    with ThreadPoolExecutor(ns.max_inflight) as pool:
        for i in range(total):
            delay = t0 + i / ns.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if not inflight.acquire(blocking=False):
                skipped += 1
                continue
            pool.submit(one)
    sent_s = time.monotonic() - t0
    load.follow(http, ns.url, subs, time.monotonic() + ns.timeout)
    return load.LoadSummary(time.monotonic() - t0, subs, 1, extra={
        "target_rate_per_s": ns.rate, "achieved_submit_rate_per_s":
        round(len(subs) / sent_s, 2) if sent_s else 0.0, "skipped_client_saturated": skipped})


def print_summary(title: str, summary: dict[str, Any], console: Console) -> None:
    t = Table(title=title, show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    for key, value in summary.items():
        if key == "errors":
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items()) or "–"
        t.add_row(key.replace("_", " "), str(value))
    console.print(t)
    for e in summary.get("errors", []):
        console.print(f"[red]error ×{e['count']}:[/] {e['error']}")


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(list(sys.argv[1:] if argv is None else argv))
    console = Console()
    if ns.kind == "chaos":
        from imgpipe.bench import chaos

        return chaos.run(ns, console)
    if ns.kind == "soak":
        return soak.run(ns, console)
    image = the_image(ns)
    root = procs.stack_root(ns.url)
    limits = httpx.Limits(max_connections=128, max_keepalive_connections=64)
    with httpx.Client(timeout=60.0, limits=limits, headers=client_headers()) as http:
        sampler = procs.RssSampler(root) if root is not None else None
        if sampler:
            sampler.__enter__()
        try:
            result = (burst if ns.kind == "burst" else continuous)(ns, http, image)
        finally:
            if sampler:
                sampler.__exit__(None, None, None)
    summary = result.to_dict()
    if sampler:
        summary["peak_rss_mb_by_role"] = sampler.report()
    title = (f"imgpipe stress burst {ns.n}" if ns.kind == "burst" else
             f"imgpipe stress continuous {ns.rate:g}/s for {ns.duration:g} s") + f" → {ns.url}"
    print_summary(title, summary, console)
    if ns.json:
        ns.json.write_text(json.dumps(summary, indent=2) + "\n")
    if result.failed:
        console.print("[red]FAILED:[/] some accepted job did not finish done, or requests "
                      "failed (see above)")
        return 1
    return 0
