"""A real stack for integration tests: ventilator, sink, workers and gunicorn gateways.

Every component is ``python -m imgpipe <command>`` with the test's settings in its
environment (``settings_env``) and its log in a file; a gateway runs in its own session
so ``kill -9`` can take its whole process tree (master and workers) at once. Readiness
probes fail loudly with the child's log when it dies or never answers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from imgpipe.core.config import Settings
from tests.support import free_port, settings_env


class Stack:
    def __init__(self, settings: Settings, logs: Path) -> None:
        self.settings = settings
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    # --- processes ------------------------------------------------------------------
    def spawn(self, name: str, command: str, *args: str, settings: Settings | None = None,
              session: bool = False) -> subprocess.Popen[bytes]:
        log = self.logs / f"{len(self.procs):02d}-{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "imgpipe", command, *args],
                                    env=settings_env(settings or self.settings),
                                    stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=session)
        self.procs.append((name, proc, log))
        return proc

    def log_of(self, proc: subprocess.Popen[bytes]) -> str:
        for _, p, log in self.procs:
            if p is proc:
                return log.read_text(errors="replace")[-6000:]
        return ""

    def start_pipeline(self, workers: int = 2) -> None:
        self.spawn("ventilator", "ventilator")
        self.spawn("sink", "sink")
        for i in range(workers):
            self.spawn(f"worker{i}", "worker")

    def start_gateway(self, **overrides: Any) -> Gateway:
        s = self.settings.with_overrides(**overrides)
        proc = self.spawn(f"gateway-{s.gateway_port}", "gateway", settings=s, session=True)
        gw = Gateway(self, s, proc)
        gw.wait_ready()
        return gw

    def extra_gateway(self, **overrides: Any) -> Gateway:
        """Another gateway on the same store and pipeline, on a port of its own."""
        port = free_port()
        return self.start_gateway(gateway_port=port, gateway_url=f"http://127.0.0.1:{port}",
                                  **overrides)

    def stop(self) -> None:
        for name, proc, _ in reversed(self.procs):
            if proc.poll() is None:
                if name.startswith("gateway"):
                    _killpg(proc, signal.SIGTERM)
                else:
                    proc.terminate()
        deadline = time.monotonic() + 15
        for name, proc, _ in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                if name.startswith("gateway"):
                    _killpg(proc, signal.SIGKILL)
                else:
                    proc.kill()
                proc.wait(5)


class Gateway:
    """One running ``imgpipe gateway`` and an HTTP client for it."""

    def __init__(self, stack: Stack, settings: Settings, proc: subprocess.Popen[bytes]) -> None:
        self.stack = stack
        self.settings = settings
        self.proc = proc
        self.url = f"http://127.0.0.1:{settings.gateway_port}"
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def fail(self, what: str) -> AssertionError:
        return AssertionError(f"{what}\n--- gateway log ---\n{self.stack.log_of(self.proc)}")

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until ``/openapi.json`` answers 200; fails with the log if the child dies."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self.fail(f"the gateway exited with {self.proc.returncode}")
            try:
                res = self.http.get("/openapi.json", timeout=2)
                if res.status_code == 200:
                    return
                last = res.status_code
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.1)
        raise self.fail(f"the gateway did not answer within {timeout} s (last: {last!r})")

    def wait_healthy(self, timeout: float = 90.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self.fail(f"the gateway exited with {self.proc.returncode}")
            res = self.http.get("/healthz", timeout=10)
            last = res.json()
            if res.status_code == 200:
                return dict(last)
            time.sleep(0.2)
        logs = "\n".join(f"--- {n} ---\n{self.stack.log_of(p)[-1500:]}"
                         for n, p, _ in self.stack.procs if not n.startswith("gateway"))
        raise AssertionError(f"not healthy within {timeout} s: {last}\n{logs}")

    def wait_job(self, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
        """The job document once final (``?wait`` long-polls; re-asked until the deadline)."""
        deadline = time.monotonic() + timeout
        doc: dict[str, Any] = {}
        while time.monotonic() < deadline:
            doc = self.http.get(f"/api/jobs/{job_id}", timeout=10).json()
            if doc.get("state") in ("done", "failed", "partial"):
                return doc
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} not final within {timeout} s: {doc}")

    def kill(self) -> None:
        """``kill -9`` the whole gateway: master and workers."""
        _killpg(self.proc, signal.SIGKILL)
        self.proc.wait(10)

    def close(self) -> None:
        self.http.close()


def _killpg(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
