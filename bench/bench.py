"""``imgpipe bench``: every way to run the chain, on the same images, in one run.

Modes (see docs/bench.md): naive-sequential (a beginner's Pillow script, the
baseline), sequential (imgpipe's codec and filters, one process), threads-2,
threads-4, processes (one per core, bytes in and out), limit (one process per core,
inputs preloaded, nothing else: the compute bound) and pipeline-wN (the whole stack
over HTTP with N workers, started privately, or a running one with --url). Each mode
runs --repeat times; the report gives medians with min–max, ratios to the baseline
and to the limit, a one-image end-to-end latency probe, and per-stage timings.

``imgpipe bench store`` measures the job store instead: its operations per second on
SQLite and PostgreSQL (bench/storebench.py; ``imgpipe bench store --help``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from imgpipe.bench import chart, report, work
from imgpipe.bench.client import check_target
from imgpipe.bench.images import generate, load, parse_size
from imgpipe.bench.measure import RunResult, percentiles, summarize, timed_run
from imgpipe.bench.modes import Limit, Mode, Naive, Pipeline, Pooled, Sequential

# --workload: the chain and the image size of a named workload (--ops and --size override).
# "small" keeps the default chain's steps and its 2x shrink on 1 MP images, where the
# framework's cost per image weighs most against the work.
WORKLOADS: dict[str, tuple[str, str]] = {
    "chain": (work.DEFAULT_OPS, "3840x2160"),
    "resize": ("resize:w=1920,h=1080", "3840x2160"),
    "small": ("resize:w=640,h=400|blur:radius=2|brightness:factor=1.1"
              "|encode:format=jpeg,quality=85", "1280x800"),
}
LOCAL_MODES = ("naive-sequential", "sequential", "threads-2", "threads-4", "processes", "limit")
DEFAULT_MODES = ",".join((*LOCAL_MODES, "pipeline"))


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="imgpipe bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10, help="images per pass (default 10)")
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="chain",
                   help="chain: 4K, resize+blur+brightness+JPEG (the default); resize: 4K, "
                   "a resize to 1920x1080 alone; small: 1 MP, the chain's steps")
    p.add_argument("--size", help="generated image size WxH (default: the workload's)")
    p.add_argument("--input", type=Path, help="folder of images to use instead of generated ones")
    p.add_argument("--seed", type=int, default=7, help="seed of the generated images")
    p.add_argument("--ops", help="the chain every mode runs (default: the workload's)")
    p.add_argument("--workers", default="1,2,3",
                   help="pipeline worker counts, comma-separated (default 1,2,3)")
    p.add_argument("--repeat", type=int, default=3, help="passes per mode (default 3)")
    p.add_argument("--rounds", type=int, default=1,
                   help="times each pass runs every image (default 1): with more, a pass "
                   "is long enough that its start and its drain are a small part of it, "
                   "which is the steady state a service runs in")
    p.add_argument("--concurrency", type=int, default=16,
                   help="requests the pipeline mode keeps in flight (default 16)")
    p.add_argument("--modes", default=DEFAULT_MODES,
                   help=f"comma-separated subset of {DEFAULT_MODES} (pipeline-wN also accepted)")
    p.add_argument("--probe", type=int, default=10,
                   help="one-image end-to-end latency requests (0: no probe)")
    p.add_argument("--upload", choices=("raw", "multipart"), default="raw",
                   help="how the pipeline mode uploads: the image as the body with ?ops= "
                   "(raw, the default) or a multipart form")
    p.add_argument("--url", help="use this running gateway for the pipeline mode; with "
                   "several, comma-separated (gateways of one stack), the pipeline runs on "
                   "the first alone and then round-robin over all of them, in one run")
    p.add_argument("--scale-with", default="", metavar="CMD",
                   help="with --url: a shell command that sets the stack to {n} workers, run "
                   "before the pipeline mode for each --workers count, e.g. "
                   "'make scale N={n}' (the scaling curve of a compose stack)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --url")
    p.add_argument("--json", type=Path, help="write the JSON report here")
    p.add_argument("--html", type=Path, help="write the Plotly chart here")
    p.add_argument("--png", type=Path, help="write the chart as PNG here (drawn with Pillow)")
    ns = p.parse_args(argv)
    ops, size = WORKLOADS[ns.workload]
    ns.ops = ns.ops or ops
    ns.size = ns.size or size
    if min(ns.images, ns.repeat, ns.rounds, ns.concurrency) < 1 or ns.probe < 0:
        p.error("--images, --repeat, --rounds and --concurrency must be at least 1, "
                "--probe at least 0")
    try:
        ns.size_wh = parse_size(ns.size)
        ns.worker_counts = sorted({int(x) for x in ns.workers.split(",") if x.strip()})
    except ValueError as exc:
        p.error(str(exc))
    if not ns.worker_counts or min(ns.worker_counts) < 1 or max(ns.worker_counts) > 64:
        p.error("--workers: comma-separated counts from 1 to 64, e.g. 1,2,3")
    ns.mode_names = [m.strip() for m in ns.modes.split(",") if m.strip()]
    bad = [m for m in ns.mode_names
           if m not in (*LOCAL_MODES, "pipeline") and not _pipeline_n(m)]
    if bad:
        p.error(f"--modes: unknown {', '.join(bad)}; use {DEFAULT_MODES} or pipeline-wN")
    ns.urls = [u.strip().rstrip("/") for u in (ns.url or "").split(",") if u.strip()]
    ns.url = ns.urls[0] if ns.urls else None
    for url in ns.urls:
        if err := check_target(url, ns.allow_remote):
            p.error(f"--url: {err}")
    if ns.scale_with and (not ns.url or "{n}" not in ns.scale_with):
        p.error("--scale-with needs --url and a command with {n} in it")
    return ns


def _pipeline_n(name: str) -> int | None:
    if name.startswith("pipeline-w") and name[10:].isdigit() and int(name[10:]) >= 1:
        return int(name[10:])
    return None


def build_modes(ns: argparse.Namespace, images: list[bytes], spec: str) -> list[Mode]:
    """The modes asked for, each given the pass's work: every image ``rounds`` times."""
    images = images * ns.rounds
    pipe: dict[str, Any] = {"upload": ns.upload, "concurrency": ns.concurrency}
    modes: list[Mode] = []
    for name in ns.mode_names:
        if name == "naive-sequential":
            modes.append(Naive(images, spec))
        elif name == "sequential":
            modes.append(Sequential(images, spec))
        elif name.startswith("threads-"):
            modes.append(Pooled(images, spec, threads=int(name[8:])))
        elif name == "processes":
            modes.append(Pooled(images, spec))
        elif name == "limit":
            modes.append(Limit(images, spec))
        elif name == "pipeline" and ns.url and ns.scale_with:
            modes += [Pipeline(images, spec, url=ns.url, workers=n,
                               scale_with=ns.scale_with, **pipe)
                      for n in ns.worker_counts]
        elif name == "pipeline" and ns.url:
            modes.append(Pipeline(images, spec, url=ns.url, **pipe))
            if len(ns.urls) > 1:  # the same stack through all its gateways
                modes.append(Pipeline(images, spec, url=ns.url, also=tuple(ns.urls[1:]),
                                      **pipe))
        elif name == "pipeline":
            modes += [Pipeline(images, spec, workers=n, **pipe) for n in ns.worker_counts]
        elif (n := _pipeline_n(name)) is not None:  # always a private stack
            modes.append(Pipeline(images, spec, workers=n, **pipe))
    return modes


class Track:
    """One mode's passes and its fate: set up, passes run, or the error that stopped it."""

    def __init__(self, mode: Mode) -> None:
        self.mode = mode
        self.runs: list[RunResult] = []
        self.error: str | None = None

    def attempt(self, what: str, fn: Any) -> bool:
        if self.error is not None:
            return False
        try:
            fn()
            return True
        except Exception as exc:  # noqa: BLE001 - one failed mode must not lose the others
            self.error = f"{what}: {type(exc).__name__}: {exc}"
            return False

    def pass_once(self) -> None:
        self.attempt("pass", lambda: self.runs.append(timed_run(
            self.mode.run, len(self.mode.images), roots=self.mode.pids())))

    def result(self) -> dict[str, Any]:
        m = self.mode
        out: dict[str, Any] = {"mode": m.name, "kind": m.kind, "workers": m.workers}
        if self.error:
            out["error"] = self.error
        if self.runs:
            out.update(summarize(self.runs))
            out["runs"] = [r.to_dict() for r in self.runs]
            sizes = [s for r in self.runs for s in r.out_sizes]
            out["output_sizes"] = sorted({tuple(s) for s in sizes if s is not None})
            out["undecodable"] = sum(1 for s in sizes if s is None)
        return out


def run_modes(modes: list[Mode], ns: argparse.Namespace, progress: Progress,
              task: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every mode's passes; the results in mode order and the latency probe.

    Local modes are set up together and their passes interleaved (pass 1 of every mode,
    then pass 2, …), so a change of load on a shared machine hits every mode alike
    instead of whichever ran last. Each pipeline keeps a stack up only while it runs.
    """
    tracks = [Track(m) for m in modes]
    local = [t for t in tracks if not isinstance(t.mode, Pipeline)]
    pipes = [t for t in tracks if isinstance(t.mode, Pipeline)]
    probe: dict[str, Any] = {}
    try:
        for t in local:
            progress.update(task, description=f"{t.mode.name}: setting up")
            t.attempt("setup", t.mode.setup)
        for i in range(ns.repeat):
            for t in local:
                progress.update(task, description=f"{t.mode.name}: pass {i + 1}/{ns.repeat}")
                t.pass_once()
                progress.advance(task)
    finally:
        for t in local:
            t.mode.close()
    for t in pipes:
        mode = t.mode
        assert isinstance(mode, Pipeline)
        try:
            progress.update(task, description=f"{mode.name}: starting the stack")
            t.attempt("setup", mode.setup)
            for i in range(ns.repeat):
                progress.update(task, description=f"{mode.name}: pass {i + 1}/{ns.repeat}")
                t.pass_once()
                progress.advance(task)
            if ns.probe and t is pipes[-1] and t.error is None:
                progress.update(task, description=f"{mode.name}: latency probe")
                t.attempt("probe", lambda m=mode: probe.update(latency_probe(m, ns.probe)))
        finally:
            mode.close()
    return [t.result() for t in tracks], probe


def latency_probe(mode: Pipeline, count: int) -> dict[str, Any]:
    """One image end to end over HTTP, one at a time, next to its bare compute time,
    and where the end-to-end time went (:func:`e2e_split`)."""
    from imgpipe.filters import codec

    image = mode.images[0]
    mode.probe(image, 1)  # warm the connection
    timed = mode.probe(image, count)
    e2e = [ms for ms, _ in timed]
    compute = []
    for _ in range(count):
        t = time.perf_counter()
        work.imgpipe_one(image, mode.spec)
        compute.append((time.perf_counter() - t) * 1000)
    docs = mode.job_docs([job for _, job in timed if job])
    info = codec.probe(image)
    e, c = percentiles(e2e), percentiles(compute)
    return {"mode": mode.name, "count": len(e2e),
            "image": {"width": info.width, "height": info.height, "bytes": len(image)},
            "e2e_ms": e, "compute_ms": c,
            "ratio_p50": round(e["p50"] / c["p50"], 2) if e2e and c["p50"] else None,
            "e2e_split_ms": e2e_split(timed, docs)}


# The parts of one request's end-to-end time, in order (see e2e_split).
SPLIT = ("gateway", "dispatch", "to_worker", "worker", "store")


def e2e_split(timed: list[tuple[float, str | None]], docs: list[dict[str, Any]]
              ) -> dict[str, float] | None:
    """Medians, over the probe's requests, of where each one's end-to-end time went:
    ``dispatch`` (queued -> sent by the ventilator), ``to_worker`` (the hop), ``worker``
    (received -> result ready), ``store`` (-> stored by the sink), from the job's
    ``timings_ms``; ``gateway`` is the rest: the upload and its recording, the
    completion event, the answer and the client. None when no document has them."""
    by_path = {f"/api/jobs/{d['id']}": d for d in docs}
    parts: dict[str, list[float]] = {k: [] for k in SPLIT}
    for ms, path in timed:
        doc = by_path.get(path or "")
        outs = doc["outputs"] if doc else []
        t = outs[0].get("timings_ms", {}) if len(outs) == 1 else {}
        if any(t.get(k) is None for k in ("queue", "total", "dispatch", "store")):
            continue
        for key, value in (("dispatch", t["dispatch"]), ("to_worker", t["queue"] - t["dispatch"]),
                           ("worker", t["total"]), ("store", t["store"]),
                           ("gateway", ms - t["queue"] - t["total"] - t["store"])):
            parts[key].append(value)
    if not parts["worker"]:
        return None
    return {k: round(statistics.median(v), 2) for k, v in parts.items()}


def stage_medians(image: bytes, spec: str, count: int = 5) -> dict[str, float]:
    samples = [work.stage_times(image, spec) for _ in range(count)]
    return {k: round(statistics.median(s[k] for s in samples), 2) for k in samples[0]}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["store"]:
        from imgpipe.bench import storebench

        return storebench.main(args[1:])
    ns = parse_args(args)
    import cv2

    # OpenCV single-threaded here too, as in the workers and the pools: each mode's
    # parallelism is its own (threads, processes), not OpenCV's internal threads; and
    # the services' heap settings, for every mode run in this process.
    before = cv2.getNumThreads()
    work.single_thread_init()
    try:
        return run(ns)
    finally:
        cv2.setNumThreads(before)


def run(ns: argparse.Namespace) -> int:
    console = Console(width=None if sys.stdout.isatty() else 150)
    from imgpipe.core.errors import FilterError

    try:
        canonical = work.check_spec(ns.ops)
    except FilterError as exc:
        console.print(f"[red]imgpipe bench: --ops: {exc.detail}[/]")
        return 2
    notes = []
    host = report.machine()
    if os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        notes.append(f"the machine was busy at the start (load {os.getloadavg()[0]:.1f} on "
                     f"{os.cpu_count()} CPUs): figures are noisy")
    with console.status("preparing images"):
        images = (load(ns.input, ns.images) if ns.input
                  else generate(ns.images, ns.size_wh, seed=ns.seed))
    modes = build_modes(ns, images, ns.ops)
    with Progress(TextColumn("{task.description:<36}"), BarColumn(), TextColumn(
            "{task.completed}/{task.total}"), TimeElapsedColumn(), console=console,
            transient=True) as progress:
        task = progress.add_task("bench", total=len(modes) * ns.repeat)
        results, probe = run_modes(modes, ns, progress, task)
        progress.update(task, description="per-stage timings")
        try:
            stages = stage_medians(images[0], ns.ops)
        except Exception as exc:  # noqa: BLE001 - the report goes out without them
            stages = {}
            notes.append(f"per-stage timings failed: {exc}")
    report.add_ratios(results)
    notes += report.check_outputs(results)
    from imgpipe.filters import codec

    first = codec.probe(images[0])
    doc = {
        "version": 1, "created": report.now_iso(), "machine": host,
        "config": {"images": len(images), "size": f"{first.width}x{first.height}",
                   "input": str(ns.input) if ns.input else None, "seed": ns.seed,
                   "workload": ns.workload, "upload": ns.upload, "ops": ns.ops,
                   "ops_canonical": canonical, "repeat": ns.repeat, "rounds": ns.rounds,
                   "concurrency": ns.concurrency,
                   "workers": ns.worker_counts, "modes": ns.mode_names, "url": ns.url,
                   "urls": ns.urls},
        "images": {"count": len(images), "bytes_total": sum(map(len, images)),
                   "bytes_mean": round(sum(map(len, images)) / len(images))},
        "modes": results, "latency_probe": probe or None, "stages_ms": stages,
        "notes": notes,
    }
    doc["goals"] = report.goals(results, probe or None, ns.workload)
    report.print_report(doc, console)
    if ns.json:
        report.write_json(doc, ns.json)
    if ns.html:
        chart.write_html(doc, ns.html)
    if ns.png:
        chart.write_png(doc, ns.png)
    written = [str(p) for p in (ns.json, ns.html, ns.png) if p]
    if written:
        console.print("wrote " + ", ".join(written))
    return 1 if any(m.get("error") for m in results) else 0
