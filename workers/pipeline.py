"""One task, start to finish: decode, filter (in the pool, or inline), encode, a Result.

:func:`process_task` is the worker's per-message logic, free of sockets so a test can
call it directly. It runs on one of the worker's slot threads; decode and encode hold
a *gate* (a semaphore of ``worker_threads``) because they burn CPU in OpenCV/Pillow
with the GIL released, while the filter stage only waits on a pool process.

Where the pixels live: the decoded frame is copied once into the slot's shared-memory
buffer, the filter process reads it there and writes its result back into the same
buffer (or a bigger one), and the encoder reads the result from there. Only the
segment's name, shape and dtype cross the process boundary. A frame the worker has
no shared memory for (ShmFull) hands the task back (``retry``) for another worker.

A light chain estimated to cost less than that trip (``inline_filter_ms``: a resize
after a reduced decode, a crop, a flip) runs on the slot thread between decode and
encode instead, under the same gate: OpenCV releases the GIL, the frame is never
copied, and the pool is left to the filters worth a process.

While nothing else runs on the host (``host_idle``: one request alone), a task's
filters in the pool run on ``idle_filter_threads`` OpenCV threads and its JPEG is
encoded in as many bands (``lent_threads``), so a lone image gets the cores nobody else
is using; under load, one thread per process, as the measurements in docs/worker.md ask.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imgpipe.core.errors import FilterError, ImageError
from imgpipe.core.protocol import Result, Task
from imgpipe.core.runtime import host_idle
from imgpipe.filters import (
    MAX_FILTERS,
    apply_chain,
    content_type,
    parse_chain,
)
from imgpipe.filters.chain import filters_ms, measured
from imgpipe.filters.pixels import copy_pixels
from imgpipe.workers.child import gravity_note
from imgpipe.workers.pool import DeadlineExceeded, FilterFailed, FilterPool, PoolError, ProcessDied
from imgpipe.workers.shm import Buffer, BufferSet, ShmFull

log = logging.getLogger(__name__)

@dataclass
class Options:
    """What ``process_task`` needs from the settings, plus the worker's name."""

    worker: str
    max_pixels: int
    max_filters: int = MAX_FILTERS
    delay_ms: int = 0
    gate: Any = field(default_factory=contextlib.nullcontext)
    inline_ms: float = 0.0
    idle_threads: int = 1  # OpenCV threads for the filters while the host is idle


def process_task(task: Task, pool: FilterPool, buffers: BufferSet, opts: Options, *,
                 received: float | None = None) -> Result:
    """Run ``task`` and return its Result: ok, final error, or retryable error.

    ``received`` is when the worker took the task off its socket (``time.time()``);
    timings are milliseconds: queue (queued -> received), decode, filters, encode and
    total (received -> result ready, the worker's whole share).
    """
    received = time.time() if received is None else received
    start = time.perf_counter()
    timings: dict[str, float] = {
        "queue": max(0.0, (received - task.queued_at) * 1000) if task.queued_at else 0.0}
    result = Result(task_id=task.task_id, job_id=task.job_id, n=task.n, attempt=task.attempt,
                    lease=task.lease, worker=opts.worker, ok=False, timings=timings)
    try:
        chain = parse_chain(task.ops, max_filters=opts.max_filters)
        if opts.delay_ms:
            time.sleep(opts.delay_ms / 1000)
        _run(task, chain, pool, buffers, opts, result)
    except (ImageError, FilterError, FilterFailed) as exc:
        result.error = _message(exc)
    except (DeadlineExceeded, ProcessDied) as exc:
        result.error, result.retry = str(exc), True
    except ShmFull as exc:  # this worker's shared memory, not the image: another may fit it
        log.warning("task %s handed back: %s", task.task_id, exc.detail)
        result.error, result.retry = f"worker out of shared memory: {exc.detail}", True
    except PoolError as exc:
        result.error, result.retry = f"filter pool unavailable: {exc}", True
    except Exception as exc:  # noqa: BLE001 - one bad task must not stop the worker
        log.exception("task %s failed unexpectedly", task.task_id)
        result.error = f"internal error: {type(exc).__name__}: {exc}"
    timings["total"] = (time.perf_counter() - start) * 1000
    return result


def _run(task: Task, chain: Any, pool: FilterPool, buffers: BufferSet, opts: Options,
         result: Result) -> None:
    timings = result.timings
    with opts.gate:
        t = time.perf_counter()
        img, fmt_in, out_size = decode_checked(task.payload, chain, opts.max_pixels)
        timings["decode"] = (time.perf_counter() - t) * 1000
        inline = runs_inline(chain, img, opts.inline_ms)
        if inline:  # cheaper than the hop: on this thread, the GIL released in OpenCV
            t = time.perf_counter()
            used: list[str] = []
            out = apply_chain(img, chain, max_pixels=opts.max_pixels, gravities=used)
            timings["filters"] = (time.perf_counter() - t) * 1000
            del img
            _encode(out, chain, fmt_in, result, opts.idle_threads)
            result.gravity = gravity_note(used)
            return
    buf = buffers.acquire()
    try:
        with opts.gate:
            shape, dtype = copy_into(img, out_size, buf)
            del img
        t = time.perf_counter()
        threads = lent_threads(opts.idle_threads)
        done = pool.run(buf.name, shape, dtype, chain.canonical(), deadline=task.deadline,
                        max_pixels=opts.max_pixels, grow=lambda nbytes: _grow(buf, nbytes),
                        threads=threads)
        timings["filters"] = (time.perf_counter() - t) * 1000
        with opts.gate:
            assert buf.shm is not None and buf.shm.name == done.seg
            view = np.ndarray(done.shape, dtype=np.dtype(done.dtype), buffer=buf.shm.buf)
            try:
                _encode(view, chain, fmt_in, result, opts.idle_threads)
            finally:
                del view
        result.gravity = done.gravity
    finally:
        buffers.release(buf)


def lent_threads(idle_threads: int) -> int:
    """Threads a step may use beyond its own: ``idle_threads`` while nothing else runs
    on the host (a lone image gets the idle cores), else 0."""
    return idle_threads if idle_threads > 1 and host_idle() else 0


def runs_inline(chain: Any, img: np.ndarray, inline_ms: float) -> bool:
    """True when ``chain`` on ``img`` is light, made of measured filters (a test filter
    that kills its process stays in the pool) and estimated under ``inline_ms``:
    cheaper than the trip to a pool process and back."""
    if inline_ms <= 0 or chain.cost == "heavy" or not measured(chain):
        return False
    height, width = img.shape[:2]
    return filters_ms(chain, width, height)[0] <= inline_ms


def _encode(img: np.ndarray, chain: Any, fmt_in: str, result: Result, idle_threads: int
            ) -> None:
    t = time.perf_counter()
    data, fmt = chain.encode_output(img, fmt_in, threads=max(1, lent_threads(idle_threads)))
    result.timings["encode"] = (time.perf_counter() - t) * 1000
    result.ok = True
    result.payload = data
    result.height, result.width = int(img.shape[0]), int(img.shape[1])
    result.format = fmt
    result.content_type = content_type(fmt)


def decode_checked(data: Any, chain: Any, max_pixels: int
                   ) -> tuple[np.ndarray, str, tuple[int, int]]:
    """Decode ``data`` (reduced when the chain allows it; in OpenCV's B, G, R order when
    the chain treats the channels alike, so neither end swaps them); the frame, its
    format and the size the chain makes of it.

    The pixel limit is checked from the header before anything is decoded, for the
    input and for every step's output size."""
    img, info = chain.decode_input(data, max_pixels=max_pixels)
    height, width = img.shape[:2]
    return img, info.format, chain.output_size(width, height, max_pixels=max_pixels)


def copy_into(img: np.ndarray, out_size: tuple[int, int], buf: Buffer
              ) -> tuple[tuple[int, ...], str]:
    """Copy the frame into ``buf``, sized for the larger of the frame and the chain's
    output (``out_size``, width × height) so the filter process rarely has to ask for
    more; its shape and dtype."""
    out_w, out_h = out_size
    channels = img.shape[2] if img.ndim == 3 else 1
    need = max(img.nbytes, out_w * out_h * channels * img.itemsize)
    view = np.ndarray(img.shape, dtype=img.dtype, buffer=buf.ensure(need))
    try:
        copy_pixels(view, img)
    finally:
        del view
    return tuple(img.shape), img.dtype.str


def _grow(buf: Buffer, nbytes: int) -> str:
    buf.ensure(nbytes)
    return buf.name


def _message(exc: BaseException) -> str:
    if isinstance(exc, ImageError):
        return f"cannot decode image: {getattr(exc, 'detail', exc)}"
    if isinstance(exc, FilterError):
        return f"bad ops: {getattr(exc, 'detail', exc)}"
    return str(exc)

