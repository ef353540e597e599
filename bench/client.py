"""The gateway's public HTTP API as the bench and stress commands use it.

Only DESIGN.md's contract: ``POST /api/process/`` (multipart ``image`` parts and
``ops`` fields, ``?wait=S``, ``Accept: image/*``), ``GET /api/jobs/{id}``, its outputs,
``/api/workers``, ``/api/metrics`` and ``/healthz``. Load is loopback-only unless the
caller allows otherwise, so a typo cannot aim a burst at someone else's server.
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import socket
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import httpx

from imgpipe.core.records import FINAL_JOB

DEFAULT_URL = "http://127.0.0.1:8000"


def default_url() -> str:
    return os.environ.get("IMGPIPE_URL", DEFAULT_URL).rstrip("/")


def is_loopback(url: str) -> bool:
    """True when every address ``url``'s host resolves to is a loopback address."""
    host = urlsplit(url).hostname
    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def check_target(url: str, allow_remote: bool) -> str | None:
    """An error message when load must not go to ``url``; None when it may."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{url!r} is not an http(s) URL"
    if not allow_remote and not is_loopback(url):
        return (f"{url} is not a loopback address; load goes to this machine only "
                "unless --allow-remote is given")
    return None


def form(images: list[bytes], chains: list[str]) -> tuple[list[Any], dict[str, list[str]]]:
    """Multipart ``files`` and ``data`` for one job: every image × every chain."""
    files = [("image", (f"image-{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    return files, {"ops": list(chains)}


# Load and bench measure the pipeline: a repeated image must be processed again, not
# answered from the result cache.
NO_CACHE = {"cache": "0"}


def process_wait_image(client: httpx.Client, url: str, image: bytes, spec: str, *,
                       wait_s: float, accept: str = "image/jpeg") -> httpx.Response:
    """One image, one chain, answered with the output image itself (``?wait`` + Accept)."""
    files, data = form([image], [spec])
    return client.post(f"{url}/api/process/", params={"wait": f"{wait_s:g}", **NO_CACHE},
                       files=files, data=data, headers={"Accept": accept},
                       timeout=wait_s + 30.0)


def submit(client: httpx.Client, url: str, images: list[bytes], chains: list[str],
           ) -> httpx.Response:
    files, data = form(images, chains)
    return client.post(f"{url}/api/process/", params=NO_CACHE, files=files, data=data)


def job(client: httpx.Client, url: str, job_id: str, wait_s: float = 0.0) -> dict[str, Any]:
    params = {"wait": f"{wait_s:g}"} if wait_s > 0 else None
    resp = client.get(f"{url}/api/jobs/{job_id}", params=params, timeout=wait_s + 10.0)
    resp.raise_for_status()
    return dict(resp.json())


def wait_output(client: httpx.Client, url: str, job_id: str, timeout: float,
                n: int = 0, interval: float = 0.05) -> httpx.Response:
    """Poll the job until final, then GET output ``n``; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while job(client, url, job_id)["state"] not in FINAL_JOB:
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} not final within {timeout:g} s")
        time.sleep(interval)
    return client.get(f"{url}/api/jobs/{job_id}/outputs/{n}")


def workers(client: httpx.Client, url: str) -> list[dict[str, Any]]:
    resp = client.get(f"{url}/api/workers", timeout=5.0)
    resp.raise_for_status()
    body = resp.json()
    return list(body["workers"] if isinstance(body, dict) else body)


def alive_workers(client: httpx.Client, url: str) -> list[dict[str, Any]]:
    return [w for w in workers(client, url) if w.get("state") != "lost"]


def healthy(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(f"{url}/healthz", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def multipart_body(images: list[bytes], chains: list[str],
                   boundary: str = "imgpipe-bench-7f3c9a") -> tuple[bytes, str]:
    """A ready-to-send ``multipart/form-data`` body and its content type."""
    parts = []
    for i, data in enumerate(images):
        parts += [f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
                  f"filename=\"image-{i}.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n".encode(),
                  data, b"\r\n"]
    for spec in chains:
        parts += [f"--{boundary}\r\nContent-Disposition: form-data; name=\"ops\"\r\n\r\n"
                  f"{spec}\r\n".encode()]
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class LeanPoster:
    """A load generator that costs the machine next to nothing per request.

    The bench runs its client on the machine it measures, so the client's CPU is taken
    from the stack under test: httpx spent ~60 ms of CPU per 4K upload here (multipart
    encoding and response parsing in Python). This keeps one keep-alive
    ``http.client`` connection per thread and sends bodies built once, so a request
    costs a socket write and a buffered read.
    """

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.timeout = timeout
        self._local = threading.local()
        self._all: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def post(self, path: str, body: bytes, content_type: str,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """POST ``body``; (status, lower-cased headers, body). Reconnects once if dropped."""
        for attempt in (1, 2):
            conn = self._conn()
            try:
                conn.request("POST", path, body=body,
                             headers={"Content-Type": content_type, **(headers or {})})
                resp = conn.getresponse()
                data = resp.read()
                if resp.getheader("connection", "").lower() == "close":
                    self.close_thread()
                return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
            except (OSError, http.client.HTTPException):
                self.close_thread()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close_thread(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def close(self) -> None:
        """Close every thread's connection (call when no request is in flight)."""
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()
