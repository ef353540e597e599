"""A test that plays ventilator, sink and bus for one real ``imgpipe worker`` process."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from imgpipe.core.config import Settings
from imgpipe.core.protocol import (
    Claim,
    Heartbeat,
    Message,
    Metric,
    Result,
    Task,
    decode,
    decode_topic,
    encode,
)
from imgpipe.core.sockets import make_socket
from imgpipe.workers.shm import sweep
from tests.support import spawn


class Rig:
    """Binds the sockets a worker connects to (task PUSH per class, result PULL, bus SUB)
    and starts the worker; :meth:`close` stops everything.

    Like the ventilator, the rig keeps reading its bus while it waits for anything else:
    a SUB socket sends its subscriptions to a new publisher only when its owner touches
    it, and a worker's claims publisher waits for that subscription.
    """

    def __init__(self, settings: Settings, ctx: zmq.Context[Any], *args: str,
                 log: Path | None = None) -> None:
        self.settings = settings
        self.push = {cls: make_socket(ctx, zmq.PUSH, settings, bind=ep, sndhwm=1)
                     for cls, ep in (("light", settings.light_task_endpoint),
                                     ("heavy", settings.heavy_task_endpoint))}
        self.results = make_socket(ctx, zmq.PULL, settings, bind=settings.result_endpoint,
                                   max_bytes=settings.max_message_bytes)
        self.bus = make_socket(ctx, zmq.SUB, settings, bind=settings.bus_endpoint,
                               subscribe=(b"",))
        self.seen: list[Message] = []
        self.proc = spawn(settings, "worker", *args, log=log)
        self.log = log

    # --- bus -----------------------------------------------------------------------------
    def wait_bus(self, pred: Callable[[Message], bool], timeout: float = 20.0,
                 what: str = "bus message") -> Message:
        """The first bus message (seen or new) matching ``pred``; fails at the deadline."""
        for msg in self.seen:
            if pred(msg):
                return msg
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self._alive()
            if self.bus.poll(200):
                msg = decode_topic(self.bus.recv_multipart())
                self.seen.append(msg)
                if pred(msg):
                    return msg
        raise AssertionError(f"no {what} within {timeout} s{self._tail()}")

    def _wait(self, sock: zmq.Socket[Any], event: int, timeout: float) -> bool:
        """Wait for ``event`` on ``sock`` while reading the bus into :attr:`seen`."""
        poller = zmq.Poller()
        poller.register(sock, event)
        poller.register(self.bus, zmq.POLLIN)
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            ready = dict(poller.poll(min(200, int(left * 1000) + 1)))
            if ready.get(self.bus):
                self.seen.append(decode_topic(self.bus.recv_multipart()))
            if ready.get(sock, 0) & event:
                return True
        return False

    def heartbeat(self, after: int = 0, timeout: float = 20.0) -> Heartbeat:
        hb = self.wait_bus(lambda m: isinstance(m, Heartbeat) and m.seq > after, timeout,
                           f"heartbeat after seq {after}")
        assert isinstance(hb, Heartbeat)
        return hb

    def claims(self) -> list[Claim]:
        return [m for m in self.seen if isinstance(m, Claim)]

    def metric(self, pred: Callable[[Metric], bool], timeout: float = 20.0) -> Metric:
        m = self.wait_bus(lambda m: isinstance(m, Metric) and pred(m), timeout, "metric")
        assert isinstance(m, Metric)
        return m

    # --- tasks ---------------------------------------------------------------------------
    def send(self, task: Task, cls: str = "light") -> None:
        if not self._wait(self.push[cls], zmq.POLLOUT, 20.0):
            raise AssertionError(f"the worker did not take a {cls} task{self._tail()}")
        self.push[cls].send_multipart(encode(task), copy=False)

    def result(self, timeout: float = 30.0) -> Result:
        if not self._wait(self.results, zmq.POLLIN, timeout):
            raise AssertionError(f"no result within {timeout} s (worker exit code "
                                 f"{self.proc.poll()}){self._tail()}")
        msg = decode(self.results.recv_multipart(copy=False), expect=Result)
        assert isinstance(msg, Result)
        return msg

    # --- process -------------------------------------------------------------------------
    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def close(self) -> None:
        """As the supervisor stops a worker: SIGTERM (it unlinks its shared memory),
        SIGKILL if it is still there after a while, then its segments swept."""
        if self.proc.poll() is None:
            try:
                self.stop(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        sweep(self.proc.pid, self.settings.shm_dir)
        for sock in (*self.push.values(), self.results, self.bus):
            sock.close(linger=0)

    def _alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"worker exited with {self.proc.returncode}{self._tail()}")

    def _tail(self) -> str:
        if self.log and self.log.exists():
            return "\n--- worker log ---\n" + self.log.read_text(errors="replace")[-4000:]
        return ""
