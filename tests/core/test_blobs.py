"""The blob store's contract, on both kinds: a directory and S3 (the tests' moto server)."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from imgpipe.core.blobs import Blobs, DirBlobs, open_blobs, original_key, output_key
from imgpipe.core.errors import ConfigError
from imgpipe.core.records import NotFound, new_job_id
from tests.support import make_settings

LATER = time.time() + 3600  # a cut-off after everything made here: all of it is "old"


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def read(blobs: Blobs, job: str, n: int, fmt: str = "png") -> bytes | None:
    fh = blobs.open_output(job, n, fmt)
    if fh is None:
        return None
    with fh:
        return fh.read()


def staged(blobs: Blobs, data: bytes) -> Path:
    fd, path = blobs.stage()
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path


def test_originals_from_bytes_and_from_a_staged_upload(blobs: Blobs) -> None:
    job = new_job_id()
    blobs.put_original(job, 0, "jpeg", b"\xff\xd8zero")
    blobs.put_original(job, 1, "png", memoryview(b"\x89PNGone"))
    tmp = staged(blobs, b"\xff\xd8two" * 1000)
    blobs.adopt_original(job, 2, "jpeg", tmp)
    assert not tmp.exists()  # the staged file is consumed
    assert blobs.read_original(job, 0, "jpeg") == b"\xff\xd8zero"
    assert blobs.read_original(job, 1, "png") == b"\x89PNGone"
    assert blobs.read_original(job, 2, "jpeg") == b"\xff\xd8two" * 1000
    with pytest.raises(FileNotFoundError):
        blobs.read_original(job, 3, "jpeg")
    blobs.remove_originals(job)
    with pytest.raises(FileNotFoundError):
        blobs.read_original(job, 0, "jpeg")
    assert blobs.bytes_used() == 0


def test_an_output_is_replaced_whole_and_streams_with_its_size(blobs: Blobs) -> None:
    job = new_job_id()
    assert blobs.open_output(job, 0, "png") is None
    blobs.write_output(job, 0, "png", b"first")
    big = os.urandom(300_000)
    blobs.write_output(job, 0, "png", memoryview(big))
    fh = blobs.open_output(job, 0, "png")
    assert fh is not None
    with fh:
        assert fh.size == len(big)
        chunks = []
        while chunk := fh.read(65536):  # the gateway reads in blocks
            chunks.append(chunk)
    assert b"".join(chunks) == big
    assert blobs.bytes_used() == len(big)
    blobs.remove_output(job, 0, "png")
    blobs.remove_output(job, 0, "png")  # removing what is gone is fine
    assert blobs.open_output(job, 0, "png") is None


def test_outputs_prepared_ahead_are_written_and_removed_as_any(blobs: Blobs) -> None:
    job = new_job_id()
    blobs.prepare_outputs(job)
    blobs.prepare_outputs(job)  # twice (a retried request) is fine
    if isinstance(blobs, DirBlobs):  # the folder the sink would make, made ahead
        assert (blobs.root / "outputs" / job).is_dir()
    assert blobs.open_output(job, 0, "png") is None and blobs.bytes_used() == 0
    blobs.write_output(job, 0, "png", b"out")
    assert read(blobs, job, 0) == b"out"
    blobs.remove_jobs([job])
    assert read(blobs, job, 0) is None
    if isinstance(blobs, DirBlobs):
        assert not (blobs.root / "outputs" / job).exists()
    with pytest.raises(NotFound):
        blobs.prepare_outputs("../../etc")


def test_a_linked_output_outlives_its_source(blobs: Blobs) -> None:
    first, second = new_job_id(), new_job_id()
    blobs.write_output(first, 1, "webp", b"cached bytes")
    blobs.link_output(first, 1, second, 0, "webp")
    blobs.remove_jobs([first])
    assert read(blobs, first, 1, "webp") is None
    assert read(blobs, second, 0, "webp") == b"cached bytes"
    with pytest.raises(FileNotFoundError):
        blobs.link_output(first, 1, new_job_id(), 0, "webp")


def test_remove_jobs_takes_originals_and_outputs_and_leaves_the_rest(blobs: Blobs) -> None:
    jobs = [new_job_id() for _ in range(3)]
    for j in jobs:
        blobs.put_original(j, 0, "jpeg", b"o")
        for n in range(2):
            blobs.write_output(j, n, "png", b"out")
    blobs.remove_jobs(jobs[:2])
    blobs.remove_jobs([])
    for j in jobs[:2]:
        assert read(blobs, j, 0) is None
        with pytest.raises(FileNotFoundError):
            blobs.read_original(j, 0, "jpeg")
    assert read(blobs, jobs[2], 1) == b"out"
    assert blobs.bytes_used() == 1 + 2 * 3


def test_the_sweep_takes_only_old_blobs_no_job_owns(blobs: Blobs) -> None:
    kept, orphan = new_job_id(), new_job_id()
    blobs.put_original(kept, 0, "jpeg", b"k")
    blobs.write_output(kept, 0, "png", b"k")
    blobs.put_original(orphan, 0, "jpeg", b"o")    # moved in, job row never written
    blobs.write_output(orphan, 0, "png", b"o")     # or the job's rows were dropped
    cut_off = staged(blobs, b"half an upload")     # a gateway killed mid-body
    asked: list[str] = []

    def known(job: str) -> bool:
        asked.append(job)
        return job == kept

    assert blobs.sweep(known, older_than=time.time() - 600) == 0  # all young: kept
    assert blobs.sweep(known, older_than=LATER) == 3  # the staged file, 2 of orphan's
    assert not cut_off.exists()
    assert read(blobs, kept, 0) == b"k" and read(blobs, orphan, 0) is None
    assert set(asked) == {kept, orphan}
    assert blobs.sweep(known, older_than=LATER) == 0


@pytest.mark.parametrize("bad", ["../etc", "", "0" * 36, new_job_id().upper(),
                                 new_job_id() + "/x", None, 5])
def test_hostile_ids_never_make_a_key(bad: object) -> None:
    for key in (original_key, output_key):
        with pytest.raises(NotFound):
            key(bad, 0, "png")  # type: ignore[arg-type]


def test_keys_are_the_same_in_both_stores() -> None:
    job = new_job_id()
    assert original_key(job, 2, "jpeg") == f"originals/{job}/2.jpg"
    assert output_key(job, 0, "webp") == f"outputs/{job}/0.webp"
    assert output_key(job, 0, "nonsense") == f"outputs/{job}/0.bin"


def test_directory_outputs_are_written_atomically_and_partials_swept_once_old(
        tmp_path: Path) -> None:
    blobs = DirBlobs(tmp_path)
    job = new_job_id()
    blobs.write_output(job, 0, "png", b"first")
    blobs.write_output(job, 0, "png", memoryview(b"second"))
    path = blobs.output_path(job, 0, "png")
    assert path.read_bytes() == b"second"
    assert [p.name for p in path.parent.iterdir()] == ["0.png"]  # no temp files left
    host = socket.gethostname()
    dead = _dead_pid()
    me = f"{os.getpid()}.{psutil.Process().create_time():.2f}"
    killed = path.parent / f".tmp-{dead}.1.00@{host}~x1"   # this host's writer, gone
    reused = path.parent / f".tmp-{os.getpid()}.1.00@{host}~x2"  # its pid now another's
    running = path.parent / f".tmp-{me}@{host}~x3"        # this host's, alive
    elsewhere = path.parent / f".tmp-{dead}.1.00@other-{host}~x4"  # another host's sink
    unnamed = path.parent / ".tmp-half"                   # no writer in its name
    for half in (killed, reused, running, elsewhere, unnamed):
        half.write_bytes(b"half")
    assert blobs.remove_partial_outputs(older_than=time.time() - 60) == 2  # the rest may be live
    assert not killed.exists() and not reused.exists()
    assert blobs.remove_partial_outputs(older_than=LATER) == 3  # once old, whoever wrote them
    assert [p.name for p in path.parent.iterdir()] == ["0.png"]


def test_a_directory_output_goes_out_through_socket_sendfile(tmp_path: Path) -> None:
    """What gunicorn does with it: ``socket.sendfile`` on a socket with a timeout (the
    gateway's sockets all have one), which seeks the file past what it sent."""
    blobs = DirBlobs(tmp_path)
    job, data = new_job_id(), os.urandom(300_000)
    blobs.write_output(job, 0, "png", data)
    fh = blobs.open_output(job, 0, "png")
    assert fh is not None
    a, b = socket.socketpair()
    a.settimeout(10)
    got = bytearray()

    def drain() -> None:
        while len(got) < len(data) and (chunk := b.recv(65536)):
            got.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        with fh:
            assert a.sendfile(fh, offset=0, count=fh.size) == len(data)  # type: ignore[arg-type]
    finally:
        reader.join(10)
        a.close()
        b.close()
    assert bytes(got) == data


def test_blob_url_picks_the_store(tmp_path: Path, s3_server: str,
                                  s3_env: dict[str, str]) -> None:
    from imgpipe.core.s3 import S3Blobs

    assert open_blobs(make_settings(tmp_path / "data")).root == tmp_path / "data"  # type: ignore[attr-defined]
    shared = open_blobs(make_settings(tmp_path / "data", blob_url=f"file://{tmp_path}/nfs"))
    assert isinstance(shared, DirBlobs) and shared.root == tmp_path / "nfs"
    assert open_blobs(make_settings(tmp_path / "data", blob_url=str(tmp_path / "b"))).root \
        == tmp_path / "b"  # type: ignore[attr-defined]
    s3 = open_blobs(make_settings(tmp_path / "data", blob_url="s3://pics/img/pipe/",
                                  s3_endpoint_url=s3_server, s3_max_connections=3))
    assert isinstance(s3, S3Blobs)
    assert (s3.bucket, s3.prefix, s3.endpoint_url) == ("pics", "img/pipe/", s3_server)
    assert s3.staging == tmp_path / "data" / "tmp"  # staging stays local
    assert s3.client.meta.config.max_pool_connections == 3
    assert s3.client.meta.region_name == "us-east-1"  # from AWS_REGION
    for bad in ("s3://", "ftp://host/x", "file://"):
        with pytest.raises(ConfigError, match="IMGPIPE_BLOB_URL"):
            make_settings(tmp_path, blob_url=bad)
    with pytest.raises(ConfigError, match="IMGPIPE_S3_ENDPOINT_URL"):
        make_settings(tmp_path, s3_endpoint_url="minio:9000")


def test_an_unreachable_object_store_is_an_oserror(tmp_path: Path,
                                                   s3_env: dict[str, str]) -> None:
    from imgpipe.core.s3 import S3Blobs
    from tests.support import free_port

    dead = S3Blobs("pics", staging=tmp_path, endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(OSError, match="originals/"):
        dead.put_original(new_job_id(), 0, "jpeg", b"x")


@pytest.mark.parametrize("blobs", ["s3"], indirect=True)
def test_each_process_makes_its_own_client_after_a_fork(blobs: Blobs) -> None:
    """gunicorn forks: a client (its connection pool) made before must not be reused."""
    from imgpipe.core.s3 import S3Blobs

    assert isinstance(blobs, S3Blobs)
    job = new_job_id()
    blobs.put_original(job, 0, "jpeg", b"before the fork")
    parent = blobs.client
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running pytest's teardown
        try:
            ok = blobs.read_original(job, 0, "jpeg") == b"before the fork"
            os.write(wfd, b"1" if ok and blobs.client is not parent else b"0")
        finally:
            os._exit(0)
    os.close(wfd)
    try:
        with os.fdopen(rfd, "rb") as r:
            answer = r.read()
    finally:
        os.waitpid(pid, 0)
    assert answer == b"1"
    assert blobs.client is parent  # the parent keeps its own
