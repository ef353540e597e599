"""The processes of a local stack, found from the gateway's port: roles and memory.

For a loopback URL the stress commands find who listens on the port (the gunicorn
master), walk up to the ``imgpipe up`` supervisor when there is one, and label every
descendant by the ``imgpipe <role>`` it runs (gunicorn's own workers inherit the
gateway's label). A sampler thread keeps the peak RSS per role, which is how the
report shows that memory stayed bounded under load.
"""

from __future__ import annotations

import logging
import threading
from typing import Any
from urllib.parse import urlsplit

import psutil

from imgpipe.bench.measure import children_of

log = logging.getLogger(__name__)

ROLES = ("up", "gateway", "ventilator", "sink", "worker", "dashboard")


def _role(p: psutil.Process) -> str | None:
    try:
        cmd = p.cmdline()
    except psutil.Error:
        return None
    for i, part in enumerate(cmd[:-1]):
        if part == "imgpipe" or part.endswith("/imgpipe"):
            nxt = cmd[i + 1]
            return nxt if nxt in ROLES else None
    return None


def listener(port: int) -> psutil.Process | None:
    """The process listening on TCP ``port`` (lowest pid: the master, not a fork)."""
    try:
        conns = psutil.net_connections(kind="tcp")
    except psutil.Error:
        return None
    pids = sorted({c.pid for c in conns if c.pid and c.status == psutil.CONN_LISTEN
                   and c.laddr and c.laddr.port == port})
    for pid in pids:
        try:
            return psutil.Process(pid)
        except psutil.Error:
            continue
    return None


def stack_root(url: str) -> psutil.Process | None:
    """The ``imgpipe up`` supervisor behind ``url`` (or the gateway itself), if local."""
    port = urlsplit(url).port or 80
    p = listener(port)
    if p is None:
        return None
    best = p
    try:
        for parent in p.parents():
            role = _role(parent)
            if role == "up":
                return parent
            if role is not None:
                best = parent
    except psutil.Error:
        pass
    return best


def labelled(root: psutil.Process) -> list[tuple[str, psutil.Process]]:
    """(role, process) for the root and every descendant; children inherit a parent's role."""
    out: list[tuple[str, psutil.Process]] = []

    def walk(p: psutil.Process, inherited: str) -> None:
        role = _role(p) or inherited
        out.append((role, p))
        for pid in children_of(p.pid):
            try:
                kid = psutil.Process(pid)
            except psutil.Error:
                continue
            walk(kid, role if role != "up" else "other")

    walk(root, _role(root) or "other")
    return out


def is_worker_of(pid: int, root: psutil.Process | None) -> bool:
    """True when ``pid`` runs ``imgpipe worker`` (under ``root`` when it is known)."""
    try:
        p = psutil.Process(pid)
    except psutil.Error:
        return False
    if _role(p) != "worker":
        return False
    if root is None:
        return True
    try:
        return any(a.pid == root.pid for a in p.parents())
    except psutil.Error:
        return False


class Periodic:
    """Calls :meth:`sample` on entry, every ``interval`` seconds on its own thread, and
    once more on exit."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=type(self).__name__,
                                        daemon=True)

    def sample(self) -> Any:
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - one failed sample must not end the series
                log.exception("%s: a sample failed", type(self).__name__)

    def __enter__(self) -> Any:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


class RssSampler(Periodic):
    """Peak RSS per role (largest single process, MB) of a local stack while running."""

    def __init__(self, root: psutil.Process, interval: float = 0.25) -> None:
        super().__init__(interval)
        self.root = root
        self.peak: dict[str, float] = {}

    def sample(self) -> None:
        # labelled() reads /proc for the stack's own processes only (see children_of).
        for role, p in labelled(self.root):
            try:
                mb = p.memory_info().rss / 1e6
            except psutil.Error:
                continue
            self.peak[role] = max(self.peak.get(role, 0.0), mb)

    def report(self) -> dict[str, float]:
        return {k: round(v, 1) for k, v in sorted(self.peak.items())}
