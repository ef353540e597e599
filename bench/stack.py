"""A private local stack for one bench run: ``imgpipe up`` as a child process.

Its ZeroMQ endpoints are ipc:// sockets under a fresh short directory and its HTTP
port is a free one, so it never collides with a stack someone else runs on the
default ports. Ready means ``/healthz`` answers 200 and the wanted number of workers
are listed alive in ``/api/workers``; a stack that exits while starting fails loudly
with the tail of its log. It dies with the bench (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from imgpipe.bench import client as api
from imgpipe.core.config import client_headers
from imgpipe.core.runtime import die_with_parent

ENDPOINTS = ("intake", "light_task", "heavy_task", "result", "event", "control", "bus")


class StackError(RuntimeError):
    """The local stack did not start or did not become ready in time."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalStack:
    """``imgpipe up --workers N --no-dashboard`` on private endpoints; a context manager."""

    def __init__(self, workers: int, *, data_dir: Path | None = None,
                 extra_env: dict[str, str] | None = None) -> None:
        self.workers = workers
        self.root = Path(tempfile.mkdtemp(prefix="ipb-", dir="/tmp"))
        self.data_dir = data_dir or self.root / "data"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.root / "stack.log"
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMGPIPE_")}
        for name in ENDPOINTS:
            env[f"IMGPIPE_{name.upper()}_ENDPOINT"] = f"ipc://{self.root}/{name}"
        env["IMGPIPE_DASHBOARD_BUS_ENDPOINT"] = ""
        env["IMGPIPE_GATEWAY_URL"] = self.url
        env["IMGPIPE_LOG_LEVEL"] = "WARNING"
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 90.0) -> LocalStack:
        argv = [sys.executable, "-P", "-m", "imgpipe", "up", "--workers", str(self.workers),
                "--no-dashboard", "--data", str(self.data_dir), "--port", str(self.port)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, env=self.env(), stdout=log,
                                         stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        self.wait_ready(self.workers, timeout)
        return self

    def wait_ready(self, workers: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        seen = 0
        with httpx.Client(headers=client_headers()) as http:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise StackError(f"imgpipe up exited with {self.proc.returncode}:\n"
                                     + self.log_tail())
                if api.healthy(http, self.url):
                    try:
                        seen = len(api.alive_workers(http, self.url))
                    except (httpx.HTTPError, ValueError, KeyError, TypeError):
                        seen = 0
                    if seen >= workers:
                        return
                time.sleep(0.2)
        raise StackError(f"stack at {self.url} not ready with {workers} worker(s) in "
                         f"{timeout:.0f} s (saw {seen}):\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace: float = 20.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
