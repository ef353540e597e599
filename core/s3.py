"""S3-compatible object storage as the blob store: ``IMGPIPE_BLOB_URL=s3://bucket/prefix``.

Keys are the directory store's paths under ``prefix`` (layout in
:mod:`imgpipe.core.blobs`). Through boto3:

* Every put is one PutObject (uploads are capped far below its 5 GB limit). S3 shows an
  object whole or not at all, and only once it is stored, so there is nothing
  half-written to clean up and an output is durable before its row commits.
* The result cache copies an output with CopyObject: the bytes stay in the store.
* One client per process, made on first use: gunicorn may fork after the app is built,
  and a boto3 client (its connection pool) must not cross a fork. The pool is bounded
  (``IMGPIPE_S3_MAX_CONNECTIONS``); botocore's standard mode retries throttling and
  transient errors.
* Errors become OSError (FileNotFoundError for a missing key), so callers handle an
  unreachable store as they handle a failing disk: the sink answers retry, the gateway
  refuses the upload.

Credentials and region come from boto3's own chain (``AWS_ACCESS_KEY_ID`` and
``AWS_SECRET_ACCESS_KEY``, a profile, an instance role); ``AWS_REGION`` is honoured as
well as ``AWS_DEFAULT_REGION``. ``IMGPIPE_S3_ENDPOINT_URL`` names another S3-compatible
server (MinIO, Ceph RGW, Garage, ...), which is then addressed path-style.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from imgpipe.core.blobs import (
    SUBDIRS,
    UUID_NAME,
    BlobFile,
    Blobs,
    ObjectStoreError,
    original_key,
    output_key,
)
from imgpipe.core.config import Settings
from imgpipe.core.media import CONTENT_TYPES
from imgpipe.core.records import check_id

MISSING = ("NoSuchKey", "404", "NotFound")
DELETE_BATCH = 1000   # keys per DeleteObjects request (the API's maximum)
LIST_THREADS = 8      # job prefixes listed at once when jobs are dropped


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix")."""
    parts = urlsplit(url)
    return parts.netloc, parts.path.strip("/")


class S3Blobs(Blobs):
    """Originals and outputs as objects in ``bucket`` under ``prefix``; uploads are
    staged in the local folder ``staging`` first."""

    def __init__(self, bucket: str, prefix: str = "", *, staging: Path,
                 endpoint_url: str | None = None, max_connections: int = 20) -> None:
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self.staging = Path(staging)
        self.staging.mkdir(parents=True, exist_ok=True)
        self.endpoint_url = endpoint_url or None
        self.max_connections = max_connections
        self._client: Any = None
        self._pid = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Blobs:
        bucket, prefix = parse_url(settings.blob_url)
        return cls(bucket, prefix, staging=settings.data_dir / "tmp",
                   endpoint_url=settings.s3_endpoint_url,
                   max_connections=settings.s3_max_connections)

    def __repr__(self) -> str:
        return f"S3Blobs('s3://{self.bucket}/{self.prefix}', endpoint={self.endpoint_url!r})"

    # --- the client -------------------------------------------------------------------
    @property
    def client(self) -> Any:
        """This process's client (made here after a fork; boto3 clients are thread-safe)."""
        pid = os.getpid()
        if self._client is None or self._pid != pid:
            with _LOCK:
                if self._client is None or self._pid != pid:
                    self._client = self._make_client()
                    self._pid = pid
        return self._client

    def _make_client(self) -> Any:
        session = boto3.session.Session(region_name=os.environ.get("AWS_REGION") or None)
        options: dict[str, Any] = {
            "max_pool_connections": self.max_connections,
            "retries": {"mode": "standard", "max_attempts": 4},
            "connect_timeout": 5,
            "read_timeout": 30,
        }
        if "request_checksum_calculation" in Config.OPTION_DEFAULTS:  # botocore >= 1.36
            # Checksums only where the API requires them: servers other than AWS do not
            # all accept the CRC trailers botocore sends by default since 1.36.
            options["request_checksum_calculation"] = "when_required"
            options["response_checksum_validation"] = "when_required"
        if self.endpoint_url:
            options["s3"] = {"addressing_style": "path"}
        return session.client("s3", endpoint_url=self.endpoint_url,
                              region_name=session.region_name or "us-east-1",
                              config=Config(**options))

    def close(self) -> None:
        if self._client is not None and self._pid == os.getpid():
            self._client.close()
        self._client = None

    # --- originals ----------------------------------------------------------------------
    def put_original(self, job_id: str, idx: int, fmt: str, data: bytes | memoryview) -> None:
        self._put(original_key(job_id, idx, fmt), bytes(data), fmt)

    def adopt_original(self, job_id: str, idx: int, fmt: str, staged: Path) -> None:
        with open(staged, "rb") as fh:
            self._put(original_key(job_id, idx, fmt), fh, fmt)
        staged.unlink(missing_ok=True)

    def read_original(self, job_id: str, idx: int, fmt: str) -> bytes:
        key = original_key(job_id, idx, fmt)
        with _errors(key):
            body = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"]
            with contextlib.closing(body):
                return bytes(body.read())

    def remove_originals(self, job_id: str) -> None:
        self._delete(list(self._keys(f"originals/{check_id(job_id)}/")))

    # --- outputs ------------------------------------------------------------------------
    def write_output(self, job_id: str, n: int, fmt: str, data: bytes | memoryview) -> None:
        self._put(output_key(job_id, n, fmt), bytes(data), fmt)

    def open_output(self, job_id: str, n: int, fmt: str) -> BlobFile | None:
        key = output_key(job_id, n, fmt)
        try:
            with _errors(key):
                got = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
        except FileNotFoundError:
            return None
        return _S3File(got["Body"], int(got["ContentLength"]))

    def remove_output(self, job_id: str, n: int, fmt: str) -> None:
        self._delete([output_key(job_id, n, fmt)])

    def link_output(self, src_job: str, src_n: int, job_id: str, n: int, fmt: str) -> None:
        """A server-side CopyObject: the bytes never leave the store."""
        src, dst = output_key(src_job, src_n, fmt), output_key(job_id, n, fmt)
        with _errors(src):
            self.client.copy_object(Bucket=self.bucket, Key=self.prefix + dst,
                                    CopySource={"Bucket": self.bucket, "Key": self.prefix + src})

    def remove_partial_outputs(self, older_than: float) -> int:
        return 0  # a PutObject is whole or absent: no object is ever half-written

    # --- jobs, leftovers, bytes -------------------------------------------------------------
    def remove_jobs(self, job_ids: Sequence[str]) -> None:
        prefixes = [f"{sub}/{check_id(j)}/" for j in job_ids for sub in SUBDIRS]
        if not prefixes:
            return
        with ThreadPoolExecutor(min(LIST_THREADS, len(prefixes))) as pool:
            listed = pool.map(lambda p: list(self._keys(p)), prefixes)
            self._delete([key for keys in listed for key in keys])

    def sweep(self, known: Callable[[str], bool], older_than: float) -> int:
        removed = self.sweep_staged(older_than)
        groups: dict[tuple[str, str], list[str]] = defaultdict(list)
        newest: dict[tuple[str, str], float] = {}
        for sub in SUBDIRS:
            for key, _size, mtime in self._objects(f"{sub}/"):
                job = key.split("/")[1]
                if UUID_NAME.match(job):
                    groups[(sub, job)].append(key)
                    newest[(sub, job)] = max(newest.get((sub, job), 0.0), mtime)
        owned: dict[str, bool] = {}
        doomed: list[str] = []
        for (sub, job), keys in groups.items():
            if newest[(sub, job)] >= older_than:
                continue
            if job not in owned:
                owned[job] = known(job)
            if not owned[job]:
                doomed += keys
                removed += 1
        self._delete(doomed)
        return removed

    def bytes_used(self) -> int:
        return sum(size for sub in SUBDIRS for _key, size, _mtime in self._objects(f"{sub}/"))

    # --- requests ------------------------------------------------------------------------
    def _put(self, key: str, body: Any, fmt: str) -> None:
        with _errors(key):
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=body,
                                   ContentType=CONTENT_TYPES.get(fmt, "application/octet-stream"))

    def _objects(self, under: str) -> Iterator[tuple[str, int, float]]:
        """(key below the prefix, size, last modified as epoch seconds) under ``under``."""
        with _errors(under):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + under)
            for page in pages:
                for obj in page.get("Contents", ()):
                    yield (obj["Key"][len(self.prefix):], int(obj["Size"]),
                           obj["LastModified"].timestamp())

    def _keys(self, under: str) -> Iterator[str]:
        return (key for key, _size, _mtime in self._objects(under))

    def _delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), DELETE_BATCH):
            batch = keys[i:i + DELETE_BATCH]
            with _errors(batch[0]):
                got = self.client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": self.prefix + k} for k in batch], "Quiet": True})
            failed = got.get("Errors") or []
            if failed:
                raise ObjectStoreError(errno.EIO, f"could not delete {len(failed)} object(s),"
                                       f" first {failed[0].get('Key')}: {failed[0].get('Code')}")


class _S3File(BlobFile):
    """An object's body being streamed; closing it returns the connection to the pool."""

    def __init__(self, body: Any, size: int) -> None:
        super().__init__(size)
        self._body = body

    def readinto(self, buffer: Any) -> int:
        with _errors("read"):
            data = self._body.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        with _errors("read"):
            return bytes(self._body.read())

    def close(self) -> None:
        body = getattr(self, "_body", None)
        if body is not None:
            body.close()
        super().close()


@contextlib.contextmanager
def _errors(what: str) -> Iterator[None]:
    """botocore's errors as OSError: FileNotFoundError for a missing key."""
    try:
        yield
    except ClientError as exc:
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        if code in MISSING:
            raise FileNotFoundError(errno.ENOENT, f"{what}: no such object") from None
        raise ObjectStoreError(errno.EIO, f"{what}: {code} {err.get('Message', '')}") from exc
    except BotoCoreError as exc:
        raise ObjectStoreError(errno.EIO, f"{what}: {exc}") from exc


def _new_lock() -> None:
    global _LOCK
    _LOCK = threading.Lock()  # a lock held by another thread at fork time stays held


_LOCK = threading.Lock()
os.register_at_fork(after_in_child=_new_lock)
