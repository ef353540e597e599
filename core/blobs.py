"""The blob store: originals and outputs, kept apart from the job store's database.

Two kinds, chosen by ``IMGPIPE_BLOB_URL`` (:func:`open_blobs`):

* :class:`DirBlobs`, files under a directory: the data dir by default, or any directory
  (on several hosts, a shared mount every gateway, ventilator and sink sees);
* :class:`~imgpipe.core.s3.S3Blobs`, objects in an S3-compatible bucket
  (``s3://bucket/prefix``).

Both name blobs the same way, under their root or prefix::

    originals/<job>/<i>.<ext>     uploaded images, in place before the job row commits
    outputs/<job>/<n>.<ext>       results, whole once written (before their row commits)

Every key is built from a checked job id (:func:`~imgpipe.core.records.check_id`) and
integers only, so no request can name a blob outside the store. Uploads being received
are staged in a local temp file (the gateway streams the body to disk and probes it
there), then put into the store. Only :class:`~imgpipe.core.store.Store` holds a
``Blobs``: callers ask the store, and no component opens another's files by path.
"""

from __future__ import annotations

import abc
import contextlib
import io
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from imgpipe.core.media import EXTENSIONS
from imgpipe.core.records import check_id

if TYPE_CHECKING:
    from imgpipe.core.config import Settings

PARTIAL = ".tmp-"  # name prefix of a file being written in place (see write_atomic)
PARTIAL_GRACE_S = 60.0  # a partial file this old has no live writer (see partial_grace)
STAGED = "up-"     # name prefix of a staged upload
SUBDIRS = ("originals", "outputs")
UUID_NAME = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def ext_for(fmt: str) -> str:
    return EXTENSIONS.get(fmt, "bin")


def original_key(job_id: str, idx: int, fmt: str) -> str:
    return f"originals/{check_id(job_id)}/{int(idx)}.{ext_for(fmt)}"


def output_key(job_id: str, n: int, fmt: str) -> str:
    return f"outputs/{check_id(job_id)}/{int(n)}.{ext_for(fmt)}"


class BlobFile(io.RawIOBase):
    """A blob open for reading, with its ``size`` in bytes known before the first read
    (the gateway sends it as Content-Length). Read it in blocks and close it: an object
    store's connection goes back to the pool then."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def readable(self) -> bool:
        return True


class ObjectStoreError(OSError):
    """The object store refused or could not be reached (after the client's retries):
    a blob store outage, which a caller answers as "retry later", not as a bad request."""


class Blobs(abc.ABC):
    """What the job store needs of a blob store (keys as in the module docstring).

    Missing blobs raise FileNotFoundError where a caller must know (reading an original,
    linking a cached output); store failures raise OSError (an object store's errors
    too), which the sink turns into a retry and the ventilator into a failed output.
    """

    staging: Path  # a local folder for uploads being received

    def stage(self) -> tuple[int, Path]:
        """A new local temp file (fd, path) for an upload being received."""
        fd, name = tempfile.mkstemp(dir=self.staging, prefix=STAGED)
        return fd, Path(name)

    @abc.abstractmethod
    def put_original(self, job_id: str, idx: int, fmt: str, data: bytes | memoryview) -> None:
        """Store original ``idx`` of ``job_id`` from bytes."""

    @abc.abstractmethod
    def adopt_original(self, job_id: str, idx: int, fmt: str, staged: Path) -> None:
        """Store a staged upload as original ``idx``; the staged file is gone after."""

    @abc.abstractmethod
    def read_original(self, job_id: str, idx: int, fmt: str) -> bytes:
        """The original's bytes; FileNotFoundError when it is gone."""

    @abc.abstractmethod
    def remove_originals(self, job_id: str) -> None:
        """Remove every original of a job (one that was never recorded)."""

    @abc.abstractmethod
    def write_output(self, job_id: str, n: int, fmt: str, data: bytes | memoryview) -> None:
        """Store output ``n``, whole and durable once this returns; readers never see
        part of it, and a second write replaces the first."""

    def prepare_outputs(self, job_id: str) -> None:
        """Get ready for the outputs of ``job_id`` before they come (the gateway calls it
        while the job runs); writing one works without it. An object store has nothing
        to prepare."""
        check_id(job_id)

    @abc.abstractmethod
    def open_output(self, job_id: str, n: int, fmt: str) -> BlobFile | None:
        """Output ``n`` open for streaming, or None when there is none."""

    @abc.abstractmethod
    def remove_output(self, job_id: str, n: int, fmt: str) -> None:
        """Remove output ``n`` if it is there."""

    @abc.abstractmethod
    def link_output(self, src_job: str, src_n: int, job_id: str, n: int, fmt: str) -> None:
        """Output ``n`` of ``job_id`` with the bytes of an existing output (the result
        cache), without sending them through this process; either job may go without
        the other losing its output. FileNotFoundError when the source is gone."""

    @abc.abstractmethod
    def remove_jobs(self, job_ids: Sequence[str]) -> None:
        """Remove every original and output of these jobs."""

    @abc.abstractmethod
    def remove_partial_outputs(self, older_than: float) -> int:
        """Remove outputs a killed writer left half-written before ``older_than`` (epoch
        seconds); how many. Younger ones may belong to a writer still running."""

    @abc.abstractmethod
    def sweep(self, known: Callable[[str], bool], older_than: float) -> int:
        """Remove what is older than ``older_than`` (epoch seconds) and no job owns:
        staged uploads, half-written outputs, the blobs of jobs ``known`` does not
        know; how many folders (or job prefixes) and files were removed."""

    @abc.abstractmethod
    def bytes_used(self) -> int:
        """Bytes of every original and output now (a full listing: for a first start)."""

    def close(self) -> None:  # noqa: B027 - a hook: only a store with connections needs it
        """Release connections (a directory holds none)."""

    def sweep_staged(self, older_than: float) -> int:
        """Remove staged uploads older than ``older_than`` (a gateway killed mid-body)."""
        removed = 0
        for path in self.staging.glob(f"{STAGED}*"):
            if _older(path, older_than):
                path.unlink(missing_ok=True)
                removed += 1
        return removed


class DirBlobs(Blobs):
    """Originals and outputs as files under ``root``; uploads are staged in
    ``root/tmp`` (same filesystem, so adopting one is a rename)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.staging = self.root / "tmp"
        for sub in (*SUBDIRS, "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"DirBlobs({str(self.root)!r})"

    def original_path(self, job_id: str, idx: int, fmt: str) -> Path:
        return self.root / original_key(job_id, idx, fmt)

    def output_path(self, job_id: str, n: int, fmt: str) -> Path:
        return self.root / output_key(job_id, n, fmt)

    def put_original(self, job_id: str, idx: int, fmt: str, data: bytes | memoryview) -> None:
        write_atomic(self.original_path(job_id, idx, fmt), data)

    def adopt_original(self, job_id: str, idx: int, fmt: str, staged: Path) -> None:
        path = self.original_path(job_id, idx, fmt)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, path)

    def read_original(self, job_id: str, idx: int, fmt: str) -> bytes:
        return self.original_path(job_id, idx, fmt).read_bytes()

    def remove_originals(self, job_id: str) -> None:
        shutil.rmtree(self.root / "originals" / check_id(job_id), ignore_errors=True)

    def write_output(self, job_id: str, n: int, fmt: str, data: bytes | memoryview) -> None:
        write_atomic(self.output_path(job_id, n, fmt), data)

    def prepare_outputs(self, job_id: str) -> None:
        """The job's output folder, made ahead, so the sink does not create it between
        a result and its answer (one 200 KB ``write_output``: 1.40 ms with the folder
        to make, 1.15 ms without, medians of 60 interleaved here)."""
        (self.root / "outputs" / check_id(job_id)).mkdir(exist_ok=True)

    def open_output(self, job_id: str, n: int, fmt: str) -> BlobFile | None:
        try:
            return _File(self.output_path(job_id, n, fmt))
        except FileNotFoundError:
            return None

    def remove_output(self, job_id: str, n: int, fmt: str) -> None:
        self.output_path(job_id, n, fmt).unlink(missing_ok=True)

    def link_output(self, src_job: str, src_n: int, job_id: str, n: int, fmt: str) -> None:
        """A hard link: no bytes copied (a copy on a filesystem without hard links)."""
        src = self.output_path(src_job, src_n, fmt)
        path = self.output_path(job_id, n, fmt)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        try:
            os.link(src, path)
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            write_atomic(path, src.read_bytes())

    def remove_jobs(self, job_ids: Sequence[str]) -> None:
        for job_id in job_ids:
            for sub in SUBDIRS:
                shutil.rmtree(self.root / sub / check_id(job_id), ignore_errors=True)

    def remove_partial_outputs(self, older_than: float) -> int:
        """Partial files are named after their writer (see write_atomic): those of a
        process of this host that is gone are removed at once, any other once old."""
        count = 0
        for path in (self.root / "outputs").glob(f"*/{PARTIAL}*"):
            if _writer_gone(path.name) or _older(path, older_than):
                path.unlink(missing_ok=True)
                count += 1
        return count

    def sweep(self, known: Callable[[str], bool], older_than: float) -> int:
        removed = self.sweep_staged(older_than) + self.remove_partial_outputs(older_than)
        for sub in SUBDIRS:
            for folder in (self.root / sub).iterdir():
                if (UUID_NAME.match(folder.name) and _older(folder, older_than)
                        and not known(folder.name)):
                    shutil.rmtree(folder, ignore_errors=True)
                    removed += 1
        return removed

    def bytes_used(self) -> int:
        total = 0
        for sub in SUBDIRS:
            for path in (self.root / sub).glob("*/*"):
                with contextlib.suppress(OSError):
                    total += path.stat().st_size
        return total


class _File(BlobFile):
    """A file open for reading. ``fileno()``, ``seek()`` and ``tell()`` are the file's,
    so gunicorn can send it with sendfile(2) without reading it through Python
    (``socket.sendfile`` seeks the file past what it sent, gunicorn seeks it back)."""

    mode = "rb"

    def __init__(self, path: Path) -> None:
        self._fh = io.FileIO(path, "rb")
        super().__init__(os.fstat(self._fh.fileno()).st_size)

    def fileno(self) -> int:
        return self._fh.fileno()

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def readinto(self, buffer: Any) -> int | None:
        return self._fh.readinto(buffer)

    def close(self) -> None:
        fh = getattr(self, "_fh", None)  # None when the open itself failed
        if fh is not None:
            fh.close()
        super().close()


def _older(path: Path, older_than: float) -> bool:
    try:
        return path.stat().st_mtime < older_than
    except FileNotFoundError:
        return False


def _process_tag(pid: int) -> str | None:
    """``<pid>.<start time>``: names one process of this host, even when its pid is
    reused later (a container restarted gets the same pids); None when it is gone."""
    try:
        return f"{pid}.{psutil.Process(pid).create_time():.2f}"
    except psutil.Error:
        return None


_own_tag: tuple[int, str] | None = None


def _this_process_tag() -> str:
    """:func:`_process_tag` of this process, read from /proc once (again after a fork):
    every output the sink writes is named with it."""
    global _own_tag
    pid = os.getpid()
    if _own_tag is None or _own_tag[0] != pid:
        _own_tag = (pid, f"{_process_tag(pid)}@{socket.gethostname()}")
    return _own_tag[1]


def _writer_gone(name: str) -> bool:
    """True when a partial file's name (``.tmp-<pid>.<start>@<host>~<random>``) says it
    was written by a process of this host that no longer runs."""
    tag, at, rest = name.removeprefix(PARTIAL).partition("@")
    pid = tag.partition(".")[0]
    if not at or not pid.isdigit() or rest.rpartition("~")[0] != socket.gethostname():
        return False
    return _process_tag(int(pid)) != tag


def write_atomic(path: Path, data: bytes | memoryview) -> Path:
    """Write ``data`` to a temp file beside ``path``, flush it to disk, rename it into
    place and flush the folder: once this returns, the file survives a power loss (the
    store commits an output's row only after it). The temp file's name says which
    process of which host writes it, so a sink restarted after a crash can tell its
    predecessor's leftovers from the files another sink on the same store is writing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f"{PARTIAL}{_this_process_tag()}~"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def blob_dir(settings: Settings) -> Path:
    """The directory of a directory blob store: ``IMGPIPE_BLOB_URL`` as a path or
    ``file://`` URL, else the data dir."""
    url = settings.blob_url
    if not url:
        return settings.data_dir
    return Path(url.removeprefix("file://"))


def open_blobs(settings: Settings) -> Blobs:
    """The blob store ``settings`` name (see ``IMGPIPE_BLOB_URL``). An S3 store makes its
    client on first use in each process, so opening one before a fork is safe."""
    if settings.blob_url.startswith("s3://"):
        from imgpipe.core.s3 import S3Blobs  # boto3 is imported only when S3 is used

        return S3Blobs.from_settings(settings)
    return DirBlobs(blob_dir(settings))


def partial_grace(now: float | None = None) -> float:
    """The cut-off for half-written outputs: a writer takes far less than a minute, so
    anything older was left by a killed one (younger ones may be another sink's)."""
    return (time.time() if now is None else now) - PARTIAL_GRACE_S

