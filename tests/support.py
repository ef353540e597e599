"""Helpers the tests share: settings on private endpoints, deadline-bound receives, probes.

Every receive goes through :func:`recv` (polls with a deadline and fails loudly), every
wait through :func:`wait_for` (a condition polled until a deadline) — never a bare
sleep to let ZeroMQ settle.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import zmq

from core.config import Settings

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def short_dir(prefix: str = "ip-") -> Path:
    """A short temp dir: ipc:// paths must stay under ~100 characters."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings whose every endpoint is an ipc:// socket of its own and whose ports are free."""
    sock_dir = short_dir()
    eps = {name: f"ipc://{sock_dir}/{name.split('_endpoint')[0]}"
           for name in ("intake_endpoint", "light_task_endpoint", "heavy_task_endpoint",
                        "result_endpoint", "event_endpoint", "control_endpoint",
                        "bus_endpoint", "dashboard_bus_endpoint")}
    port = free_port()
    base = Settings(data_dir=data_dir, gateway_port=port, gateway_url=f"http://127.0.0.1:{port}",
                    dashboard_port=free_port(), **eps)  # type: ignore[arg-type]
    return base.with_overrides(**overrides).validate()


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process see ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGPIPE_")}
    env.update(settings.to_env())
    return env


def recv(sock: zmq.Socket[Any], timeout: float = 5.0, *, copy: bool = True) -> list[Any]:
    """One multipart message, or an AssertionError after ``timeout`` seconds."""
    if not sock.poll(int(timeout * 1000), zmq.POLLIN):
        raise AssertionError(f"nothing received on {sock} within {timeout} s")
    return sock.recv_multipart(copy=copy)


def wait_for(check: Callable[[], T], timeout: float = 10.0, *, interval: float = 0.05,
             what: str = "condition") -> T:
    """Poll ``check()`` until it returns something truthy; fail loudly at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:  # noqa: BLE001 - a probe may fail while starting
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"{what} not reached within {timeout} s (last: {last!r})")
