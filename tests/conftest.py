from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from imgpipe.core.blobs import Blobs, DirBlobs
from imgpipe.core.config import Settings
from imgpipe.core.store import Store
from tests.support import S3_ENV, answers, free_port, make_settings, new_bucket, wait_for

BACKENDS = ("sqlite", "postgres")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings on private ipc:// endpoints and free ports, data under tmp_path."""
    return make_settings(tmp_path / "data")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    """A PostgreSQL server for the whole session, from Debian's `postgresql` package,
    in a temp dir (bench/pgserver.py). Without the binaries a test that needs it skips,
    saying why, and fails instead under CI=true (.ci/system-deps.sh installs them)."""
    from imgpipe.bench.pgserver import PgServer, PgUnavailable

    try:
        server = PgServer().start()
    except PgUnavailable as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but no PostgreSQL to test on: {exc}")
        pytest.skip(f"no PostgreSQL here: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest) -> str:
    """Each backend in turn: "" (SQLite in the data dir), then a new, empty PostgreSQL
    database of the session's server (a database per test: tests stay independent)."""
    if request.param == "sqlite":
        return ""
    return str(request.getfixturevalue("pg_server").new_database())


class TrackingContext(zmq.Context):  # type: ignore[type-arg]
    """A context that remembers its sockets, so a test can fail on a leaked one."""

    made: list[zmq.Socket[Any]] | None = None  # class-level so pyzmq allows setting it

    def __init__(self) -> None:
        super().__init__()
        self.made = []

    def socket(self, socket_type: int, **kwargs: Any) -> zmq.Socket[Any]:  # type: ignore[override]
        sock = super().socket(socket_type, **kwargs)
        assert self.made is not None
        self.made.append(sock)
        return sock


@pytest.fixture
def zctx() -> Iterator[TrackingContext]:
    """A zmq context; the test fails if it leaves a socket open (closes them first)."""
    ctx = TrackingContext()
    yield ctx
    leaked = [s for s in ctx.made or [] if not s.closed]
    for s in leaked:
        s.close(linger=0)
    ctx.term()
    assert not leaked, f"{len(leaked)} socket(s) left open: {leaked}"


@pytest.fixture
def stack_factory(tmp_path: Path) -> Iterator[Any]:
    """Start local stacks (`imgpipe up`) on private endpoints; all stopped at teardown."""
    from tests.support import start_stack, stop_stack

    started: list[Any] = []

    def start(workers: int = 2, *extra: str, env: dict[str, str] | None = None,
              **overrides: Any) -> Any:
        s = make_settings(tmp_path / f"stack{len(started)}" / "data", **overrides)
        stack = start_stack(s, workers, *extra, env=env)
        started.append(stack)
        return stack

    yield start
    for stack in started:
        stop_stack(stack)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``tmpfs("40m")`` mounts a tmpfs of that size under ``tmp_path`` (a small /dev/shm
    as a container has, or a small disk) and returns it; unmounted at teardown. Skips
    without root or when this host does not allow the mount."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        target = tmp_path / f"shm{len(mounted)}"
        target.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=1777",
                               "tmpfs", str(target)], capture_output=True, text=True,
                              timeout=30)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        # Lazily if a process still maps a file there; the mount goes with the last one.
        if subprocess.run(["umount", str(target)], capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", str(target)], check=True, timeout=30)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An S3-compatible server for the session: moto's (``moto[server]``, a PyPI
    package, so it installs wherever the tests do), in its own process on a free
    loopback port. Yields its endpoint URL; stopped at the end of the session."""

    port = free_port()
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    env = {**os.environ, **S3_ENV}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                 "-p", str(port)], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(answers(proc, f"{url}/moto-api/", lambda: f"moto_server exited with "
                         f"{proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}"),
                 60, interval=0.1, what=f"the S3 server at {url}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process's AWS variables pointed at nothing but the tests' server."""
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return dict(S3_ENV)


@pytest.fixture(params=["dir", "s3"])
def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Blobs]:
    """Each blob store in turn: files under tmp_path, then a fresh bucket on the tests'
    S3 server (uploads staged under tmp_path/tmp)."""
    if request.param == "dir":
        yield DirBlobs(tmp_path)
        return
    from imgpipe.core.s3 import S3Blobs

    endpoint = request.getfixturevalue("s3_server")
    request.getfixturevalue("s3_env")
    store = S3Blobs(new_bucket(endpoint), "imgpipe/test", staging=tmp_path / "tmp",
                    endpoint_url=endpoint, max_connections=4)
    yield store
    store.close()


@pytest.fixture
def store(tmp_path: Path, store_url: str, blobs: Blobs) -> Iterator[Store]:
    """A job store under tmp_path on each backend, with each blob store, in turn."""
    s = Store(tmp_path, store_url, blobs=blobs)
    yield s
    s.close()
