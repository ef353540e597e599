from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from imgpipe.core.config import Settings
from imgpipe.core.store import Store
from tests.support import make_settings

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


@pytest.fixture
def store(tmp_path: Path, store_url: str) -> Iterator[Store]:
    """A job store under tmp_path on each backend in turn."""
    s = Store(tmp_path, store_url)
    yield s
    s.close()


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
