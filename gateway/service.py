"""``imgpipe gateway``: the Falcon app under gunicorn, as one process tree.

Why this gunicorn configuration (see docs/gateway.md for the long form):

* **gthread workers** (``gateway_workers`` processes x ``gateway_threads`` threads).
  The work per request is I/O (a streamed upload, SQLite, a short ZeroMQ ask) or
  waiting (``?wait``), never CPU, so threads are cheap and a process crash only takes
  its own requests. gthread parks idle keep-alive and not-yet-sending connections in
  a selector instead of a thread, so idle clients cost no thread at all.
* **A request head costs no thread until it is complete.** Stock gthread hands a
  connection to a thread as soon as a byte arrives, and the thread then blocks reading
  the rest of the head: 32 clients trickling a byte a second would hold every thread.
  :class:`GatewayWorker` reads heads in its selector loop instead, non-blocking,
  buffering what arrives; only a complete head (or one over ``MAX_HEAD`` bytes, 431)
  goes to a thread, with the buffered bytes served first by the socket. A head that is
  not complete within ``header_timeout_s`` of the connection's first wait is closed
  (with a 408 if any of it came).
* **Every client socket has a deadline.** gunicorn's own ``timeout`` only restarts a
  worker whose main loop hangs; it does not stop a thread blocked on a client that
  sent half its body. :class:`GatewayWorker` gives each client socket an I/O timeout
  of ``gateway_timeout_s`` and the upload reader bounds the *whole* body by the same
  number, so a stalled or trickling client is cut (408 or a closed connection) and
  its thread goes back to the pool.
* ``keepalive`` 5 s: reused connections stay cheap without piling up.

The master does not use :func:`core.runtime.serve`: gunicorn's arbiter owns the
signals (TERM: graceful stop, INT/QUIT: fast stop) and the master never touches
ZeroMQ; each worker makes its own context after the fork (``gateway.pipeline``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import selectors
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from gunicorn import util
from gunicorn.app.base import BaseApplication
from gunicorn.workers.gthread import TConn, ThreadWorker

from imgpipe.core.config import Settings, add_settings_args, settings_from_args
from imgpipe.core.errors import ConfigError
from imgpipe.core.runtime import configure_logging, tune_malloc
from imgpipe.gateway.access import check_exposure
from imgpipe.gateway.errors import ClientTimeout

log = logging.getLogger(__name__)

FLAGS = ("gateway_port", "gateway_host", "gateway_workers", "gateway_threads",
         "gateway_timeout_s", "data_dir", "store_url", "intake_endpoint", "event_endpoint",
         "control_endpoint", "bus_endpoint", "dashboard_bus_endpoint", "queue_limit",
         "max_upload_bytes", "max_pixels", "max_wait_s", "metrics_interval_s", "log_level",
         "header_timeout_s", "api_keys", "max_job_cost", "client_concurrency",
         "client_rate_per_min")
KEEPALIVE_S = 5
GRACEFUL_S = 10
MAX_HEAD = 64 * 1024   # bytes of request line + headers read before giving up (431)
HEAD_READ = 16 * 1024  # one non-blocking read of a head in the selector loop
HEAD_ENDS = (b"\r\n\r\n", b"\n\n")
MAX_REQUEST_LINE = 8190  # gunicorn's own ceiling


def _answer(status: str, error: str, detail: str) -> bytes:
    """A complete JSON error answer that closes the connection (sent by the loop itself)."""
    body = f'{{"error": "{error}", "detail": "{detail}"}}'.encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


TIMEOUT_408 = _answer("408 Request Timeout", "timeout", "the request head did not arrive in time")
TOO_LARGE_431 = _answer("431 Request Header Fields Too Large", "too_large",
                        f"the request head is over {MAX_HEAD} bytes")


class DeadlineSocket(socket.socket):
    """A client socket whose 'blocking' mode is a timeout, so no read or write waits forever.

    gunicorn switches a connection to blocking before it parses a request; here that
    means "blocking for at most ``io_timeout`` seconds per operation".
    """

    io_timeout: float = 30.0
    timed_out: bool = False
    head: bytes = b""  # read by the selector loop, served before the socket's own bytes

    @classmethod
    def adopt(cls, sock: socket.socket, io_timeout: float) -> DeadlineSocket:
        new = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        new.io_timeout = io_timeout
        new.settimeout(0.0)
        return new

    def setblocking(self, flag: bool) -> None:
        self.settimeout(self.io_timeout if flag else 0.0)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if self.head and not flags:
            data, self.head = self.head[:bufsize], self.head[bufsize:]
            return data
        try:
            return super().recv(bufsize, flags)
        except TimeoutError:
            raise self._silent() from None

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        """As :meth:`recv`, into ``buffer``: the buffered head first, then the socket."""
        view = memoryview(buffer).cast("B")
        want = nbytes or len(view)
        if self.head and not flags:
            n = min(want, len(self.head))
            view[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        try:
            return super().recv_into(view, want, flags)
        except TimeoutError:
            raise self._silent() from None

    def _silent(self) -> ClientTimeout:
        """The error for a client that sent nothing within the socket's timeout."""
        self.timed_out = True
        log.info("client %s sent nothing for %g s: closing", _peer(self), self.gettimeout())
        return ClientTimeout(errno.ECONNRESET, "client timed out")

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
    """gunicorn's gthread worker: heads read in the selector loop, a deadline on every socket.

    A connection waiting for its head (new, or kept alive between requests) sits in
    the selector; each time it is readable the loop reads what is there without
    blocking. Once the head is complete the connection goes to a thread, which parses
    it from the buffered bytes at once.
    """

    io_timeout: float = 30.0  # set from gateway_timeout_s by main(), inherited by the fork
    head_timeout: float = 10.0  # set from header_timeout_s by main()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.heads: dict[Any, float] = {}  # connection -> deadline of its head

    def accept(self, listener: Any) -> None:
        try:
            client_sock, client_addr = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        sock = DeadlineSocket.adopt(client_sock, self.io_timeout)
        conn = TConn(self.cfg, sock, client_addr, listener.getsockname())
        if self.cfg.is_ssl:  # TLS is read by the handshake in a thread: stock behaviour
            self.enqueue_req(conn)
            return
        self._wait_head(conn)

    def on_client_socket_readable(self, conn: Any, client: Any) -> None:
        """A kept-alive connection sent something: read its next head here first."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._wait_head(conn)
        self._read_head(conn, client)

    def finish_request(self, conn: Any, fs: Any) -> None:
        """As gthread's, but bytes read ahead past a kept-alive request (pipelining) are a
        head like any other: to a thread once complete, else waited for in the selector."""
        kept = (self.alive and not fs.cancelled() and fs.exception() is None
                and fs.result() is True and conn.parser is not None
                and isinstance(conn.sock, DeadlineSocket))
        if not kept:
            super().finish_request(conn, fs)
            return
        sock = conn.sock
        sock.head = conn.parser.unreader.take_buffered() + sock.head
        if not sock.head:
            super().finish_request(conn, fs)
        elif any(end in sock.head for end in HEAD_ENDS):
            self.enqueue_req(conn)
        else:
            self._wait_head(conn)

    def _wait_head(self, conn: Any) -> None:
        conn.sock.setblocking(False)
        self.heads[conn] = time.monotonic() + self.head_timeout
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._read_head, conn))

    def _read_head(self, conn: Any, client: Any) -> None:
        if conn not in self.heads:
            return
        sock = conn.sock
        try:
            data = socket.socket.recv(sock, HEAD_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away
            self._drop_head(conn)
            return
        sock.head += data
        complete = any(end in sock.head for end in HEAD_ENDS)
        if not complete and len(sock.head) <= MAX_HEAD:
            return
        del self.heads[conn]
        self.poller.unregister(sock)
        if not complete:
            self._drop_head(conn, TOO_LARGE_431, registered=False)
            return
        conn.data_ready = True  # stock handle() would wait for readability again
        self.enqueue_req(conn)

    def _drop_head(self, conn: Any, answer: bytes = b"", *, registered: bool = True) -> None:
        """Close a connection whose head never came; a short answer if part of it did."""
        if registered:
            self.heads.pop(conn, None)
            with contextlib.suppress(OSError, KeyError, ValueError):
                self.poller.unregister(conn.sock)
        if answer and conn.sock.head:
            with contextlib.suppress(OSError):  # non-blocking: best effort
                socket.socket.send(conn.sock, answer)
        conn.sock.timed_out = True  # no lingering close on the main loop
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self) -> None:
        super().murder_pending()
        now = time.monotonic()
        late = [c for c, deadline in self.heads.items() if deadline <= now or not self.alive]
        for conn in late:
            log.info("client %s sent no complete request head in %g s: closing",
                     _peer(conn.sock), self.head_timeout)
            self._drop_head(conn, TIMEOUT_408)

    def murder_keepalived(self, force: bool = False) -> None:
        super().murder_keepalived(force)
        if force:
            for conn in list(self.heads):
                self._drop_head(conn)


    def init_process(self) -> None:
        # gunicorn answers what it refuses itself (a request line over the limit, a bad
        # method or header) with an HTML page; this service answers JSON everywhere.
        util.write_error = write_json_error
        tune_malloc()  # 1 MB body chunks from the heap, not a fresh mmap each
        super().init_process()


def write_json_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's ``util.write_error`` with the service's JSON error body."""
    body = json.dumps({"error": reason.lower().replace(" ", "_"),
                       "detail": mesg or reason}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: "
            f"application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode("latin-1")
    util.write_nonblock(sock, head + body)


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
        # The longest request line gunicorn takes: room for a raw upload's ?ops= chains.
        "limit_request_line": MAX_REQUEST_LINE,
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
    parser.add_argument("--insecure", action="store_const", const=True, default=None,
                        help="serve beyond loopback without API keys (env IMGPIPE_INSECURE=1)")
    try:
        settings = settings_from_args(parser.parse_args(list(argv or [])))
        check_exposure(settings)
    except ConfigError as exc:
        print(f"imgpipe gateway: {exc.detail}", file=sys.stderr)
        return 2
    configure_logging(settings, "gateway")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    prom = _prometheus_dir()
    GatewayWorker.io_timeout = settings.gateway_timeout_s
    GatewayWorker.head_timeout = settings.header_timeout_s
    log.info("gateway on http://%s:%d (%d workers x %d threads)", settings.gateway_host,
             settings.gateway_port, settings.gateway_workers, settings.gateway_threads)
    try:
        GatewayApplication(settings).run()
    finally:
        if prom is not None:
            shutil.rmtree(prom, ignore_errors=True)
    return 0
