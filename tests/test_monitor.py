"""`imgpipe metrics` and `imgpipe monitor`: formatting, and the HTTP side against a server."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from rich.console import Console

from imgpipe import monitor
from tests.support import free_port

WORKERS = [
    {"id": "w-alpha", "host": "node1", "pid": 101, "state": "busy", "cpu": 97.5,
     "rss": 150 * 2**20, "done": 12, "last_beat_age_s": 0.4},
    {"id": "w-beta", "host": "node2", "pid": 202, "state": "idle", "cpu": 1.0,
     "rss": 90 * 2**20, "done": 3, "last_beat_age_s": 0.9},
    {"id": "w-gamma", "host": "node2", "pid": 303, "state": "lost", "cpu": 0.0,
     "rss": 80 * 2**20, "done": 1, "last_beat_age_s": 7.2},
]
BUSY = {"queue_depth": 44, "in_flight": 4, "throughput_per_s": 2.0, "retries": 1,
        "failures": 0, "latency_ms": {"p50": 850.0, "p95": 1900.0, "p99": 2300.0},
        "workers": {"alive": 2, "busy": 2, "idle": 0, "lost": 1}}


class Gateway:
    """An HTTP server on 127.0.0.1 answering /api/workers and /api/metrics from dicts."""

    def __init__(self) -> None:
        self.workers: Any = {"workers": WORKERS}
        self.metrics: dict[str, Any] = dict(BUSY)
        self.hits: list[str] = []
        gw = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                gw.hits.append(self.path)
                body = {"/api/workers": gw.workers, "/api/metrics": gw.metrics}.get(self.path)
                data = json.dumps(body).encode()
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    gw = Gateway()
    gw.thread.start()
    yield gw
    gw.server.shutdown()
    gw.server.server_close()
    gw.thread.join(5)


def test_format_fleet_lists_workers_totals_and_advice() -> None:
    text = monitor.format_fleet(WORKERS, BUSY, "http://gw:8000")
    lines = text.splitlines()
    assert lines[0] == ("imgpipe fleet at http://gw:8000 — 2 worker(s) alive: 2 busy, 0 idle, "
                        "1 lost")
    assert lines[1].split() == " ".join(monitor.HEADERS).split()
    assert lines[2].split() == ["w-alpha", "node1", "101", "busy", "97.5", "150.0", "12",
                                "0.4", "s", "ago"]
    assert "queue 44 · in flight 4 · throughput 2.0/s" in text
    assert "p50 850 ms, p95 1.9 s, p99 2.3 s" in text
    assert lines[-1].startswith("recommendation: SCALE_UP → ")
    assert "100% of 2 workers busy with 44 queued" in lines[-1]


def test_the_gateways_recommendation_wins_when_given() -> None:
    given = {"action": "MAINTAIN", "reason": "operator says so", "workers": 2}
    text = monitor.format_fleet([], dict(BUSY, recommendation=given))
    assert text.splitlines()[-1] == "recommendation: MAINTAIN → 2 worker(s) — operator says so"
    assert "(no worker has sent a heartbeat)" in text


@pytest.mark.parametrize(("values", "line"), [
    ([], ""), ([0, 0], "▁▁"), ([0, 1, 2, 4, 8], "▁▂▃▅█"), ([3.0], "█")])
def test_sparkline(values: list[float], line: str) -> None:
    assert monitor.sparkline(values) == line


def test_render_draws_every_worker() -> None:
    console = Console(record=True, width=140, file=io.StringIO())
    console.print(monitor.render(WORKERS, BUSY, url="http://gw", history=[1.0, 2.0]))
    out = console.export_text()
    for w in WORKERS:
        assert w["id"] in out
    assert "recommendation: SCALE_UP" in out and "throughput ▅█" in out


def test_metrics_command_reads_the_gateway(gateway: Gateway,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert monitor.main_metrics(["--url", gateway.url]) == 0
    out = capsys.readouterr().out
    assert "w-alpha" in out and "w-gamma" in out and "SCALE_UP" in out
    gateway.workers = WORKERS                    # a bare list is accepted too
    gateway.metrics = {"queue_depth": 0, "throughput_per_s": 0.0,
                       "workers": {"alive": 3, "busy": 0, "idle": 3, "lost": 0}}
    assert monitor.main_metrics(["--url", gateway.url, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["recommendation"]["action"] == "SCALE_DOWN"
    assert [w["id"] for w in doc["workers"]] == ["w-alpha", "w-beta", "w-gamma"]


def test_monitor_runs_bounded_and_refreshes(gateway: Gateway) -> None:
    out = io.StringIO()
    console = Console(file=out, width=140, force_terminal=False)
    assert monitor.main_monitor(["--url", gateway.url, "--count", "3", "--interval", "0.1"],
                                console=console) == 0
    assert gateway.hits == ["/api/workers", "/api/metrics"] * 3
    assert "w-beta" in out.getvalue()


def test_unreachable_gateway_is_one_line_and_status_1() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for command in ("metrics", "monitor"):
        proc = subprocess.run([sys.executable, "-m", "imgpipe", command, "--timeout", "2"],
                              env={"IMGPIPE_URL": url, "PATH": "/usr/bin:/bin"},
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1, proc
        assert proc.stdout == ""
        [line] = proc.stderr.strip().splitlines()
        assert line.startswith(f"imgpipe {command}: gateway not reachable at {url}")


def test_wrong_answers_are_reported(gateway: Gateway) -> None:
    gateway.metrics = None  # type: ignore[assignment]       # the server answers 404
    with pytest.raises(monitor.Unreachable, match="answered 404 to /api/metrics"):
        monitor.fetch(gateway.url)
