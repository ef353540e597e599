"""The image files of the job store, under its data dir.

Layout under ``root``::

    originals/<job>/<i>.<ext>     uploaded images, moved into place before the job row commits
    outputs/<job>/<n>.<ext>       results, written atomically (temp file + rename)
    tmp/                          uploads being received (same filesystem, so adopting is a rename)

Every path is built from a checked job id (:func:`~imgpipe.core.records.check_id`) and
integers only, so no request can name a file outside ``root``. Only
:class:`~imgpipe.core.store.Store` holds a ``Blobs``: callers ask the store.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from imgpipe.core.media import EXTENSIONS
from imgpipe.core.records import check_id

PARTIAL = ".tmp-"  # name prefix of a file being written in place (see write_atomic)
_UUID_NAME = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
def ext_for(fmt: str) -> str:
    return EXTENSIONS.get(fmt, "bin")


class Blobs:
    """Originals and outputs as files under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for sub in ("originals", "outputs", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    def original_path(self, job_id: str, idx: int, fmt: str) -> Path:
        return self.root / "originals" / check_id(job_id) / f"{int(idx)}.{ext_for(fmt)}"

    def output_path(self, job_id: str, n: int, fmt: str) -> Path:
        return self.root / "outputs" / check_id(job_id) / f"{int(n)}.{ext_for(fmt)}"

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    def save_original(self, job_id: str, idx: int, fmt: str, data: bytes | memoryview) -> Path:
        return write_atomic(self.original_path(job_id, idx, fmt), data)

    def adopt_original(self, job_id: str, idx: int, fmt: str, tmp: Path) -> Path:
        """Move an already-written temp file (same filesystem) into place."""
        path = self.original_path(job_id, idx, fmt)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, path)
        return path

    def read_original(self, job_id: str, idx: int, fmt: str) -> bytes:
        return self.original_path(job_id, idx, fmt).read_bytes()

    def remove_originals(self, job_id: str) -> None:
        shutil.rmtree(self.root / "originals" / check_id(job_id), ignore_errors=True)

    def write_output(self, job_id: str, n: int, fmt: str, data: bytes | memoryview) -> Path:
        return write_atomic(self.output_path(job_id, n, fmt), data)

    def open_output(self, job_id: str, n: int, fmt: str) -> BinaryIO | None:
        """The output's file opened for reading, or None when there is none."""
        try:
            return self.output_path(job_id, n, fmt).open("rb")
        except FileNotFoundError:
            return None

    def link_output(self, src_job: str, src_n: int, job_id: str, n: int, fmt: str) -> Path:
        """Output ``n`` of ``job_id`` as a hard link to an existing output (the result
        cache): no bytes copied, and either job may expire without the other losing its
        file. FileNotFoundError when the source is gone."""
        src = self.output_path(src_job, src_n, fmt)
        path = self.output_path(job_id, n, fmt)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        try:
            os.link(src, path)
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            write_atomic(path, src.read_bytes())  # a filesystem without hard links
        return path

    def remove_job(self, job_id: str) -> None:
        for sub in ("originals", "outputs"):
            shutil.rmtree(self.root / sub / check_id(job_id), ignore_errors=True)

    def bytes_on_disk(self) -> int:
        """Bytes of every original and output now (a walk: for a first start only)."""
        total = 0
        for sub in ("originals", "outputs"):
            for path in (self.root / sub).glob("*/*"):
                with contextlib.suppress(OSError):
                    total += path.stat().st_size
        return total

    def sweep(self, known: Callable[[str], bool], older_than: float) -> int:
        """Remove files older than ``older_than`` that no job owns: staged uploads,
        half-written outputs, and the folders of jobs ``known`` does not know."""
        removed = 0

        def old(path: Path) -> bool:
            try:
                return path.stat().st_mtime < older_than
            except FileNotFoundError:
                return False

        for path in [*self.tmp_dir.glob("up-*"), *(self.root / "outputs").glob(f"*/{PARTIAL}*")]:
            if old(path):
                path.unlink(missing_ok=True)
                removed += 1
        for sub in ("originals", "outputs"):
            for folder in (self.root / sub).iterdir():
                if _UUID_NAME.match(folder.name) and old(folder) and not known(folder.name):
                    shutil.rmtree(folder, ignore_errors=True)
                    removed += 1
        return removed

    def remove_partial_outputs(self) -> int:
        """Output files a killed writer left half-written; how many were removed."""
        count = 0
        for path in (self.root / "outputs").glob(f"*/{PARTIAL}*"):
            path.unlink(missing_ok=True)
            count += 1
        return count


def write_atomic(path: Path, data: bytes | memoryview) -> Path:
    """Write ``data`` to a temp file beside ``path``, flush it to disk, rename it into
    place and flush the folder: once this returns, the file survives a power loss (the
    store commits an output's row only after it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=PARTIAL)
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
