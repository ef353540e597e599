"""Frame buffers in POSIX shared memory: one reusable segment per task slot.

A decoded 4K RGB frame is 25 MB. Pickling it to a filter process would copy it twice
and fault in fresh pages every time, so frames cross the process boundary in
shared memory instead, and the segments are reused: a slot keeps its segment from
task to task and only replaces it by a bigger one when a bigger frame arrives.
Reused pages are already mapped, which is what makes a 4K frame cheap to hand over.

Every segment is named ``imgpipe-<worker pid>-<k>`` (k counts up per worker), so a
supervisor that sees a worker die can remove exactly that worker's segments with
:func:`sweep`. A clean shutdown unlinks everything itself (:meth:`BufferSet.close`).

The worker creates and unlinks segments (``multiprocessing.shared_memory``); filter
processes only *attach* (:func:`attach`), by mapping the file under ``/dev/shm``
without registering it with multiprocessing's resource tracker: on Python < 3.13 an
attaching process's registration would make the tracker unlink or warn about a
segment that the worker still owns.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import mmap
import os
import queue
import threading
from multiprocessing import shared_memory
from pathlib import Path

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
PREFIX = "imgpipe-"
PAGE = mmap.PAGESIZE

# One counter per process: a name is never reused, so a filter process that still maps
# an old segment by name can never confuse it with a new one.
_NEXT = itertools.count()


def segment_prefix(pid: int) -> str:
    """Name prefix of every segment worker ``pid`` creates."""
    return f"{PREFIX}{pid}-"


def sweep(pid: int) -> int:
    """Unlink the shared-memory segments of worker ``pid`` (dead or stopping); how many.

    Safe to call for a pid that left nothing behind, and racing with another sweep.
    """
    removed = 0
    prefix = segment_prefix(pid)
    try:
        names = [p.name for p in SHM_DIR.iterdir() if p.name.startswith(prefix)]
    except FileNotFoundError:
        return 0
    for name in names:
        # Only imgpipe-<pid>-<k>: never a segment of pid 12 when asked about pid 1.
        if not name[len(prefix):].isdigit():
            continue
        try:
            (SHM_DIR / name).unlink()
            removed += 1
        except FileNotFoundError:
            pass
    if removed:
        log.info("removed %d shared-memory segment(s) of worker pid %d", removed, pid)
    return removed


def leftovers(pid: int) -> list[str]:
    """Names of worker ``pid``'s segments still present (for tests and health checks)."""
    prefix = segment_prefix(pid)
    try:
        return sorted(p.name for p in SHM_DIR.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []


def attach(name: str) -> mmap.mmap:
    """Map an existing segment read-write, without the resource tracker (see module doc)."""
    fd = os.open(SHM_DIR / name, os.O_RDWR)
    try:
        return mmap.mmap(fd, 0)
    finally:
        os.close(fd)


def _round_up(nbytes: int) -> int:
    """Segments grow in 1 MB steps, so slightly different frame sizes share a segment."""
    step = 1 << 20
    return max(PAGE, (nbytes + step - 1) // step * step)


class Buffer:
    """One slot's frame buffer: a shared-memory segment that grows and is reused."""

    def __init__(self, owner: BufferSet) -> None:
        self._owner = owner
        self.shm: shared_memory.SharedMemory | None = None

    @property
    def name(self) -> str:
        assert self.shm is not None, "ensure() a size first"
        return self.shm.name

    @property
    def size(self) -> int:
        return 0 if self.shm is None else self.shm.size

    def ensure(self, nbytes: int) -> memoryview:
        """A writable view of at least ``nbytes``, replacing the segment only if too small."""
        if self.shm is None or self.shm.size < nbytes:
            old, self.shm = self.shm, self._owner._create(_round_up(nbytes))
            if old is not None:
                self._owner._destroy(old)
        buf = self.shm.buf
        assert buf is not None
        return buf

    def close(self) -> None:
        if self.shm is not None:
            self._owner._destroy(self.shm)
            self.shm = None


class BufferSet:
    """The frame buffers of one worker: ``count`` slots, lent out one task at a time.

    ``acquire()`` blocks until a buffer is free, which bounds the decoded frames a
    worker holds at once to ``count`` (plus the one a decode thread is producing).
    """

    def __init__(self, count: int, *, pid: int | None = None) -> None:
        self.pid = os.getpid() if pid is None else pid
        self._lock = threading.Lock()
        self._live: dict[str, shared_memory.SharedMemory] = {}
        self._all = [Buffer(self) for _ in range(count)]
        # LIFO: the buffer used last is warm (mapped, sized), so it is handed out first.
        self._free: queue.LifoQueue[Buffer] = queue.LifoQueue()
        for buf in self._all:
            self._free.put(buf)
        self.created = 0
        self.closed = False

    def acquire(self, timeout: float | None = None) -> Buffer:
        return self._free.get(timeout=timeout)

    def release(self, buf: Buffer) -> None:
        self._free.put(buf)

    @property
    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._live)

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(s.size for s in self._live.values())

    def close(self) -> None:
        """Unlink every segment (idempotent); then sweep anything a crash left half-made."""
        with self._lock:
            self.closed = True
        for buf in self._all:
            buf.close()
        with self._lock:
            rest = list(self._live.values())
            self._live.clear()
        for shm in rest:
            self._unlink(shm)
        sweep(self.pid)

    # --- segments ---------------------------------------------------------------------
    def _create(self, size: int) -> shared_memory.SharedMemory:
        with self._lock:
            if self.closed:
                raise RuntimeError("frame buffers are closed (worker stopping)")
            name = f"{segment_prefix(self.pid)}{next(_NEXT)}"
            shm = shared_memory.SharedMemory(name=name, create=True, size=size)
            self._live[name] = shm
            self.created += 1
        log.debug("shared memory %s: %d bytes", name, size)
        return shm

    def _destroy(self, shm: shared_memory.SharedMemory) -> None:
        with self._lock:
            self._live.pop(shm.name, None)
        self._unlink(shm)

    @staticmethod
    def _unlink(shm: shared_memory.SharedMemory) -> None:
        try:
            shm.close()
        except BufferError:
            # A numpy view still points into it: the mapping outlives us, the name does not.
            log.debug("segment %s still viewed at close", shm.name)
        with contextlib.suppress(FileNotFoundError):
            shm.unlink()
