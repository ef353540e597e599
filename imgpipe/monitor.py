"""``imgpipe metrics`` (the fleet once) and ``imgpipe monitor`` (live, rich) in a terminal.

Both read the gateway's ``GET /api/workers`` and ``GET /api/metrics`` over HTTP, so
they work against any stack they can reach: ``--url``, else ``IMGPIPE_URL``, else
``http://127.0.0.1:8000``. An unreachable gateway is one clear line and exit status 1.
The recommendation is the gateway's when it sends one, else ``core.advice.recommend``
on the same numbers. Formatting is pure (``format_fleet``, ``render``) and tested
without a terminal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from imgpipe.core.advice import SCALE_DOWN, SCALE_UP, recommend
from imgpipe.core.config import client_headers

DEFAULT_URL = "http://127.0.0.1:8000"
SPARK = "▁▂▃▄▅▆▇█"
STATE_STYLE = {"busy": "bold dark_orange", "idle": "green", "lost": "dim strike"}


class Unreachable(Exception):
    """The gateway did not answer, or answered something other than the API."""


def default_url(environ: dict[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return env.get("IMGPIPE_URL") or DEFAULT_URL


def fetch(url: str, timeout: float = 3.0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(workers, metrics) from the gateway at ``url``; raises Unreachable."""
    base = url.rstrip("/")
    out: list[Any] = []
    try:
        with httpx.Client(timeout=timeout, headers=client_headers()) as client:
            for path in ("/api/workers", "/api/metrics"):
                resp = client.get(base + path)
                if resp.status_code != 200:
                    raise Unreachable(f"gateway at {url} answered {resp.status_code} to {path}")
                out.append(resp.json())
    except httpx.HTTPError as exc:
        raise Unreachable(f"gateway not reachable at {url} ({type(exc).__name__}); start the "
                          "stack with `imgpipe up` or pass --url / IMGPIPE_URL") from None
    except ValueError:
        raise Unreachable(f"gateway at {url} did not answer JSON") from None
    workers, metrics = out
    if isinstance(workers, dict):
        workers = workers.get("workers", [])
    if not isinstance(workers, list) or not isinstance(metrics, dict):
        raise Unreachable(f"gateway at {url} answered an unexpected shape")
    return [w for w in workers if isinstance(w, dict)], metrics


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _get(d: dict[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if d.get(name) is not None:
            return d[name]
    return default


def worker_row(w: dict[str, Any]) -> list[str]:
    """id, host, pid, state, cpu %, rss MB, done, last beat — as text cells."""
    age = _get(w, "last_beat_age_s", "last_heartbeat_age_s", "age_s")
    rss = _get(w, "rss", "rss_bytes", default=0) or 0
    return [str(_get(w, "id", "worker", default="?")), str(w.get("host", "")),
            str(w.get("pid", "")), str(w.get("state", "?")),
            f"{float(w.get('cpu') or 0):.1f}", f"{rss / 2**20:.1f}",
            str(_get(w, "done", "tasks_done", default=0)),
            f"{float(age):.1f} s ago" if isinstance(age, (int, float)) else "-"]


HEADERS = ["ID", "HOST", "PID", "STATE", "CPU%", "RSS MB", "DONE", "LAST BEAT"]


def advice_of(metrics: dict[str, Any]) -> dict[str, Any]:
    given = metrics.get("recommendation")
    if isinstance(given, dict) and {"action", "reason", "workers"} <= set(given):
        return given
    return recommend(metrics)


def _ms(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value / 1000:.1f} s" if value >= 1000 else f"{value:.0f} ms"


def summary_line(metrics: dict[str, Any]) -> str:
    lat = _dict(metrics.get("latency_ms"))
    return (f"queue {metrics.get('queue_depth', 0)} · in flight "
            f"{_get(metrics, 'in_flight', 'inflight', default=0)} · throughput "
            f"{float(metrics.get('throughput_per_s') or 0):.1f}/s · latency p50 "
            f"{_ms(lat.get('p50'))}, p95 {_ms(lat.get('p95'))}, p99 {_ms(lat.get('p99'))}"
            f" · retries {metrics.get('retries', 0)} · failed "
            f"{_get(metrics, 'failures', 'failed', default=0)}")


def fleet_line(workers: list[dict[str, Any]], metrics: dict[str, Any]) -> str:
    fleet = _dict(metrics.get("workers"))
    states = [str(w.get("state")) for w in workers]
    alive = fleet.get("alive", sum(s != "lost" for s in states))
    return (f"{alive} worker(s) alive: {fleet.get('busy', states.count('busy'))} busy, "
            f"{fleet.get('idle', states.count('idle'))} idle, "
            f"{fleet.get('lost', states.count('lost'))} lost")


def format_fleet(workers: list[dict[str, Any]], metrics: dict[str, Any], url: str = "") -> str:
    """The plain-text report of ``imgpipe metrics``."""
    rows = [HEADERS] + [worker_row(w) for w in workers]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADERS))]
    lines = [f"imgpipe fleet{' at ' + url if url else ''} — {fleet_line(workers, metrics)}"]
    lines += ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    if not workers:
        lines.append("(no worker has sent a heartbeat)")
    lines.append(summary_line(metrics))
    advice = advice_of(metrics)
    lines.append(f"recommendation: {advice['action']} → {advice['workers']} worker(s) — "
                 f"{advice['reason']}")
    return "\n".join(lines)


def sparkline(values: Sequence[float]) -> str:
    if not values:
        return ""
    top = max(values) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int(v / top * (len(SPARK) - 1) + 0.5))]
                   for v in values)


def render(workers: list[dict[str, Any]], metrics: dict[str, Any], *, url: str = "",
           history: Sequence[float] = (), error: str = "") -> Group:
    """The live view of ``imgpipe monitor``: fleet table, totals, advice."""
    table = Table(title=f"imgpipe fleet — {fleet_line(workers, metrics)}", title_justify="left",
                  expand=False, header_style="bold")
    for h in HEADERS:
        table.add_column(h, justify="right" if h in ("PID", "CPU%", "RSS MB", "DONE") else "left")
    for w in workers:
        cells = worker_row(w)
        table.add_row(*cells, style=STATE_STYLE.get(cells[3], ""))
    advice = advice_of(metrics)
    colour = {SCALE_UP: "bold red", SCALE_DOWN: "bold blue"}.get(advice["action"], "bold green")
    parts: list[Any] = [table, Text(summary_line(metrics))]
    if history:
        parts.append(Text(f"throughput {sparkline(history)}  (last {len(history)} s)"))
    parts.append(Text.assemble(("recommendation: ", "bold"), (advice["action"], colour),
                               f" → {advice['workers']} worker(s) — {advice['reason']}"))
    foot = f"{url} · {time.strftime('%H:%M:%S')} · Ctrl-C to quit"
    parts.append(Text(error or foot, style="bold red" if error else "dim"))
    return Group(*parts)


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--url", default=None,
                   help=f"gateway URL (env IMGPIPE_URL, default {DEFAULT_URL})")
    p.add_argument("--timeout", type=float, default=3.0, help="HTTP timeout, seconds")
    return p


def _first_fetch(prog: str, ns: argparse.Namespace
                 ) -> tuple[str, list[dict[str, Any]], dict[str, Any]] | None:
    """The gateway's URL, workers and metrics; None (said on stderr) when unreachable."""
    url = ns.url or default_url()
    try:
        workers, metrics = fetch(url, ns.timeout)
    except Unreachable as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return None
    return url, workers, metrics


def main_metrics(argv: Sequence[str]) -> int:
    parser = _parser("imgpipe metrics")
    parser.add_argument("--json", action="store_true", help="print the raw JSON instead")
    ns = parser.parse_args(list(argv))
    if (first := _first_fetch("imgpipe metrics", ns)) is None:
        return 1
    url, workers, metrics = first
    if ns.json:
        print(json.dumps({"workers": workers, "metrics": metrics,
                          "recommendation": advice_of(metrics)}, indent=2))
    else:
        print(format_fleet(workers, metrics, url))
    return 0


def main_monitor(argv: Sequence[str], *, console: Console | None = None) -> int:
    parser = _parser("imgpipe monitor")
    parser.add_argument("--interval", type=float, default=1.0, help="refresh period, seconds")
    parser.add_argument("--count", type=int, default=0, help="stop after N refreshes (0: never)")
    ns = parser.parse_args(list(argv))
    if (first := _first_fetch("imgpipe monitor", ns)) is None:
        return 1
    url, workers, metrics = first
    history: deque[float] = deque(maxlen=60)
    history.append(float(metrics.get("throughput_per_s") or 0))
    shown = 1
    try:
        with Live(render(workers, metrics, url=url, history=history), console=console,
                  refresh_per_second=4, transient=False) as live:
            while not (ns.count and shown >= ns.count):
                time.sleep(max(ns.interval, 0.1))
                error = ""
                try:
                    workers, metrics = fetch(url, ns.timeout)
                    history.append(float(metrics.get("throughput_per_s") or 0))
                except Unreachable as exc:
                    error = f"{exc} — retrying, last data from before {time.strftime('%H:%M:%S')}"
                live.update(render(workers, metrics, url=url, history=history, error=error))
                shown += 1
    except KeyboardInterrupt:
        pass
    return 0
