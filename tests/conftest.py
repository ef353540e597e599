from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from imgpipe.core.config import Settings
from tests.support import make_settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings on private ipc:// endpoints and free ports, data under tmp_path."""
    return make_settings(tmp_path / "data")


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
