"""A pool of filter processes that survives its members dying or running late.

Why not ``ProcessPoolExecutor``: one member dying (segfault, OOM kill, a filter that
calls ``os._exit``) breaks the whole executor and fails every task in it, and it
cannot stop one task that runs past its deadline without killing them all. Here each
process serves one task at a time for the thread that checked it out, so a death or
a deadline is pinned on exactly one task: that process is replaced and the task is
reported as lost (retryable), while the other processes keep working.

Processes start from a fork server that has already imported numpy, OpenCV and the
filters (``forkserver`` + preload), so replacing one costs a fork, not an import.
Requests are small JSON documents (see :mod:`workers.child`); the pixels stay in
shared memory. ``ipc_bytes`` counts what crossed the pipes, so the claim that frames
never do is something a test can check.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from imgpipe.core.protocol import GRAVITY_NOTES, GravityNote
from imgpipe.filters import DEFAULT_MAX_PIXELS
from imgpipe.workers import child
from imgpipe.workers.shm import SHM_DIR

log = logging.getLogger(__name__)


class PoolError(Exception):
    """A task could not get through the filter pool for reasons that are not its input's."""


class ProcessDied(PoolError):
    """The filter process died under this task (killed, crashed, out of memory)."""


class DeadlineExceeded(PoolError):
    """The task's deadline passed while it waited for, or ran in, a filter process."""


class FilterFailed(Exception):
    """The chain itself raised: the input or the parameters are at fault (final)."""


@dataclass
class FilterOutput:
    shape: tuple[int, ...]
    dtype: str
    ms: float
    seg: str
    ipc_bytes: int
    gravity: GravityNote | None = None  # what the chain's smart placements did
    threads: int = 1  # the OpenCV threads the process ran the chain on


@dataclass
class _Member:
    proc: Any
    conn: Connection


class FilterPool:
    """``processes`` filter processes; :meth:`run` is called from many threads at once."""

    def __init__(self, processes: int, *, cv2_threads: int = 1, test_hooks: bool = False,
                 start_method: str = "forkserver", shm_dir: Path = SHM_DIR) -> None:
        self._mp: Any = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            self._mp.set_forkserver_preload(["imgpipe.workers.child"])
        self._args = (cv2_threads, test_hooks, str(shm_dir))
        self._lock = threading.Lock()
        self._all: dict[int, _Member] = {}
        self._idle: queue.Queue[_Member] = queue.Queue()
        self._closed = False
        self.size = processes
        self._starting = 0
        self.restarts = 0
        self.ipc_bytes = 0
        for _ in range(processes):
            self._idle.put(self._spawn())

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return sorted(self._all)

    # --- running a chain -----------------------------------------------------------------
    def run(self, seg: str, shape: tuple[int, ...], dtype: str, ops: str, *,
            deadline: float = 0.0, max_pixels: int = DEFAULT_MAX_PIXELS,
            grow: Callable[[int], str] | None = None, threads: int = 0) -> FilterOutput:
        """Run ``ops`` on the frame in segment ``seg``; the result is left in a segment.

        ``deadline`` is wall-clock seconds since the epoch (0: none). ``grow(nbytes)``
        returns a segment big enough for a result larger than its input; what it raises
        (no room) is raised here once the process has dropped that result. ``threads``
        is how many OpenCV threads the process may run this chain on (0: its own
        setting). Raises FilterFailed (final), ProcessDied or DeadlineExceeded
        (retryable).
        """
        member = self._checkout(deadline)
        keep = False  # only a process that finished its conversation serves the next task
        try:
            request = json.dumps({"seg": seg, "shape": list(shape), "dtype": dtype,
                                  "ops": ops, "max_pixels": max_pixels,
                                  "threads": threads}).encode()
            sent = len(request)
            member.conn.send_bytes(request)
            while True:
                raw = self._await(member, deadline, ops)
                sent += len(raw)
                reply = json.loads(raw)
                if "need" not in reply:
                    break
                try:
                    if grow is None:
                        raise FilterFailed(f"filter result of {reply['need']} bytes "
                                           "does not fit")
                    seg = grow(int(reply["need"]))
                except Exception:
                    member.conn.send_bytes(b'{"seg": null}')  # drop it, then say so
                    self._await(member, deadline, ops)
                    keep = True
                    raise
                answer = json.dumps({"seg": seg}).encode()
                sent += len(answer)
                member.conn.send_bytes(answer)
            keep = True
            with self._lock:
                self.ipc_bytes += sent
            if not reply.get("ok"):
                raise FilterFailed(str(reply.get("error") or "filter failed"))
            gravity = reply.get("gravity")
            return FilterOutput(shape=tuple(reply["shape"]), dtype=str(reply["dtype"]),
                                ms=float(reply["ms"]), seg=seg, ipc_bytes=sent,
                                gravity=gravity if gravity in GRAVITY_NOTES else None,
                                threads=int(reply.get("threads") or 1))
        finally:
            self._checkin(member, keep)

    def _await(self, member: _Member, deadline: float, ops: str) -> bytes:
        """The member's next reply, as sent; raises when it dies or runs past ``deadline``."""
        timeout = None if not deadline else max(0.0, deadline - time.time())
        ready = wait([member.conn, member.proc.sentinel], timeout)
        if member.conn in ready:
            try:
                return member.conn.recv_bytes()
            except (EOFError, OSError):
                pass
        elif not ready:
            member.proc.kill()
            member.proc.join(5)
            raise DeadlineExceeded(f"deadline passed while running {ops!r}; "
                                   "filter process stopped")
        member.proc.join(5)
        raise ProcessDied(f"filter process died ({_describe_exit(member.proc.exitcode)}) "
                          f"while running {ops!r}")

    def _checkout(self, deadline: float) -> _Member:
        while True:
            if self._closed:
                raise PoolError("filter pool is closed")
            self._replace()  # in case a replacement failed to start earlier
            timeout = 1.0 if not deadline else min(1.0, deadline - time.time())
            if timeout <= 0:
                raise DeadlineExceeded("deadline passed while waiting for a filter process")
            try:
                return self._idle.get(timeout=timeout)
            except queue.Empty:
                continue

    def _checkin(self, member: _Member, keep: bool) -> None:
        with self._lock:
            if keep and not self._closed and member.proc.is_alive():
                self._idle.put(member)
                return
        self._retire(member)
        if not self._closed:
            with self._lock:
                self.restarts += 1
            self._replace()

    def _replace(self) -> None:
        """Start a process if the pool is short of one (reserved under the lock, so two
        threads replacing at once never start two)."""
        with self._lock:
            if self._closed or len(self._all) + self._starting >= self.size:
                return
            self._starting += 1
        try:
            member = self._spawn()
        except Exception:  # noqa: BLE001 - tried again at the next checkout
            log.exception("could not start a filter process")
            return
        finally:
            with self._lock:
                self._starting -= 1
        self._idle.put(member)

    # --- members --------------------------------------------------------------------------
    def _spawn(self) -> _Member:
        mine, theirs = self._mp.Pipe()
        proc = self._mp.Process(target=child.main, args=(theirs, *self._args), daemon=True,
                                name="imgpipe-filters")
        proc.start()
        theirs.close()
        member = _Member(proc, mine)
        with self._lock:
            self._all[proc.pid] = member
        log.debug("filter process %d started", proc.pid)
        return member

    def _retire(self, member: _Member) -> None:
        with self._lock:
            self._all.pop(member.proc.pid, None)
        member.conn.close()
        if member.proc.is_alive():
            member.proc.kill()
        member.proc.join(5)

    def close(self, timeout: float = 3.0) -> None:
        """Stop every process: idle ones see EOF on their pipe, busy ones are killed.

        A busy process's pipe belongs to the thread running its task; that thread sees
        the death, gets ProcessDied and retires the process itself.
        """
        with self._lock:
            self._closed = True
            idle: list[_Member] = []
            while True:
                try:
                    idle.append(self._idle.get_nowait())
                except queue.Empty:
                    break
            busy = [m for m in self._all.values() if m not in idle]
        for m in idle:
            m.conn.close()
        for m in busy:
            m.proc.kill()
        end = time.monotonic() + timeout
        for m in idle + busy:
            m.proc.join(max(0.0, end - time.monotonic()))
            if m.proc.is_alive():
                m.proc.kill()
                m.proc.join(2)
        with self._lock:
            for m in idle:
                self._all.pop(m.proc.pid, None)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
