"""``imgpipe bench store``: the job store's operations per second, on each backend.

The four operations every output costs the store, in the order a job lives them:
``create_job`` (the gateway: one image, one chain), ``mark_dispatched`` (the
ventilator), ``complete`` (the sink: the output file written, then its row), and
``job`` (a status read: the job and its outputs in one snapshot). Each runs --ops
times, spread over T threads of one process (``--threads 1,4``: one client, then
several, as the gateway's threads are), on SQLite in a temp dir and on PostgreSQL:
the database ``--store-url`` names (a scratch one: the bench adds its tables and rows),
or else a throwaway server started from Debian's binaries (bench/pgserver.py) with
PostgreSQL's default durability. One run, a table, and ``--json FILE``.

Durability differs by default: SQLite runs ``synchronous=NORMAL`` in WAL mode (a commit
survives a process crash, not a power loss: no fsync per commit), PostgreSQL's default
``synchronous_commit=on`` flushes its WAL at every commit. Speed is this command's
business; the tests never time anything.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from imgpipe.bench import report
from imgpipe.bench.pgserver import PgServer, PgUnavailable
from imgpipe.core.config import redact
from imgpipe.core.records import Original, new_job_id, task_id
from imgpipe.core.store import Store

OPS = ("create_job", "mark_dispatched", "complete", "job")
BACKENDS = ("sqlite", "postgres")
_ORIGINAL = b"\xff\xd8" + b"\0" * 2046   # 2 KB "JPEG": the store never decodes it
_OUTPUT = b"\x89PNG" + b"\0" * 1020      # 1 KB "PNG"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="imgpipe bench store", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", type=int, default=500, help="times each operation runs (500)")
    p.add_argument("--threads", default="1,4",
                   help="client threads, comma-separated: one pass each (default 1,4)")
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help="comma-separated subset of sqlite,postgres (default both)")
    p.add_argument("--store-url", default="",
                   help="PostgreSQL to measure (postgresql://…, a scratch database); "
                   "default: start a throwaway server from Debian's binaries")
    p.add_argument("--json", type=Path, help="write the report here")
    ns = p.parse_args(argv)
    try:
        ns.thread_counts = sorted({int(x) for x in ns.threads.split(",") if x.strip()})
    except ValueError:
        p.error("--threads: comma-separated counts, e.g. 1,4")
    if not ns.thread_counts or min(ns.thread_counts) < 1 or max(ns.thread_counts) > 64:
        p.error("--threads: counts from 1 to 64")
    if ns.ops < 1:
        p.error("--ops must be at least 1")
    ns.backend_names = [b.strip() for b in ns.backends.split(",") if b.strip()]
    if not ns.backend_names or set(ns.backend_names) - set(BACKENDS):
        p.error(f"--backends: a comma-separated subset of {','.join(BACKENDS)}")
    return ns


def _split_run(step: Callable[[str], object], jobs: list[str], threads: int) -> float:
    """Seconds for ``threads`` threads to run ``step`` over ``jobs`` (in equal shares),
    from a common start to the last one done."""
    shares = [jobs[k::threads] for k in range(threads)]
    start = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def run(share: list[str]) -> None:
        start.wait()
        try:
            for j in share:
                step(j)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(s,), daemon=True) for s in shares]
    for w in workers:
        w.start()
    start.wait()
    t0 = time.perf_counter()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return elapsed


def measure(store: Store, ops: int, threads: int) -> dict[str, float]:
    """Operations per second of each of :data:`OPS` on ``store``, ``ops`` times each."""
    jobs = [new_job_id() for _ in range(ops)]
    for j in jobs:  # the originals are the gateway's file work, not the store's rows
        store.save_original(j, 0, "jpeg", _ORIGINAL)
    image = [Original("jpeg", 64, 48, len(_ORIGINAL))]  # no sha256: no cache lookups
    steps: dict[str, Callable[[str], object]] = {
        "create_job": lambda j: store.create_job(j, image, [("resize:w=32", "light")]),
        "mark_dispatched": lambda j: store.mark_dispatched(task_id(j, 0), 1),
        "complete": lambda j: store.complete(
            task_id(j, 0), _OUTPUT, worker="bench", attempt=1, width=32, height=24,
            content_type="image/png", fmt="png", timings={"total": 1.0}),
        "job": lambda j: store.job(j),
    }
    return {name: round(ops / _split_run(steps[name], jobs, threads), 1) for name in OPS}


@contextmanager
def _postgres(url: str) -> Iterator[tuple[str, str]]:
    """(url, where) of the PostgreSQL to measure: ``url``, or a throwaway server's."""
    if url:
        yield url, redact(url)
        return
    with PgServer(durable=True) as pg:
        yield pg.new_database("bench"), f"throwaway server from {pg.bindir}"


def run(ns: argparse.Namespace, console: Console) -> dict[str, Any]:
    doc: dict[str, Any] = {"created": report.now_iso(), "machine": report.machine(),
                           "ops": ns.ops, "threads": ns.thread_counts, "operations": list(OPS),
                           "backends": {}, "notes": []}
    tmp = Path(tempfile.mkdtemp(prefix="storebench-"))
    try:
        for backend in ns.backend_names:
            data = tmp / backend
            if backend == "sqlite":
                doc["backends"]["sqlite"] = _one(console, data, "", "jobs.sqlite3 in a temp "
                                                 "dir, WAL, synchronous=NORMAL", ns)
                continue
            try:
                with _postgres(ns.store_url) as (url, where):
                    doc["backends"]["postgres"] = _one(console, data, url, where, ns)
            except PgUnavailable as exc:
                doc["notes"].append(f"postgres not measured: {exc}; pass --store-url")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return doc


def _one(console: Console, data: Path, url: str, where: str,
         ns: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"where": where, "ops_per_s": {}}
    for threads in ns.thread_counts:
        with console.status(f"{'postgres' if url else 'sqlite'}, {threads} thread(s)"):
            store = Store(data / f"t{threads}", url, pool_size=max(8, threads))
            try:
                out["ops_per_s"][str(threads)] = measure(store, ns.ops, threads)
            finally:
                store.close()
    return out


def table(doc: dict[str, Any]) -> Table:
    t = Table(title=f"job store operations per second ({doc['ops']} of each, higher is better)")
    t.add_column("operation")
    cols = [(b, th) for b, rec in doc["backends"].items() for th in rec["ops_per_s"]]
    for b, th in cols:
        t.add_column(f"{b}, {th} thread{'s' if th != '1' else ''}", justify="right")
    for op in doc["operations"]:
        t.add_row(op, *(f"{doc['backends'][b]['ops_per_s'][th][op]:,.0f}" for b, th in cols))
    return t


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(list(sys.argv[1:] if argv is None else argv))
    console = Console(width=None if sys.stdout.isatty() else 120)
    doc = run(ns, console)
    console.print(table(doc))
    for b, rec in doc["backends"].items():
        console.print(f"{b}: {rec['where']}")
    for note in doc["notes"]:
        console.print(f"[yellow]note:[/] {note}")
    if ns.json:
        ns.json.write_text(json.dumps(doc, indent=2) + "\n")
        console.print(f"report: {ns.json}")
    return 0
