"""The filter process: runs chains on frames that live in shared memory.

It speaks JSON over its pipe (``send_bytes``/``recv_bytes``), so nothing it receives
is unpickled and nothing large can cross by accident: a request names a segment, a
shape, a dtype and the canonical ops string; the pixels stay where they are.

Request ``{"seg", "shape", "dtype", "ops", "max_pixels", "threads"}`` -> reply
``{"ok": true, "shape", "dtype", "ms", "gravity", "threads"}`` once the result sits at the
start of the same segment (the chain's last step writes it there itself when it can:
blur, brightness and the other table filters; otherwise it is copied in), or
``{"ok": false, "error"}`` when the chain raised. ``threads`` asks for that many OpenCV
threads for this request (0: the process's own setting); the reply says how many ran.
``gravity`` is what the chain's ``gravity=smart`` placements did (:func:`gravity_note`).
A result larger than the segment is answered ``{"need": nbytes}`` first; the worker
replies ``{"seg": bigger}`` and the result is copied there (the worker owns every
segment's life; this process only maps them), or ``{"seg": null}`` when it has no room
for one, and the result is dropped.
"""

from __future__ import annotations

import json
import logging
import mmap
import signal
import time
from collections import OrderedDict
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from imgpipe.core.protocol import GravityNote
from imgpipe.core.runtime import tune_malloc
from imgpipe.filters import apply_chain, parse_chain
from imgpipe.filters.pixels import copy_pixels
from imgpipe.workers.shm import SHM_DIR, attach

log = logging.getLogger(__name__)

MAX_MAPPED = 6
MAX_THREADS = 256


class Mappings:
    """Segments this process has mapped, kept open so reused segments cost no faults."""

    def __init__(self, limit: int = MAX_MAPPED, shm_dir: Path = SHM_DIR) -> None:
        self.limit = limit
        self.shm_dir = Path(shm_dir)
        self._maps: OrderedDict[str, mmap.mmap] = OrderedDict()

    def get(self, name: str) -> mmap.mmap:
        mm = self._maps.get(name)
        if mm is None:
            mm = self._maps[name] = attach(name, self.shm_dir)
            while len(self._maps) > self.limit:
                _, old = self._maps.popitem(last=False)
                old.close()
        self._maps.move_to_end(name)
        return mm

    def close(self) -> None:
        for mm in self._maps.values():
            mm.close()
        self._maps.clear()


def run_job(req: dict[str, Any], maps: Mappings, conn: Connection) -> dict[str, Any]:
    """Apply ``req["ops"]`` to the frame in ``req["seg"]``; leave the result in place."""
    start = time.perf_counter()
    mm = maps.get(req["seg"])
    img = np.ndarray(tuple(req["shape"]), dtype=np.dtype(req["dtype"]), buffer=mm)
    start_of_segment = img.ctypes.data

    def into(shape: tuple[int, ...]) -> np.ndarray | None:
        """The segment itself for the last step's result, when it fits: the worker
        encodes from there, so the result is not copied in after."""
        fits = int(np.prod(shape)) <= len(mm)
        return np.ndarray(shape, dtype=np.uint8, buffer=mm) if fits else None

    try:
        chain = parse_chain(req["ops"], max_filters=64)  # the worker enforced the limit
        used: list[str] = []
        out = np.ascontiguousarray(apply_chain(img, chain, max_pixels=int(req["max_pixels"]),
                                               gravities=used, into=into))
    except Exception as exc:  # noqa: BLE001 - any filter failure is this task's, not ours
        log.debug("chain %s failed", req["ops"], exc_info=True)
        return {"ok": False, "error": _message(exc)}
    finally:
        del img
    if out.ctypes.data == start_of_segment:  # written there, or the input came back
        return _done(out, used, start)
    if np.shares_memory(out, mm):
        out = out.copy()  # the chain returned (a view of) its input: do not overlap
    target = mm
    if out.nbytes > len(mm):
        conn.send_bytes(json.dumps({"need": out.nbytes}).encode())
        answer = json.loads(conn.recv_bytes())
        if answer.get("seg") is None:
            return {"ok": False, "error": "no shared memory for the result"}
        target = maps.get(answer["seg"])
    dst = np.ndarray(out.shape, dtype=out.dtype, buffer=target)
    copy_pixels(dst, out)
    del dst
    return _done(out, used, start)


def _done(out: np.ndarray, used: list[str], start: float) -> dict[str, Any]:
    return {"ok": True, "shape": list(out.shape), "dtype": out.dtype.str,
            "ms": (time.perf_counter() - start) * 1000, "gravity": gravity_note(used)}


def gravity_note(used: list[str]) -> GravityNote | None:
    """One note for an output from its chain's smart placements, in order: ``smart`` only
    when every one found interest, ``center`` when any fell back, None without any."""
    if not used:
        return None
    return "smart" if all(g == "smart" for g in used) else "center"


def _threads(asked: Any, default: int) -> int:
    """The OpenCV threads a request asks for, within 1..MAX_THREADS; ``default`` if it
    asks for none (0 or absent)."""
    if isinstance(asked, int) and not isinstance(asked, bool) and asked > 0:
        return min(asked, MAX_THREADS)
    return default


def _message(exc: BaseException) -> str:
    detail = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
    return f"filter failed: {detail}" if getattr(exc, "detail", None) else \
        f"filter failed: {type(exc).__name__}: {detail}"


def main(conn: Connection, cv2_threads: int, test_hooks: bool, shm_dir: str = str(SHM_DIR)
         ) -> None:
    """Serve requests until the worker closes the pipe (it exits, or drops this process)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the worker's to handle
    tune_malloc()
    import cv2

    cv2.setNumThreads(cv2_threads)
    if test_hooks:
        from imgpipe.filters.testing import enable_test_filters

        enable_test_filters()
    maps = Mappings(shm_dir=Path(shm_dir))
    threads = cv2_threads
    try:
        while True:
            try:
                req = json.loads(conn.recv_bytes())
            except (EOFError, OSError):
                return
            want = _threads(req.get("threads"), cv2_threads)
            if want != threads:  # a lone task on an idle host runs on more cores
                cv2.setNumThreads(threads := want)
            reply = run_job(req, maps, conn)
            reply["threads"] = threads
            conn.send_bytes(json.dumps(reply).encode())
    finally:
        maps.close()
