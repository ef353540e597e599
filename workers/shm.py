"""Frame buffers in POSIX shared memory: one reusable segment per task slot.

A decoded 4K RGB frame is 25 MB. Pickling it to a filter process would copy it twice
and fault in fresh pages every time, so frames cross the process boundary in
shared memory instead, and the segments are reused: a slot keeps its segment from
task to task and only replaces it by a bigger one when a bigger frame arrives.
Reused pages are already mapped, which is what makes a 4K frame cheap to hand over.

Every segment is named ``imgpipe-<worker pid>-<k>`` (k counts up per worker), so a
supervisor that sees a worker die can remove exactly that worker's segments with
:func:`sweep`. A clean shutdown unlinks everything itself (:meth:`BufferSet.close`).

**Memory is reserved when a segment is made.** ``shm_open`` + ``ftruncate`` (what
``multiprocessing.shared_memory`` does) only sets a file size; the tmpfs pages are
taken on first write, and when ``/dev/shm`` is full (a container's is 64 MB) that
write is a SIGBUS that kills the process. So the worker makes each segment itself:
a file under the shm dir (``O_CREAT | O_EXCL``, mode 0600), ``posix_fallocate`` over
its whole size, then ``mmap``. A full shm dir is then :class:`ShmFull` at creation,
the file is removed, and the task that asked is handed back for another worker.
Filter processes only *attach* (:func:`attach`) by path; nothing is registered with
multiprocessing's resource tracker, so no process but the worker ever unlinks.

A replaced segment is truncated to 0 bytes before it is unlinked: a filter process
keeps up to six mappings open, and tmpfs frees an unlinked file's pages only when the
last mapping goes, so without the truncate an old frame would hold its memory until
then. No process reads a replaced segment again (its name is never handed out twice).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import mmap
import os
import queue
import threading
from pathlib import Path

from imgpipe.core.config import Settings
from imgpipe.core.errors import ConfigError, ImgpipeError

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
PREFIX = "imgpipe-"
PAGE = mmap.PAGESIZE
MB = 1 << 20
# Decoded frames are 8-bit gray, RGB or RGBA (16-bit images are scaled to 8 bits), so
# a frame of N pixels takes at most 4N bytes.
FRAME_BYTES_PER_PIXEL = 4

# One counter per process: a name is never reused, so a filter process that still maps
# an old segment by name can never confuse it with a new one.
_NEXT = itertools.count()


class ShmFull(ImgpipeError):
    """The shm dir has no room for a frame segment: this worker's limit, not the image's."""

    status = 507
    error = "shm_full"


def segment_prefix(pid: int) -> str:
    """Name prefix of every segment worker ``pid`` creates."""
    return f"{PREFIX}{pid}-"


def sweep(pid: int, shm_dir: Path = SHM_DIR) -> int:
    """Unlink the shared-memory segments of worker ``pid`` (dead or stopping); how many.

    Safe to call for a pid that left nothing behind, and racing with another sweep.
    """
    removed = 0
    prefix = segment_prefix(pid)
    try:
        names = [p.name for p in shm_dir.iterdir() if p.name.startswith(prefix)]
    except FileNotFoundError:
        return 0
    for name in names:
        # Only imgpipe-<pid>-<k>: never a segment of pid 12 when asked about pid 1.
        if not name[len(prefix):].isdigit():
            continue
        try:
            (shm_dir / name).unlink()
            removed += 1
        except FileNotFoundError:
            pass
    if removed:
        log.info("removed %d shared-memory segment(s) of worker pid %d", removed, pid)
    return removed


def leftovers(pid: int, shm_dir: Path = SHM_DIR) -> list[str]:
    """Names of worker ``pid``'s segments still present (for tests and health checks)."""
    prefix = segment_prefix(pid)
    try:
        return sorted(p.name for p in shm_dir.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []


def attach(name: str, shm_dir: Path = SHM_DIR) -> mmap.mmap:
    """Map an existing segment read-write (its pages were reserved when it was made)."""
    fd = os.open(shm_dir / name, os.O_RDWR)
    try:
        return mmap.mmap(fd, 0)
    finally:
        os.close(fd)


def free_bytes(shm_dir: Path = SHM_DIR) -> int:
    """Bytes that can still be allocated in ``shm_dir`` (OSError if it is not there)."""
    st = os.statvfs(shm_dir)
    return st.f_bavail * st.f_frsize


def round_up(nbytes: int) -> int:
    """Segments grow in 1 MB steps, so slightly different frame sizes share a segment."""
    return max(PAGE, (nbytes + MB - 1) // MB * MB)


def slot_bytes(max_pixels: int) -> int:
    """The most shared memory one slot holds: one frame of ``max_pixels`` RGBA pixels.

    A slot's segment holds the decoded frame and then the chain's result (the same
    segment, or a bigger one that replaces it), so never two frames at once; both
    are bounded by the pixel limit.
    """
    return round_up(max_pixels * FRAME_BYTES_PER_PIXEL)


def plan_slots(settings: Settings) -> tuple[int, str]:
    """How many slots the shm dir can hold at ``max_pixels``, and a note when that is
    fewer than ``worker_slots``; ConfigError, saying what to change, when not even one.

    Free space is what matters, not the size: workers and others on one host share it.
    """
    shm_dir, slots = settings.shm_dir, settings.worker_slots
    try:
        free = free_bytes(shm_dir)
    except OSError as exc:
        raise ConfigError(f"IMGPIPE_SHM_DIR={str(shm_dir)!r}: {exc.strerror}; point it at a "
                          "tmpfs such as /dev/shm", field="shm_dir") from None
    per_slot = slot_bytes(settings.max_pixels)
    fits = free // per_slot
    if fits >= slots:
        return slots, ""
    need = (f"{shm_dir} has {free / MB:.0f} MB free and one frame at IMGPIPE_MAX_PIXELS="
            f"{settings.max_pixels} takes up to {per_slot / MB:.0f} MB")
    if fits < 1:
        raise ConfigError(f"no room for one frame: {need}; raise the shm size to at least "
                          f"{slots * per_slot / MB:.0f} MB for {slots} slot(s) (Docker: "
                          "shm_size) or lower IMGPIPE_MAX_PIXELS", field="shm_dir")
    return int(fits), (f"slots lowered from {slots} to {fits}: {need}; raise the shm size "
                       "(Docker: shm_size) or lower IMGPIPE_MAX_PIXELS")


class Segment:
    """One file under the shm dir, its pages reserved, mapped read-write."""

    def __init__(self, shm_dir: Path, name: str, size: int) -> None:
        self.name, self.size = name, size
        self.path = shm_dir / name
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except OSError as exc:
            _raise_full(exc, shm_dir, size)
            raise
        try:
            os.posix_fallocate(fd, 0, size)
            self._mm = mmap.mmap(fd, size)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            _raise_full(exc, shm_dir, size)
            raise
        finally:
            os.close(fd)
        self.buf: memoryview = memoryview(self._mm)

    def destroy(self) -> None:
        """Unmap, give the pages back (truncate) and unlink; the name is gone after this."""
        try:
            self.buf.release()
            self._mm.close()
        except BufferError:
            # A numpy view still points into it: the mapping outlives us, the name does
            # not. Its pages stay reserved until the view goes; truncating would turn a
            # read through that view into a SIGBUS.
            log.debug("segment %s still viewed at close", self.name)
        else:
            with contextlib.suppress(OSError):
                os.truncate(self.path, 0)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _raise_full(exc: OSError, shm_dir: Path, size: int) -> None:
    """ShmFull, saying what to change, for 'no room' (ENOSPC: no pages or no inodes
    left; ENOMEM: a memory limit); any other OSError is left to the caller."""
    if exc.errno not in (errno.ENOSPC, errno.ENOMEM):
        return
    try:
        free = f"{free_bytes(shm_dir) / MB:.0f} MB free"
    except OSError:
        free = "free space unknown"
    raise ShmFull(f"no shared memory for a {size / MB:.0f} MB frame in {shm_dir} ({free}); "
                  "raise the worker's shm size (Docker: shm_size) or lower "
                  "IMGPIPE_MAX_PIXELS or IMGPIPE_WORKER_SLOTS", field="shm_dir") from exc


class Buffer:
    """One slot's frame buffer: a shared-memory segment that grows and is reused."""

    def __init__(self, owner: BufferSet) -> None:
        self._owner = owner
        self.shm: Segment | None = None

    @property
    def name(self) -> str:
        assert self.shm is not None, "ensure() a size first"
        return self.shm.name

    @property
    def size(self) -> int:
        return 0 if self.shm is None else self.shm.size

    def ensure(self, nbytes: int) -> memoryview:
        """A writable view of at least ``nbytes``, replacing the segment only if too small.

        The old segment goes first (its contents are never needed by then), so a slot
        holds one frame's memory at a time. Raises ShmFull when the shm dir is full.
        """
        if self.shm is None or self.shm.size < nbytes:
            if self.shm is not None:
                old, self.shm = self.shm, None
                self._owner._destroy(old)
            self.shm = self._owner._create(round_up(nbytes))
        return self.shm.buf

    def close(self) -> None:
        if self.shm is not None:
            self._owner._destroy(self.shm)
            self.shm = None


class BufferSet:
    """The frame buffers of one worker: ``count`` slots, lent out one task at a time.

    ``acquire()`` blocks until a buffer is free, which bounds the decoded frames a
    worker holds at once to ``count`` (plus the one a decode thread is producing).
    """

    def __init__(self, count: int, *, pid: int | None = None,
                 shm_dir: Path = SHM_DIR) -> None:
        self.pid = os.getpid() if pid is None else pid
        self.shm_dir = Path(shm_dir)
        self._lock = threading.Lock()
        self._live: dict[str, Segment] = {}
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
        for seg in rest:
            seg.destroy()
        sweep(self.pid, self.shm_dir)

    # --- segments ---------------------------------------------------------------------
    def _create(self, size: int) -> Segment:
        with self._lock:
            if self.closed:
                raise RuntimeError("frame buffers are closed (worker stopping)")
            name = f"{segment_prefix(self.pid)}{next(_NEXT)}"
        seg = Segment(self.shm_dir, name, size)  # outside the lock: fallocate takes time
        with self._lock:
            self._live[name] = seg
            self.created += 1
            closed = self.closed
        if closed:  # close() ran meanwhile and did not see this one
            self._destroy(seg)
            raise RuntimeError("frame buffers are closed (worker stopping)")
        log.debug("shared memory %s: %d bytes", name, size)
        return seg

    def _destroy(self, seg: Segment) -> None:
        with self._lock:
            self._live.pop(seg.name, None)
        seg.destroy()
