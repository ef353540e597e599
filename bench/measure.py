"""Measuring one run: wall time, per-image latency, CPU time and peak RSS of a process tree.

CPU and memory are sampled with psutil over this process and every descendant (the
pool processes, the limit's children, a local stack started by the bench), so the
figures include the helpers a mode needs, not just the calling thread. A process
that exits between two samples keeps the CPU time it had at the last sample, so the
CPU figure is a slight under-count for short-lived children, never an over-count.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

# Samples come every SAMPLE_S for the first SETTLE_S of a run (a short-lived child's CPU
# counts up to its last sample), then every SLOW_SAMPLE_S: one sample of a stack (14
# processes, ~100 /proc files) costs ~3 ms of CPU here, and at 20 a second the monitor
# took 6 % of a core from the stack it measured, more than from a mode of 2 processes.
SAMPLE_S = 0.05
SETTLE_S = 1.0
SLOW_SAMPLE_S = 0.25


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid``, read from ``/proc/<pid>/task/*/children``.

    psutil's ``children()`` scans every process on the machine (``/proc/*/stat``); on a
    busy host with hundreds of processes that costs tens of milliseconds a call, which
    a sampler running every 50 ms would add to the very CPU figures it measures. The
    kernel's per-thread children lists cost a few small reads; psutil is the fallback.
    """
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    kids: list[int] = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                kids += [int(x) for x in fh.read().split()]
        except FileNotFoundError:
            if not _HAS_CHILDREN_FILE:
                return _psutil_children(pid)
        except OSError:
            continue
    return kids


def _psutil_children(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children()]
    except psutil.Error:
        return []


_HAS_CHILDREN_FILE = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


def tree_pids(root: int) -> list[int]:
    """``root`` and every descendant, parents before children."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        todo += children_of(pid)
    return out


# The components of a stack, by the ``imgpipe ROLE`` a process runs. A worker's
# descendants (the forkserver and the pool it starts) are its filter processes;
# gunicorn's workers inherit the gateway's role; this process is the client.
COMPONENTS = ("gateway", "ventilator", "worker", "filter", "sink")


def _role_of(cmdline: list[str]) -> str | None:
    for i, part in enumerate(cmdline[:-1]):
        if part == "imgpipe" or part.endswith("/imgpipe"):
            return cmdline[i + 1]
    return None


class ResourceMonitor:
    """Samples CPU seconds and RSS of a set of processes (see SAMPLE_S for how often).

    Without ``roots``: this process and all its descendants. With ``roots``: this
    process alone plus each root and its descendants — how a mode counts its own pool
    or stack and not the idle pools other modes keep alive beside it. Each process is
    also given a component (see COMPONENTS), so a stack's CPU splits by component.
    """

    def __init__(self, roots: list[int] | None = None) -> None:
        self.roots = roots
        self._procs: dict[int, psutil.Process] = {}
        self._own_cpu = 0.0
        self.start_cpu: dict[tuple[int, float], float] = {}
        self.last_cpu: dict[tuple[int, float], float] = {}
        self.component: dict[tuple[int, float], str] = {}
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="resource-monitor", daemon=True)

    def _sample(self) -> dict[tuple[int, float], float]:
        began = time.thread_time()
        rss = 0
        cpu: dict[tuple[int, float], float] = {}
        procs: dict[int, psutil.Process] = {}
        me = os.getpid()
        pids = tree_pids(me) if self.roots is None else \
            [me, *(p for r in self.roots for p in tree_pids(r))]
        for pid in pids:
            try:
                p = self._procs.get(pid) or psutil.Process(pid)
                procs[pid] = p
                with p.oneshot():
                    key = (p.pid, p.create_time())
                    t = p.cpu_times()
                    cpu[key] = t.user + t.system
                    rss += p.memory_info().rss
                    if key not in self.component:
                        self.component[key] = self._component(p, me)
            except psutil.Error:
                continue
        self._procs = procs
        self.peak_rss = max(self.peak_rss, rss)
        self._own_cpu += time.thread_time() - began
        return cpu

    def _component(self, p: psutil.Process, me: int) -> str:
        """The component ``p`` belongs to: its own role, a worker ancestor's (as a filter
        process) or another ancestor's; "client" for this process, else "other"."""
        if p.pid == me:
            return "client"
        role = _role_of(p.cmdline())
        if role in COMPONENTS:
            return role
        for parent in p.parents():
            up = self.component.get((parent.pid, parent.create_time())) or _role_of(
                parent.cmdline())
            if up in ("worker", "filter"):
                return "filter"
            if up in COMPONENTS:
                return up
        return "other"

    @staticmethod
    def interval(elapsed_s: float) -> float:
        """Seconds to the next sample, ``elapsed_s`` into a run."""
        return SAMPLE_S if elapsed_s < SETTLE_S else SLOW_SAMPLE_S

    def _loop(self) -> None:
        began = time.monotonic()
        while not self._stop.wait(self.interval(time.monotonic() - began)):
            self.last_cpu.update(self._sample())

    def __enter__(self) -> ResourceMonitor:
        self.start_cpu = self._sample()
        self.last_cpu = dict(self.start_cpu)
        self._own_cpu = 0.0
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.last_cpu.update(self._sample())

    @property
    def cpu_s(self) -> float:
        """CPU seconds (user + system) spent by the tree while the monitor ran, less the
        monitor's own sampling."""
        total = sum(v - self.start_cpu.get(k, 0.0) for k, v in self.last_cpu.items())
        return max(0.0, total - self._own_cpu)

    def cpu_by_component(self) -> dict[str, float]:
        """CPU seconds per component while the monitor ran (the client less the
        monitor's own sampling)."""
        out: dict[str, float] = {}
        for k, v in self.last_cpu.items():
            name = self.component.get(k, "other")
            out[name] = out.get(name, 0.0) + v - self.start_cpu.get(k, 0.0)
        if "client" in out:
            out["client"] = max(0.0, out["client"] - self._own_cpu)
        return out


@dataclass
class RunResult:
    """One timed pass of one mode over every image."""

    images: int
    wall_s: float
    latencies_ms: list[float]
    cpu_s: float | None = None
    cpu_by_component: dict[str, float] = field(default_factory=dict)
    outer_wall_s: float = 0.0
    peak_rss_mb: float | None = None
    errors: list[str] = field(default_factory=list)
    out_sizes: list[tuple[int, int] | None] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        done = self.images - len(self.errors)
        return done / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "wall_s": round(self.wall_s, 4),
            "images_per_s": round(self.images_per_s, 3),
            "latency_ms": percentiles(self.latencies_ms),
            "cpu_s": None if self.cpu_s is None else round(self.cpu_s, 3),
            "peak_rss_mb": None if self.peak_rss_mb is None else round(self.peak_rss_mb, 1),
            "errors": self.errors[:20],
        }


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks; 0.0 for no values."""
    if not values:
        return 0.0
    data = sorted(values)
    k = (len(data) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def percentiles(values: list[float]) -> dict[str, float]:
    return {"p50": round(percentile(values, 50), 2), "p95": round(percentile(values, 95), 2),
            "max": round(max(values), 2) if values else 0.0}


def summarize(runs: list[RunResult]) -> dict[str, Any]:
    """Medians over repeats, with min–max for throughput; peak RSS is the max."""
    rates = [r.images_per_s for r in runs]
    cpus = [r.cpu_s for r in runs if r.cpu_s is not None]
    rss = [r.peak_rss_mb for r in runs if r.peak_rss_mb is not None]
    images = runs[0].images if runs else 0
    cpu = statistics.median(cpus) if cpus else None
    return {
        "images_per_s": {"median": round(statistics.median(rates), 3),
                         "min": round(min(rates), 3), "max": round(max(rates), 3)},
        "wall_s": round(statistics.median(r.wall_s for r in runs), 4),
        "latency_ms": {"p50": round(statistics.median(percentile(r.latencies_ms, 50)
                                                      for r in runs), 2),
                       "p95": round(statistics.median(percentile(r.latencies_ms, 95)
                                                      for r in runs), 2)},
        "cpu_s": None if cpu is None else round(cpu, 3),
        "cpu_ms_per_image": None if cpu is None or not images else round(1000 * cpu / images, 2),
        "cores_used": None if cpu is None else round(
            cpu / statistics.median(r.outer_wall_s or r.wall_s for r in runs), 2),
        "peak_rss_mb": round(max(rss), 1) if rss else None,
        "errors": sum(len(r.errors) for r in runs),
        "cpu_ms_per_image_by_component": _by_component(runs),
    }


def _by_component(runs: list[RunResult]) -> dict[str, float] | None:
    """Median CPU ms per image of each component over the runs; None for a mode whose
    work all runs in one component (no stack)."""
    names = {n for r in runs for n in r.cpu_by_component}
    if not names or not names & set(COMPONENTS):
        return None
    order = [*COMPONENTS, "client", "other"]
    return {n: round(1000 * statistics.median(r.cpu_by_component.get(n, 0.0) for r in runs)
                     / runs[0].images, 2)
            for n in sorted(names, key=lambda n: order.index(n) if n in order else 99)}


def timed_run(fn: Any, images: int, *, monitor: bool = True,
              roots: list[int] | None = None) -> RunResult:
    """Call ``fn()`` -> (latencies_ms, out_sizes, errors, wall_s or None) under the clock;
    ``out_sizes`` may be a function, called once the clock has stopped.

    A mode that times itself more precisely than the caller can (the limit's children
    start on a signal and report their own clocks) returns its wall time; else None.
    """
    mon = ResourceMonitor(roots)
    if monitor:
        mon.__enter__()
    t0 = time.perf_counter()
    try:
        latencies, sizes, errors, own_wall = fn()
    finally:
        wall = time.perf_counter() - t0
        if monitor:
            mon.__exit__(None, None, None)
    if callable(sizes):  # checked after the clock: not the mode's work
        sizes = sizes()
    return RunResult(images=images, wall_s=own_wall or wall, outer_wall_s=wall, latencies_ms=latencies,
                     cpu_s=mon.cpu_s if monitor else None,
                     cpu_by_component=mon.cpu_by_component() if monitor else {},
                     peak_rss_mb=mon.peak_rss / 1e6 if monitor else None,
                     errors=errors, out_sizes=sizes)
