"""The local stack: ``imgpipe up`` runs every component as a child process.

The supervisor starts the ventilator, the sink, the gateway, N workers and the
dashboard; restarts any child that dies (with a backoff, so a crash loop does not
spin); answers ``scale`` and ``status`` requests on a small control socket whose
address it writes to ``<data dir>/supervisor.json`` (that is how ``imgpipe scale N``
and the dashboard find it); and on Ctrl-C or SIGTERM stops everything: SIGTERM to
every child, SIGKILL to whatever is still alive after a grace period, the shared
memory of every worker swept; it returns only when every descendant is gone. Children run in their own session (a terminal's
Ctrl-C reaches only the supervisor, which stops them in order) and get
``PR_SET_PDEATHSIG`` so they die with a supervisor killed by SIGKILL.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import zmq

from imgpipe.core import keys
from imgpipe.core.advice import Autoscaler
from imgpipe.core.config import (
    Settings,
    add_settings_args,
    client_headers,
    parse_range,
    reachable_host,
    redact,
    settings_from_args,
)
from imgpipe.core.control import SUPERVISOR_FILE, Unavailable, ask, supervisor_endpoint
from imgpipe.core.errors import ImgpipeError
from imgpipe.core.protocol import Reply, Request, decode, encode
from imgpipe.core.runtime import configure_logging, die_with_parent
from imgpipe.core.sockets import bound_endpoint, make_socket
from imgpipe.gateway.access import check_exposure, load_keys

log = logging.getLogger(__name__)

GRACE_S = 10.0          # SIGTERM -> SIGKILL
BACKOFF_MAX_S = 10.0    # longest wait before restarting a child that keeps dying
STABLE_S = 30.0         # a child alive this long resets its backoff
REAP_S = 5.0            # after the children: how long their own children get to exit


def child_argv(role: str) -> list[str]:
    """``python -P -m imgpipe ROLE``. ``-P`` keeps the working directory off ``sys.path``:
    run from a folder that has its own ``core/`` or ``gateway/``, a child still imports
    imgpipe's."""
    return [sys.executable, "-P", "-m", "imgpipe", role]


@dataclass
class Child:
    """One supervised process: its role, its process, and its restart bookkeeping."""

    role: str
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float = 0.0
    retired: bool = False
    history: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Supervisor:
    """Owns the children. ``tick()`` does one round of checks; ``run()`` loops it."""

    def __init__(self, settings: Settings, *, workers: int, dashboard: bool = True,
                 autoscale: tuple[int, int] | None = None) -> None:
        self.settings = settings
        self.env = {**os.environ, **settings.to_env()}
        # The children that call the gateway (the dashboard) send IMGPIPE_API_KEY: with
        # keys on and none given, they use one of the stack's own.
        auth = self._gateway_headers().get("Authorization", "")
        if auth and not self.env.get("IMGPIPE_API_KEY"):
            self.env["IMGPIPE_API_KEY"] = auth.removeprefix("Bearer ")
        self.children: list[Child] = []
        self.dashboard = dashboard
        self.autoscale = autoscale
        self._worker_seq = 0
        self._scaler: Any = None
        for role in ("ventilator", "sink", "gateway"):
            self.children.append(Child(role, role, self._argv(role)))
        if dashboard:
            self.children.append(Child("dashboard", "dashboard", self._argv("dashboard")))
        self.set_workers(workers)

    # --- children -------------------------------------------------------------------
    def _argv(self, role: str) -> list[str]:
        return child_argv(role)

    def workers(self) -> list[Child]:
        return [c for c in self.children if c.role == "worker" and not c.retired]

    def set_workers(self, n: int) -> int:
        """Grow or shrink to ``n`` workers (newest retire first); returns the new count."""
        n = max(0, n)
        current = self.workers()
        for child in current[n:]:
            child.retired = True
            self._terminate(child)
        for _ in range(n - len(current)):
            self._worker_seq += 1
            self.children.append(Child("worker", f"worker-{self._worker_seq}",
                                       self._argv("worker")))
        return len(self.workers())

    def _spawn(self, child: Child, now: float) -> None:
        child.proc = subprocess.Popen(child.argv, env=self.env, start_new_session=True,
                                      preexec_fn=die_with_parent)
        child.started = now
        child.history.append(child.proc.pid)
        log.info("started %s (pid %d)", child.name, child.proc.pid)

    def _terminate(self, child: Child) -> None:
        if child.alive():
            assert child.proc is not None
            child.proc.send_signal(signal.SIGTERM)

    def tick(self, now: float | None = None) -> None:
        """Start what should run, restart what died, reap what retired."""
        now = time.monotonic() if now is None else now
        for child in list(self.children):
            if child.proc is not None and child.proc.poll() is not None:
                code = child.proc.returncode
                pid = child.proc.pid
                self._after_exit(child, pid)
                child.proc = None
                if child.retired:
                    self.children.remove(child)
                    continue
                child.failures = 0 if now - child.started > STABLE_S else child.failures + 1
                delay = min(BACKOFF_MAX_S, 0.25 * (2 ** child.failures)) if child.failures else 0
                child.restart_at = now + delay
                log.warning("%s (pid %d) exited with %s; restarting in %.1f s",
                            child.name, pid, code, delay)
            if child.proc is None and not child.retired and now >= child.restart_at:
                self._spawn(child, now)

    def _after_exit(self, child: Child, pid: int) -> None:
        if child.role == "worker":
            from imgpipe.workers.shm import sweep

            swept = sweep(pid, self.settings.shm_dir)
            if swept:
                log.info("swept %d shared-memory segment(s) of %s", swept, child.name)

    def stop(self) -> None:
        """SIGTERM everyone, wait up to GRACE_S, SIGKILL the rest, sweep worker memory.

        Returns only when every descendant is gone: a child's own children (gunicorn's
        workers, a worker's filter processes, Streamlit's) may outlive it by a moment,
        so they are waited for too, then killed past REAP_S."""
        family = _descendants()
        for child in self.children:
            child.retired = True
            self._terminate(child)
        deadline = time.monotonic() + GRACE_S
        for child in self.children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s: SIGKILL", child.name, GRACE_S)
                child.proc.kill()
                child.proc.wait()
        sessions = {pid for child in self.children for pid in child.history}
        _reap(family, sessions)
        for child in self.children:
            if child.role == "worker":
                for pid in child.history:
                    self._after_exit(child, pid)

    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "workers": len(self.workers()),
            "children": [{"name": c.name, "role": c.role, "pid": c.pid, "alive": c.alive(),
                          "restarts": max(0, len(c.history) - 1)} for c in self.children],
        }

    # --- control ----------------------------------------------------------------------
    def handle(self, req: Request) -> Reply:
        """One control request, no sockets involved."""
        if req.op == "status":
            return Reply(ok=True, data=self.status())
        if req.op == "scale":
            n = req.args.get("workers")
            if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= 64:
                return Reply(ok=False, error="scale needs 'workers': a whole number 0..64")
            count = self.set_workers(n)
            if self._scaler is not None:
                self._scaler.current = count  # a person's decision resets the autoscaler
            return Reply(ok=True, data={"workers": count})
        return Reply(ok=False, error=f"unknown op {req.op!r}: use status or scale")

    def run(self, ctx: zmq.Context[Any], stop: threading.Event) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        run_dir = control_dir(self.settings.data_dir)
        ctl = make_socket(ctx, zmq.ROUTER, self.settings, bind=f"ipc://{run_dir}/control")
        info_path = self.settings.data_dir / SUPERVISOR_FILE
        try:
            endpoint = bound_endpoint(ctl)
            info_path.write_text(json.dumps({"control": endpoint, "pid": os.getpid()}))
            self.tick()
            self._announce(endpoint)
            next_scale = time.monotonic() + 1.0
            while not stop.is_set():
                if ctl.poll(200, zmq.POLLIN):
                    self._serve_one(ctl)
                self.tick()
                if self.autoscale and time.monotonic() >= next_scale:
                    next_scale = time.monotonic() + 1.0
                    self._autoscale_step()
        finally:
            ctl.close(linger=0)
            info_path.unlink(missing_ok=True)
            shutil.rmtree(run_dir, ignore_errors=True)
            self.stop()

    def _serve_one(self, ctl: zmq.Socket[Any]) -> None:
        frames = ctl.recv_multipart()
        envelope, body = frames[:-1], frames[-1:]
        try:
            req = decode(body, expect=Request)
            reply = self.handle(req)
        except ImgpipeError as exc:
            reply = Reply(ok=False, error=exc.detail)
        except Exception as exc:  # noqa: BLE001 - no request stops the stack
            log.exception("error handling a control request")
            reply = Reply(ok=False, error=f"internal error: {type(exc).__name__}")
        ctl.send_multipart([*envelope, *encode(reply)])

    def _gateway_headers(self) -> dict[str, str]:
        """``IMGPIPE_API_KEY`` if set, else the stack's first API key (the autoscaler
        reads ``/api/metrics``, which needs one when the gateway has keys)."""
        headers = client_headers()
        if not headers and self.settings.api_keys:
            keys = sorted(load_keys(self.settings.api_keys))
            if keys:
                headers = {"Authorization": f"Bearer {keys[0]}"}
        return headers

    def _autoscale_step(self) -> None:
        assert self.autoscale is not None
        if self._scaler is None:
            self._scaler = Autoscaler(*self.autoscale, current=len(self.workers()))
        try:
            metrics = httpx.get(f"{self.settings.gateway_url}/api/metrics", timeout=2.0,
                                headers=self._gateway_headers()).json()
        except (httpx.HTTPError, ValueError):
            return
        target = self._scaler.observe(metrics, time.monotonic())
        if target is not None and target != len(self.workers()):
            log.info("autoscale: %d -> %d workers (%s)", len(self.workers()), target,
                     metrics.get("recommendation", {}).get("reason", ""))
            self.set_workers(target)

    def _announce(self, control: str) -> None:
        s = self.settings
        lines = [
            f"imgpipe up: {len(self.workers())} worker(s), data in {s.data_dir.resolve()}",
            f"  gateway     http://{s.gateway_host}:{s.gateway_port}/  (API, /healthz, /metrics)",
        ]
        if self.dashboard:
            lines.append(f"  dashboard   http://{s.gateway_host}:{s.dashboard_port}/")
        lines += [
            f"  tasks       {s.light_task_endpoint} (light), {s.heavy_task_endpoint} (heavy)",
            f"  results     {s.result_endpoint}   events {s.event_endpoint}",
            f"  control     {s.control_endpoint} (ventilator), {control} (this supervisor)",
            f"  bus         {', '.join(s.bus_endpoints)}",
            f"  job store   {redact(s.store_url) or s.data_dir / 'jobs.sqlite3'}",
            "  scale with: imgpipe scale N" + (f" --data {s.data_dir}"
                                              if str(s.data_dir) != "data" else ""),
            "  stop with Ctrl-C",
        ]
        print("\n".join(lines), flush=True)


def control_dir(data_dir: Path) -> Path:
    """A fresh 0700 folder for the control socket: ``<data>/run`` when its ipc:// path
    fits the kernel's limit (about 100 bytes), else a private temp folder. Only this
    user can reach the socket; nothing listens on the network."""
    candidate = data_dir.resolve() / "run"
    if len(f"{candidate}/control") < 100:
        shutil.rmtree(candidate, ignore_errors=True)
        candidate.mkdir(mode=0o700)
        candidate.chmod(0o700)
        return candidate
    return Path(tempfile.mkdtemp(prefix="imgpipe-ctl-"))


def _descendants() -> list[psutil.Process]:
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _still_running(family: list[psutil.Process], sessions: set[int]) -> list[psutil.Process]:
    """Who of ``family``, or of any process in one of ``sessions`` (each child leads its
    own), still runs. Zombies count as gone: their parent, not us, must reap them."""
    found = {p.pid: p for p in family}
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if p.pid != os.getpid() and os.getsid(p.pid) in sessions:
                found.setdefault(p.pid, p)
    alive = []
    for p in found.values():
        with contextlib.suppress(psutil.Error):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
    return alive


def _reap(family: list[psutil.Process], sessions: set[int]) -> None:
    """Wait up to REAP_S for the rest of the process tree to exit, then SIGKILL it."""
    deadline = time.monotonic() + REAP_S
    while (left := _still_running(family, sessions)) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling processes that are not our children: no event to wait on
    for p in left:
        log.warning("pid %d outlived its parent by %.0f s: SIGKILL", p.pid, REAP_S)
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(left, timeout=2.0)


def main_up(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="imgpipe up", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings_args(parser, "workers", "data_dir", "store_url", "gateway_port", "dashboard_port",
                      "gateway_host", "autoscale", "worker_processes", "log_level")
    parser.add_argument("--no-dashboard", action="store_true", help="do not start the dashboard")
    parser.add_argument("--insecure", action="store_const", const=True, default=None,
                        help="serve beyond loopback without API keys (env IMGPIPE_INSECURE=1)")
    ns = parser.parse_args(argv)
    settings = settings_from_args(ns)
    try:
        check_exposure(settings)
    except ImgpipeError as exc:
        print(f"imgpipe up: {exc.detail}", file=sys.stderr)
        return 2
    if ns.gateway_port is not None and "IMGPIPE_GATEWAY_URL" not in os.environ:
        host = reachable_host(settings.gateway_host)
        settings = settings.with_overrides(gateway_url=f"http://{host}:{settings.gateway_port}")
    configure_logging(settings, "supervisor")
    if not (keys.is_loopback(settings.bind_host) or settings.insecure
            or keys.resolve(settings) is not None):
        folder = keys.write(settings.data_dir)
        print(f"imgpipe up: the ZeroMQ ports bind on {settings.bind_host!r}: made CURVE keys in "
              f"{folder}; remote workers need server.key and a client pair", flush=True)
    autoscale = parse_range(settings.autoscale) if settings.autoscale else None
    workers = settings.workers
    if autoscale:
        workers = min(max(workers, autoscale[0]), autoscale[1])
    sup = Supervisor(settings, workers=workers, dashboard=not ns.no_dashboard,
                     autoscale=autoscale)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %s: stopping the stack", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    ctx = zmq.Context()
    try:
        sup.run(ctx, stop)
    finally:
        ctx.term()
    print("imgpipe up: stopped", flush=True)
    return 0


def main_scale(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="imgpipe scale",
                                     description="Set the running local stack to N workers.")
    parser.add_argument("n", type=int, metavar="N", help="worker count (0..64)")
    add_settings_args(parser, "data_dir")
    ns = parser.parse_args(argv)
    settings = settings_from_args(ns)
    endpoint = supervisor_endpoint(settings.data_dir)
    if endpoint is None:
        print(f"imgpipe scale: no local stack runs on {settings.data_dir} "
              f"(no {SUPERVISOR_FILE}); start one with `imgpipe up`", file=sys.stderr)
        return 1
    ctx = zmq.Context()
    try:
        data = ask(ctx, settings, "scale", {"workers": ns.n}, endpoint=endpoint, timeout=5.0)
    except (Unavailable, ImgpipeError) as exc:
        print(f"imgpipe scale: {exc}", file=sys.stderr)
        return 1
    finally:
        ctx.term()
    print(f"imgpipe scale: {data['workers']} worker(s)")
    return 0

