"""``imgpipe health ROLE``: is the component of this container alive? (Docker health checks)

Exit status 0 means healthy, 1 unhealthy (Docker reserves 2, so usage errors answer 1
as well), and one line on stdout says why; Docker keeps that line in ``docker inspect``.

What each role's probe asks, and why that question:

* ``gateway``: ``GET /healthz`` on this host's gateway port. The gateway answers 503
  when the pipeline behind it (ventilator, sink, workers) is not ready; restarting the
  gateway would not fix that, so a 503 still counts as *alive* unless ``--ready``.
* ``ventilator``: a ``ping`` on the control socket this host binds.
* ``sink``: its result socket accepts connections here, and the ventilator has heard
  it on the bus within ``heartbeat_interval_s * heartbeat_liveness`` seconds.
* ``worker``: the ventilator lists a live worker whose host is this container's
  hostname (``--host``/``--pid`` narrow it outside containers).
* ``dashboard``: Streamlit's own ``/_stcore/health`` on this host's dashboard port.
* ``auto``: the role of the ``imgpipe ROLE`` process running beside the probe (what the
  image's single ``HEALTHCHECK`` uses, since one image serves every role).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import zmq

from imgpipe.core.config import (
    Settings,
    add_settings_args,
    endpoints,
    reachable_host,
    settings_from_args,
)
from imgpipe.core.control import Unavailable, ask
from imgpipe.core.errors import ImgpipeError

ROLES = ("gateway", "ventilator", "sink", "worker", "dashboard")


@dataclass(frozen=True)
class Verdict:
    ok: bool
    line: str


class Deadline:
    """One time budget (seconds) shared by every step of a probe."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.05, self.end - time.monotonic())


# --- where this host's component listens -----------------------------------------------
def local_endpoint(settings: Settings, endpoint: str) -> str:
    """The URL to reach the socket this host binds for ``endpoint`` (same port, bind_host)."""
    if not endpoint.startswith("tcp://"):
        return endpoint
    return f"tcp://{reachable_host(settings.bind_host)}:{urlsplit(endpoint).port}"


def listening(endpoint: str, timeout: float) -> str | None:
    """None when something accepts connections at ``endpoint``, else why not.

    A plain connect answers "connection refused" at once, where a ZeroMQ request to a
    port nobody binds would wait out its whole timeout.
    """
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        if not Path(path).exists():
            return f"nothing listens on {endpoint} (no socket file)"
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            try:
                s.connect(path)
            except OSError as exc:
                return f"nothing listens on {endpoint} ({exc.strerror or exc})"
        return None
    if endpoint.startswith("tcp://"):
        parts = urlsplit(endpoint)
        try:
            with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0),
                                          timeout=timeout):
                return None
        except OSError as exc:
            return f"cannot connect to {endpoint} ({exc.strerror or exc})"
    return None  # inproc and others: let the request itself decide


def _http_host(settings: Settings) -> str:
    """Where this host's HTTP servers (gateway, dashboard) answer: ``gateway_host``."""
    return reachable_host(settings.gateway_host)


def _http_get(url: str, timeout: float) -> tuple[int, str]:
    """(status, body) of a GET; status 0 with the reason when there is no HTTP answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - our own URL
            return resp.status, resp.read(4096).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read(4096).decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return 0, str(reason)


def _brief(body: str) -> str:
    """A short, one-line rendering of a JSON (or text) body for the verdict line."""
    try:
        data: Any = json.loads(body)
    except ValueError:
        return " ".join(body.split())[:200]
    if isinstance(data, dict):
        data = data.get("detail") or data.get("checks") or data.get("components") or data
    return json.dumps(data, separators=(",", ":"), sort_keys=True)[:200]


# --- one probe per role ----------------------------------------------------------------
def probe_gateway(settings: Settings, deadline: Deadline, *, url: str | None = None,
                  ready: bool = False) -> Verdict:
    if url is None:
        url = f"http://{_http_host(settings)}:{settings.gateway_port}"
    target = url.rstrip("/") + "/healthz"
    status, body = _http_get(target, deadline.left())
    if status == 200:
        return Verdict(True, f"gateway ready at {target}")
    if status == 503 and not ready:
        return Verdict(True, f"gateway alive at {target}; pipeline not ready: {_brief(body)}")
    if status == 0:
        return Verdict(False, f"gateway does not answer at {target}: {body}")
    return Verdict(False, f"gateway answered {status} at {target}: {_brief(body)}")


def listening_here(settings: Settings | None, setting: str,
                   deadline: Deadline) -> tuple[str, str | None]:
    """The first entry of an endpoint list that something listens on, or the last entry
    and why nothing does. With ``settings``, each entry as this host binds it (same
    port, bind_host): with two ventilators or sinks on one host, the probe of either
    finds one of them."""
    endpoint, why = "", None
    for entry in endpoints(setting):
        endpoint = local_endpoint(settings, entry) if settings is not None else entry
        why = listening(endpoint, deadline.left())
        if not why:
            break
    return endpoint, why


def probe_ventilator(ctx: zmq.Context[Any], settings: Settings, deadline: Deadline) -> Verdict:
    endpoint, why = listening_here(settings, settings.control_endpoint, deadline)
    if why:
        return Verdict(False, f"ventilator: {why}")
    try:
        info = ask(ctx, settings, "ping", timeout=deadline.left(), endpoint=endpoint)
    except ImgpipeError as exc:
        return Verdict(False, f"ventilator: {exc}")
    if not isinstance(info, dict) or info.get("role") != "ventilator":
        return Verdict(False, f"ventilator: {endpoint} answered ping with {info!r}")
    state = f"{info['state']}, " if "state" in info else ""
    return Verdict(True, f"ventilator answers at {endpoint} (pid {info.get('pid')}, {state}"
                         f"up {float(info.get('uptime_s') or 0):.0f} s)")


def _ask_ventilator(ctx: zmq.Context[Any], settings: Settings, op: str,
                    deadline: Deadline) -> tuple[Any, str | None]:
    _, why = listening_here(None, settings.control_endpoint, deadline)
    if why:
        return None, f"cannot ask the ventilator: {why}"
    try:
        return ask(ctx, settings, op, timeout=deadline.left()), None
    except Unavailable as exc:
        return None, f"cannot ask the ventilator: {exc}"
    except ImgpipeError as exc:
        return None, str(exc)


def probe_sink(ctx: zmq.Context[Any], settings: Settings, deadline: Deadline) -> Verdict:
    endpoint, why = listening_here(settings, settings.result_endpoint, deadline)
    if why:
        return Verdict(False, f"sink: result socket: {why}")
    stats, err = _ask_ventilator(ctx, settings, "stats", deadline)
    if err:
        return Verdict(False, f"sink listens at {endpoint}, but {err}")
    components = stats.get("components") if isinstance(stats, dict) else None
    age = components.get("sink") if isinstance(components, dict) else None
    if not isinstance(age, int | float):
        return Verdict(False, "sink: the ventilator has not heard the sink on the bus")
    if age > settings.liveness_s:
        return Verdict(False, f"sink: last heard {age:.1f} s ago "
                              f"(limit {settings.liveness_s:g} s)")
    return Verdict(True, f"sink listens at {endpoint}, heard {age:.1f} s ago")


def probe_worker(ctx: zmq.Context[Any], settings: Settings, deadline: Deadline, *,
                 host: str, pid: int | None = None) -> Verdict:
    workers, err = _ask_ventilator(ctx, settings, "workers", deadline)
    if err:
        return Verdict(False, f"worker on {host}: {err}")
    mine = [w for w in workers or [] if isinstance(w, dict) and w.get("host") == host
            and (pid is None or w.get("pid") == pid)]
    who = f"host {host}" + (f" pid {pid}" if pid is not None else "")
    if not mine:
        return Verdict(False, f"worker: the ventilator lists no worker on {who} "
                              f"({len(workers or [])} listed)")
    live = [w for w in mine if w.get("state") != "lost"
            and float(w.get("last_beat_age_s") or 0) <= settings.liveness_s]
    if not live:
        w = mine[0]
        return Verdict(False, f"worker {w.get('id')} on {who} is {w.get('state')}, "
                              f"last beat {float(w.get('last_beat_age_s') or 0):.1f} s ago")
    w = live[0]
    return Verdict(True, f"worker {w.get('id')} on {who} is {w.get('state')}, "
                         f"last beat {float(w.get('last_beat_age_s') or 0):.1f} s ago")


def probe_dashboard(settings: Settings, deadline: Deadline) -> Verdict:
    # `imgpipe dashboard` serves on gateway_host, like the gateway.
    target = f"http://{_http_host(settings)}:{settings.dashboard_port}/_stcore/health"
    status, body = _http_get(target, deadline.left())
    if status == 200:
        return Verdict(True, f"dashboard answers at {target}")
    if status == 0:
        return Verdict(False, f"dashboard does not answer at {target}: {body}")
    return Verdict(False, f"dashboard answered {status} at {target}: {_brief(body)}")


# --- which role runs here ----------------------------------------------------------------
def role_of(cmdline: Sequence[str]) -> str | None:
    """The role a command line runs: ``imgpipe ROLE`` (or ``python -m imgpipe ROLE``),
    or what ``imgpipe dashboard`` / ``imgpipe gateway`` replace themselves with."""
    names = [os.path.basename(a) for a in cmdline]
    for i, name in enumerate(names[:-1]):
        if name == "imgpipe" and cmdline[i + 1] in ROLES:
            return cmdline[i + 1]
    if "streamlit" in names and any(a.endswith("dashboard/app.py") for a in cmdline):
        return "dashboard"
    if any("imgpipe-gateway" in a for a in cmdline) or (
            any(n.startswith("gunicorn") for n in names)
            and any("gateway" in a for a in cmdline)):
        return "gateway"  # gunicorn, with or without setproctitle renaming it
    return None


def detect_role(proc: Path = Path("/proc")) -> str | None:
    """The role of the first ``imgpipe ROLE`` process found, lowest pid first."""
    pids = sorted(int(p.name) for p in proc.iterdir() if p.name.isdigit())
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            raw = (proc / str(pid) / "cmdline").read_bytes()
        except OSError:
            continue
        role = role_of([a.decode("utf-8", "replace") for a in raw.split(b"\0") if a])
        if role:
            return role
    return None


# --- command -----------------------------------------------------------------------------
def check(role: str, settings: Settings, *, timeout: float, url: str | None = None,
          ready: bool = False, host: str | None = None, pid: int | None = None) -> Verdict:
    """The verdict for ``role`` within ``timeout`` seconds (plus a little for DNS)."""
    deadline = Deadline(timeout)
    if role == "gateway":
        return probe_gateway(settings, deadline, url=url, ready=ready)
    if role == "dashboard":
        return probe_dashboard(settings, deadline)
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        if role == "ventilator":
            return probe_ventilator(ctx, settings, deadline)
        if role == "sink":
            return probe_sink(ctx, settings, deadline)
        if role == "worker":
            return probe_worker(ctx, settings, deadline, host=host or socket.gethostname(),
                                pid=pid)
        raise ValueError(f"unknown role {role!r}")
    finally:
        ctx.term()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgpipe health", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", choices=(*ROLES, "auto"),
                        help="component to probe; auto: the imgpipe process beside the probe")
    parser.add_argument("--timeout", type=float, default=3.0, metavar="S",
                        help="seconds to wait for an answer (default 3)")
    parser.add_argument("--url", default=None,
                        help="gateway: probe this base URL instead of this host's port")
    parser.add_argument("--ready", action="store_true",
                        help="gateway: unhealthy unless the whole pipeline is ready (200)")
    parser.add_argument("--host", default=None,
                        help="worker: the host name its heartbeats carry (default: this host)")
    parser.add_argument("--pid", type=int, default=None, help="worker: its process id")
    add_settings_args(parser, "control_endpoint", "result_endpoint", "bind_host",
                      "gateway_host", "gateway_port", "dashboard_port")
    return parser


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exc:  # argparse uses 2, which Docker reserves
        return 0 if exc.code in (0, None) else 1
    try:
        settings = settings_from_args(ns)
    except ImgpipeError as exc:
        print(f"unhealthy: bad settings: {exc}")
        return 1
    role = ns.role if ns.role != "auto" else detect_role()
    if role is None:
        print("unhealthy: no `imgpipe ROLE` process runs here to probe")
        return 1
    verdict = check(role, settings, timeout=ns.timeout, url=ns.url, ready=ns.ready,
                    host=ns.host, pid=ns.pid)
    print(("healthy: " if verdict.ok else "unhealthy: ") + verdict.line, flush=True)
    return 0 if verdict.ok else 1
