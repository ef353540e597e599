"""Helpers the tests share: settings on private endpoints, deadline-bound receives, probes.

Every receive goes through :func:`recv` (polls with a deadline and fails loudly), every
wait through :func:`wait_for` (a condition polled until a deadline) — never a bare
sleep to let ZeroMQ settle.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import zmq

from imgpipe.bench.stack import free_port as free_port  # re-exported: the tests take it from here
from imgpipe.core.config import Settings

T = TypeVar("T")


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


def spawn(settings: Settings, command: str, *args: str, log: Path | None,
          env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """``python -m imgpipe <command> *args`` seeing ``settings`` (plus ``env``); its output
    goes to ``log``, or nowhere when that is None. Run in ``cwd`` it is ``python -P``, as
    the ``imgpipe`` script is: the working directory is not on its ``sys.path``."""
    safe = ["-P"] if cwd is not None else []
    with open(log, "wb") if log else contextlib.nullcontext(subprocess.DEVNULL) as out:
        return subprocess.Popen([sys.executable, *safe, "-m", "imgpipe", command, *args],
                                env={**settings_env(settings), **(env or {})}, cwd=cwd,
                                stdout=out, stderr=subprocess.STDOUT)


# What boto3 needs to talk to the tests' S3 server and to nothing else: fixed dummy
# credentials (moto takes any), no config files, no instance-metadata lookups.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "imgpipe-test",
    "AWS_SECRET_ACCESS_KEY": "imgpipe-test-secret",
    "AWS_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent/imgpipe-test",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/imgpipe-test",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def s3_client(endpoint: str) -> Any:
    """A plain boto3 client on the tests' S3 server (to make buckets and look inside)."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session(
        aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name=S3_ENV["AWS_REGION"]).client(
            "s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"}))


def new_bucket(endpoint: str) -> str:
    """A fresh, empty bucket on the tests' S3 server, so no two tests share objects."""
    import uuid

    name = f"imgpipe-{uuid.uuid4().hex[:16]}"
    s3_client(endpoint).create_bucket(Bucket=name)
    return name


def bucket_keys(endpoint: str, bucket: str) -> list[str]:
    """Every key in ``bucket`` (sorted)."""
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", ()))


def output_bytes(store: Any, job: str, n: int, fmt: str = "png") -> bytes | None:
    """Output ``n``'s bytes as its blob store holds them, or None when it holds none."""
    fh = store._blobs.open_output(job, n, fmt)
    if fh is None:
        return None
    with fh:
        return bytes(fh.read())


def original_bytes(store: Any, job: str, idx: int, fmt: str = "jpeg") -> bytes | None:
    """Original ``idx``'s bytes as its blob store holds them, or None when it holds none."""
    try:
        return bytes(store._blobs.read_original(job, idx, fmt))
    except FileNotFoundError:
        return None


def recv(sock: zmq.Socket[Any], timeout: float = 5.0, *, copy: bool = True) -> list[Any]:
    """One multipart message, or an AssertionError after ``timeout`` seconds."""
    if not sock.poll(int(timeout * 1000), zmq.POLLIN):
        raise AssertionError(f"nothing received on {sock} within {timeout} s")
    return list(sock.recv_multipart(copy=copy))  # type: ignore[call-overload]


def wait_for(check: Callable[[], T | None], timeout: float = 10.0, *, interval: float = 0.05,
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


class Stack:
    """A local stack (`imgpipe up`) started for a test; see :func:`running_stack`."""

    def __init__(self, settings: Settings, proc: Any, log_path: Path) -> None:
        self.settings = settings
        self.proc = proc
        self.log_path = log_path
        self.url = settings.gateway_url

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def workers(self, *, alive_only: bool = True) -> list[dict[str, Any]]:
        import httpx

        resp = httpx.get(f"{self.url}/api/workers", timeout=5)
        resp.raise_for_status()
        body = resp.json()
        rows = body["workers"] if isinstance(body, dict) else body
        return [w for w in rows if not alive_only or w["state"] != "lost"]

    def wait_workers(self, n: int, timeout: float = 60.0) -> list[dict[str, Any]]:
        def exactly_n() -> list[dict[str, Any]] | None:
            ws = self.workers()
            return ws if len(ws) == n else None

        try:
            return wait_for(exactly_n, timeout, interval=0.2, what=f"{n} live workers")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- stack log ---\n{self.log()}") from None


def start_stack(settings: Settings, workers: int, *extra: str,
                env: dict[str, str] | None = None, cwd: Path | None = None) -> Stack:
    """Start ``imgpipe up`` on ``settings`` (in ``cwd``, if given); return once /healthz
    is 200 with N workers.

    Fails loudly (with the stack's log) when it does not get there in time.
    """

    log_path = settings.data_dir.parent / "stack.log"
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    proc = spawn(settings, "up", "--workers", str(workers), "--no-dashboard", *extra,
                 log=log_path, env=env, cwd=cwd)
    stack = Stack(settings, proc, log_path)

    try:
        wait_for(answers(proc, f"{stack.url}/healthz", lambda: f"imgpipe up exited with "
                         f"{proc.returncode}:\n{stack.log()}"),
                 90, interval=0.2, what=f"stack healthy at {stack.url}")
        if workers:
            stack.wait_workers(workers)
    except BaseException:
        stop_stack(stack)
        raise
    return stack


def stop_stack(stack: Stack, timeout: float = 30.0) -> int:
    """SIGTERM the supervisor and wait; SIGKILL if it hangs. Returns its exit code."""
    import signal

    if stack.proc.poll() is None:
        stack.proc.send_signal(signal.SIGTERM)
        try:
            stack.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stack.proc.kill()
            stack.proc.wait()
            raise AssertionError(
                f"imgpipe up did not stop in {timeout} s:\n{stack.log()}") from None
    return int(stack.proc.returncode)


def fill_disk(path: Path) -> None:
    """Write zeros to ``path`` until its filesystem refuses (a full disk, for tests)."""
    with open(path, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass


def answers(proc: subprocess.Popen[bytes], url: str, died: Callable[[], str]
            ) -> Callable[[], bool]:
    """A wait_for predicate: ``url`` answers 200; fails with ``died()`` once ``proc`` has
    exited (a server that crashed is not waited for)."""
    import httpx

    def check() -> bool:
        if proc.poll() is not None:
            raise AssertionError(died())
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
    return check
