"""``imgpipe gateway``: the Falcon app under gunicorn, as one process tree.

Why this gunicorn configuration (see docs/gateway.md for the long form):

* **gthread workers** (``gateway_workers`` processes x ``gateway_threads`` threads).
  The work per request is I/O (a streamed upload, SQLite, a short ZeroMQ ask) or
  waiting (``?wait``), never CPU, so threads are cheap and a process crash only takes
  its own requests. gthread parks idle keep-alive and not-yet-sending connections in
  a selector instead of a thread, so idle clients cost no thread at all.
* **Every client socket has a deadline.** gunicorn's own ``timeout`` only restarts a
  worker whose main loop hangs; it does not stop a thread blocked on a client that
  sent half its headers or half its body. :class:`GatewayWorker` gives each client
  socket an I/O timeout of ``gateway_timeout_s`` and the upload reader bounds the
  *whole* body by the same number, so a stalled or trickling client is cut (408 or a
  closed connection) and its thread goes back to the pool.
* ``keepalive`` 5 s: reused connections stay cheap without piling up.

The master does not use :func:`core.runtime.serve`: gunicorn's arbiter owns the
signals (TERM: graceful stop, INT/QUIT: fast stop) and the master never touches
ZeroMQ; each worker makes its own context after the fork (``gateway.pipeline``).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.workers.gthread import ThreadWorker

from imgpipe.core.config import Settings, add_settings_args, settings_from_args
from imgpipe.core.runtime import configure_logging
from imgpipe.gateway.errors import ClientTimeout

log = logging.getLogger(__name__)

FLAGS = ("gateway_port", "gateway_host", "gateway_workers", "gateway_threads",
         "gateway_timeout_s", "data_dir", "intake_endpoint", "event_endpoint",
         "control_endpoint", "bus_endpoint", "dashboard_bus_endpoint", "queue_limit",
         "max_upload_bytes", "max_pixels", "max_wait_s", "metrics_interval_s", "log_level")
KEEPALIVE_S = 5
GRACEFUL_S = 10


class DeadlineSocket(socket.socket):
    """A client socket whose 'blocking' mode is a timeout, so no read or write waits forever.

    gunicorn switches a connection to blocking before it parses a request; here that
    means "blocking for at most ``io_timeout`` seconds per operation".
    """

    io_timeout: float = 30.0
    timed_out: bool = False

    @classmethod
    def adopt(cls, sock: socket.socket, io_timeout: float) -> DeadlineSocket:
        new = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        new.io_timeout = io_timeout
        new.settimeout(0.0)
        return new

    def setblocking(self, flag: bool) -> None:
        self.settimeout(self.io_timeout if flag else 0.0)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        try:
            return super().recv(bufsize, flags)
        except TimeoutError:
            self.timed_out = True
            log.info("client %s sent nothing for %g s: closing", _peer(self), self.gettimeout())
            raise ClientTimeout(errno.ECONNRESET, "client timed out") from None

    def shutdown(self, how: int) -> None:
        # gunicorn's graceful close lingers up to 2 s reading from the peer, on the
        # worker's main loop: N stalled clients would make the worker deaf for 2N s
        # (and get it killed by the arbiter). A client that timed out gets no linger.
        if self.timed_out:
            raise OSError(errno.ENOTCONN, "client timed out: closing without linger")
        super().shutdown(how)


def _peer(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"


class GatewayWorker(ThreadWorker):
    """gunicorn's gthread worker with a deadline on every client socket."""

    io_timeout: float = 30.0  # set from gateway_timeout_s by main(), inherited by the fork

    def enqueue_req(self, conn: Any) -> None:
        if type(conn.sock) is socket.socket:  # not yet adopted (plain TCP, not TLS)
            conn.sock = DeadlineSocket.adopt(conn.sock, self.io_timeout)
        super().enqueue_req(conn)


class GatewayApplication(BaseApplication):  # type: ignore[misc]
    """gunicorn, configured in code: ``imgpipe gateway`` is one process tree."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        for key, value in gunicorn_options(self.settings).items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        # Runs in each worker after the fork: the app, its store connection and its
        # ZeroMQ context all belong to that worker.
        from imgpipe.gateway.app import create_app
        from imgpipe.gateway.pipeline import Pipeline

        configure_logging(self.settings, "gateway")
        pipeline = Pipeline(self.settings)
        app = create_app(self.settings, pipeline=pipeline)
        pipeline.start()
        return app


def gunicorn_options(s: Settings) -> dict[str, Any]:
    """The gunicorn settings ``imgpipe gateway`` runs with."""
    return {
        "bind": [f"{s.gateway_host}:{s.gateway_port}"],
        "workers": s.gateway_workers,
        "worker_class": "imgpipe.gateway.service.GatewayWorker",
        "threads": s.gateway_threads,
        "worker_connections": 1000,
        "timeout": max(30, int(s.gateway_timeout_s) + 5),
        "graceful_timeout": GRACEFUL_S,
        "keepalive": KEEPALIVE_S,
        "proc_name": "imgpipe-gateway",
        "loglevel": s.log_level.lower(),
        "errorlog": "-",
        "accesslog": None,
        "preload_app": False,
        "control_socket_disable": True,  # one gunicorn.ctl per user would clash
        "child_exit": _child_exit,
    }


def _child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(worker.pid)


def _prometheus_dir() -> Path | None:
    """A fresh multiprocess dir for this master; stale ones of dead masters removed.

    Local temp space, not the data dir: gateways in several containers may share the
    data dir and have the same pid.
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    root = Path(tempfile.gettempdir()) / f"imgpipe-prometheus-{os.getuid()}"
    root.mkdir(parents=True, exist_ok=True)
    for old in root.iterdir():
        if old.name.isdigit() and not _alive(int(old.name)):
            shutil.rmtree(old, ignore_errors=True)
    mine = root / str(os.getpid())
    shutil.rmtree(mine, ignore_errors=True)
    mine.mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(mine)
    return mine


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imgpipe gateway",
                                     description="Run the HTTP gateway under gunicorn.")
    add_settings_args(parser, *FLAGS)
    settings = settings_from_args(parser.parse_args(list(argv or [])))
    configure_logging(settings, "gateway")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    prom = _prometheus_dir()
    GatewayWorker.io_timeout = settings.gateway_timeout_s
    log.info("gateway on http://%s:%d (%d workers x %d threads)", settings.gateway_host,
             settings.gateway_port, settings.gateway_workers, settings.gateway_threads)
    try:
        GatewayApplication(settings).run()
    finally:
        if prom is not None:
            shutil.rmtree(prom, ignore_errors=True)
    return 0
