"""The bench modes: one object per mode, ``setup()`` untimed, ``run()`` timed, ``close()``.

Every mode gets the same encoded bytes and the same chain. Setup (starting a pool or
a stack, a warm-up image per process) is not timed: the figures are steady-state
throughput, which is what a long-running service delivers. Latency is per image:
in-process modes time the image's own processing where it runs; the pipeline times
each HTTP request, which includes the queueing behind the other images submitted
with it (all images are submitted at once).
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import multiprocessing as mp
import os
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any
from urllib.parse import urlencode

import httpx

from imgpipe.bench import client as api
from imgpipe.bench import procs, work
from imgpipe.bench.stack import LocalStack
from imgpipe.core.config import client_headers

Sizes = list[tuple[int, int] | None]
# (latencies ms, output sizes, errors, the mode's own wall time or None). The sizes may
# come as a function, called once the clock has stopped: reading every output's header
# to check it is the bench's work, not the mode's.
Outcome = tuple[list[float], Sizes | Callable[[], Sizes], list[str], float | None]
SPAWN = mp.get_context("spawn")


def later_sizes(outputs: list[bytes | None]) -> Callable[[], Sizes]:
    """The outputs' sizes, read from their headers when called (after the clock)."""
    return lambda: [work.out_size(o) if o is not None else None for o in outputs]


class Mode:
    name = "mode"
    kind = "local"
    workers: int | None = None

    def __init__(self, images: list[bytes], spec: str) -> None:
        self.images = images
        self.spec = spec

    def setup(self) -> None:
        """Untimed preparation: pools, stacks, one warm-up image."""

    def run(self) -> Outcome:
        raise NotImplementedError

    def close(self) -> None:
        """Release what setup made."""

    def pids(self) -> list[int]:
        """Processes besides this one that do the mode's work (with their descendants)."""
        return []


class Naive(Mode):
    name = "naive-sequential"
    kind = "baseline"

    def setup(self) -> None:
        self.plan = work.naive_plan(self.spec)

    def run(self) -> Outcome:
        results = [work.timed(work.naive, data, self.plan) for data in self.images]
        return [ms for _, ms in results], later_sizes([o for o, _ in results]), [], None


class Sequential(Mode):
    name = "sequential"

    def setup(self) -> None:
        work.imgpipe_one(self.images[0], self.spec)

    def run(self) -> Outcome:
        results = [work.timed(work.imgpipe_one, data, self.spec) for data in self.images]
        return [ms for _, ms in results], later_sizes([o for o, _ in results]), [], None


class Pooled(Mode):
    """An executor over images: threads share one process, processes get bytes."""

    def __init__(self, images: list[bytes], spec: str, *, threads: int = 0) -> None:
        super().__init__(images, spec)
        self.threads = threads
        self.size = threads or (os.cpu_count() or 1)
        self.workers = self.size
        self.name = f"threads-{threads}" if threads else "processes"
        self.pool: Executor | None = None

    def setup(self) -> None:
        if self.threads:
            self.pool = ThreadPoolExecutor(self.threads)
        else:
            self.pool = ProcessPoolExecutor(self.size, mp_context=SPAWN,
                                            initializer=work.single_thread_init)
        # Warm until every pool process has run an image (spawned processes start lazily).
        seen: set[int] = set()
        deadline = time.monotonic() + 120
        while len(seen) < (1 if self.threads else self.size):
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(seen)} of {self.size} pool processes warmed up")
            batch = [self.pool.submit(work.warm_pid, self.images[0], self.spec)
                     for _ in range(self.size)]
            seen |= {f.result() for f in batch}

    def pids(self) -> list[int]:
        procs = getattr(self.pool, "_processes", None) or {}
        return list(procs)

    def run(self) -> Outcome:
        assert self.pool is not None
        futures = [self.pool.submit(work.timed, work.imgpipe_one, data, self.spec)
                   for data in self.images]
        results = [f.result() for f in futures]
        return [ms for _, ms in results], later_sizes([o for o, _ in results]), [], None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class Limit(Mode):
    """The compute bound: one process per core, inputs preloaded, no I/O, no IPC while timed."""

    name = "limit"
    kind = "bound"

    def __init__(self, images: list[bytes], spec: str) -> None:
        super().__init__(images, spec)
        self.workers = min(os.cpu_count() or 1, len(images))
        self.children: list[tuple[Any, Connection]] = []

    def setup(self) -> None:
        n = self.workers or 1
        for i in range(n):
            parent, child = SPAWN.Pipe()
            share = self.images[i::n]
            p = SPAWN.Process(target=work.limit_child, args=(child, self.spec, share), daemon=True)
            p.start()
            self.children.append((p, parent))
        for _, conn in self.children:
            if not conn.poll(120) or conn.recv() != "ready":
                raise RuntimeError("a limit process did not get ready in 120 s")

    def pids(self) -> list[int]:
        return [p.pid for p, _ in self.children if p.pid is not None]

    def run(self) -> Outcome:
        for _, conn in self.children:
            conn.send("go")
        replies = [conn.recv() for _, conn in self.children]
        wall = max(r[1] for r in replies) - min(r[0] for r in replies)
        lat = [ms for r in replies for ms in r[2]]
        sizes = [s for r in replies for s in r[3]]
        return lat, sizes, [], wall

    def close(self) -> None:
        for p, conn in self.children:
            with contextlib.suppress(OSError):
                conn.send("stop")
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
        self.children = []


class Pipeline(Mode):
    """The full stack over HTTP: every image submitted at once, one ``?wait`` request each."""

    kind = "pipeline"

    def __init__(self, images: list[bytes], spec: str, *, workers: int | None = None,
                 url: str | None = None, wait_s: float = 120.0, concurrency: int = 16,
                 scale_with: str = "", upload: str = "raw", also: tuple[str, ...] = ()
                 ) -> None:
        super().__init__(images, spec)
        # More gateways of the same stack: requests go round-robin over url and these.
        self.also = also
        # "raw": the image as the body, the chain in ?ops= (one image, one chain: what
        # a client of an image service sends); "multipart": a form with both.
        self.upload = upload
        self.workers = workers
        self.url = url
        self.stack: LocalStack | None = None
        self.wait_s = wait_s
        self.concurrency = concurrency
        # With --url: a command that sets the stack behind it to ``{n}`` workers.
        self.scale_with = scale_with
        self.name = (f"pipeline-w{workers}" if not url else
                     f"pipeline-url-w{workers}" if scale_with else "pipeline-url")
        if also:
            self.name += f"-g{1 + len(also)}"
        self.http = httpx.Client(timeout=wait_s + 30.0, headers=client_headers(),
                                 limits=httpx.Limits(max_connections=concurrency + 4))
        self.pool = ThreadPoolExecutor(concurrency)
        self.posters: list[api.LeanPoster] = []
        self.turn = itertools.count()
        self.bodies: dict[int, tuple[bytes, str]] = {}

    def setup(self) -> None:
        if self.url is None:
            assert self.workers is not None
            self.stack = LocalStack(self.workers)  # assigned first: close() stops a failed start
            self.url = self.stack.url
            self.stack.start()
        elif self.scale_with:
            assert self.workers is not None
            subprocess.run(self.scale_with.format(n=self.workers), shell=True, check=True,
                           stdout=subprocess.DEVNULL, timeout=300)
            self._await_workers(self.workers, self.url)
        else:
            self.workers = len(api.alive_workers(self.http, self.url))
        self.posters = [api.LeanPoster(u, self.wait_s + 30.0) for u in (self.url, *self.also)]
        # Warm every worker's process pool: one image per worker, at once.
        warm = [self.pool.submit(self._one, self.images[0]) for _ in range(self.workers or 1)]
        for f in warm:
            f.result()

    def _await_workers(self, n: int, url: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while len(api.alive_workers(self.http, url)) != n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not get to {n} live workers in {timeout:g} s "
                                   f"after `{self.scale_with.format(n=n)}`")
            time.sleep(0.5)  # polling the gateway: scaling announces no event here

    def pids(self) -> list[int]:
        """The private stack's supervisor, or the local stack found behind ``--url``."""
        if self.stack is not None and self.stack.proc is not None:
            return [self.stack.proc.pid]
        roots = [procs.stack_root(u) for u in (self.url, *self.also) if u]
        return sorted({r.pid for r in roots if r is not None})

    def _one(self, data: bytes) -> tuple[bytes | None, float, str | None]:
        out, ms, err, _ = self._request(data)
        return out, ms, err

    def _request(self, data: bytes) -> tuple[bytes | None, float, str | None, str | None]:
        """One upload answered with the image: (output, ms, error, the job's path)."""
        assert self.url is not None
        assert self.posters
        key = id(data)
        if key not in self.bodies:  # built once per image, outside the timed request
            self.bodies[key] = (api.multipart_body([data], [self.spec])
                                if self.upload == "multipart" else (data, "image/jpeg"))
        body, ctype = self.bodies[key]
        query = f"wait={self.wait_s:g}&cache=0"
        if self.upload == "raw":
            query += "&" + urlencode({"ops": self.spec})
        t = time.perf_counter()
        try:
            poster = self.posters[next(self.turn) % len(self.posters)]
            status, headers, content = poster.post(
                f"/api/process/?{query}", body, ctype, {"Accept": "image/jpeg"})
        except (OSError, http.client.HTTPException) as exc:
            return None, (time.perf_counter() - t) * 1000, f"{type(exc).__name__}: {exc}", None
        job = headers.get("location")
        if status == 202:  # every ?wait slot of the gateway was taken: poll
            try:
                resp = api.wait_output(self.http, self.url, json.loads(content)["id"],
                                       self.wait_s)
            except (httpx.HTTPError, ValueError, KeyError, TimeoutError) as exc:
                return None, (time.perf_counter() - t) * 1000, f"{type(exc).__name__}: {exc}", job
            status, headers, content = (resp.status_code, dict(resp.headers), resp.content)
        ms = (time.perf_counter() - t) * 1000
        if status != 200 or not headers.get("content-type", "").startswith("image/"):
            return None, ms, f"HTTP {status}: {content[:200]!r}", job
        return content, ms, None, job

    def run(self) -> Outcome:
        results = list(self.pool.map(self._one, self.images))
        errors = [e for _, _, e in results if e]
        return ([ms for _, ms, _ in results], later_sizes([o for o, _, _ in results]),
                errors, None)

    def probe(self, image: bytes, count: int) -> list[tuple[float, str | None]]:
        """``count`` one-at-a-time requests for one image: each one's end-to-end latency
        (ms) and its job's path."""
        lat = []
        for _ in range(count):
            out, ms, err, job = self._request(image)
            if err is None and out is not None:
                lat.append((ms, job))
        return lat

    def job_docs(self, paths: list[str]) -> list[dict[str, Any]]:
        """The job documents at ``paths`` (read after the clock: not part of a request)."""
        assert self.url is not None
        docs = []
        for path in paths:
            resp = self.http.get(self.url + path)
            if resp.status_code == 200:
                docs.append(resp.json())
        return docs

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.http.close()
        for poster in self.posters:
            poster.close()
        if self.stack is not None:
            self.stack.stop()
