"""One JPEG encoded in horizontal bands on several threads, byte for byte the JPEG a
single encode writes.

A JPEG whose scan has a restart marker after every row of MCUs (``DRI``) is a chain of
independent pieces: at each marker the encoder empties its bit buffer (padding with 1
bits) and resets the DC predictions, so what follows depends on nothing before it.
With baseline coding and the standard Huffman tables (libjpeg's defaults, OpenCV's
too), encoding rows ``[a, b)`` of a frame alone gives exactly the entropy-coded bytes
the whole frame's encode writes for those rows. So a frame is cut into bands, each
band is encoded on its own thread (OpenCV releases the GIL), and the bands' scans are
joined with the marker between them: the first band's headers (its frame height set
to the whole's), every band's scan, one end-of-image.

Band edges fall on MCU rows (16 pixel rows for colour, 4:2:0, 8 for gray). Restart
markers are numbered modulo 8 along the scan, so a band's own markers are renumbered
for where the band starts, and the marker written between two bands carries the number
of the MCU row it follows.

:func:`encode_jpeg` writes every JPEG at least :data:`MIN_ROWS` tall with those markers
whether it runs on one thread or several, so an output's bytes never depend on how
busy its host was (the markers cost ~0.1 % of the file).
"""

from __future__ import annotations

import ctypes
import functools
import os
import queue
import re
import struct
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import cv2
import numpy as np

__all__ = ["MIN_ROWS", "encode_jpeg", "restart_interval", "stitch"]

MIN_ROWS = 256
"""Shorter frames are written without restart markers and on one thread."""
MAX_SIDE = 65500
"""libjpeg's largest width or height (a band could be encoded, the whole could not)."""

_RST = re.compile(rb"\xff[\xd0-\xd7]")
# _RENUMBER[shift][marker]: restart marker ``marker`` counted on by ``shift``
_RENUMBER = tuple({bytes((0xFF, 0xD0 + i)): bytes((0xFF, 0xD0 + (i + shift) % 8))
                   for i in range(8)} for shift in range(8))
_EOI = b"\xff\xd9"
_SOF = frozenset({0xC0, 0xC1})  # baseline and extended sequential: what libjpeg writes
_SOS = 0xDA

_helper_list: list[_Helper] = []
_helpers_lock = threading.Lock()
_owner = 0  # the pid that started _helper_list


def mcu_size(channels: int) -> int:
    """An MCU's side in pixels: 16 for colour (4:2:0, OpenCV's default), 8 for gray."""
    return 8 if channels == 1 else 16


def restart_interval(width: int, channels: int) -> int:
    """MCUs in one row of MCUs."""
    return -(-width // mcu_size(channels))


def _edges(height: int, threads: int, mcu: int) -> list[int]:
    """Row edges of at most ``threads`` bands of about equal height, on MCU rows."""
    edges = [0]
    for k in range(1, threads):
        edge = round(height * k / threads / mcu) * mcu
        if edges[-1] < edge < height:
            edges.append(edge)
    edges.append(height)
    return edges


def _renumbered(scan: memoryview, shift: int) -> Any:
    """A band's scan with its restart markers counted on by ``shift`` (0..7)."""
    if shift == 0:
        return scan
    table = _RENUMBER[shift]
    return _RST.sub(lambda m: table[m.group()], scan)


def _band(img: np.ndarray, params: list[int], bgr: bool = False) -> bytes:
    """One band; an RGB one swapped to BGR on this thread too."""
    if img.ndim == 3 and img.shape[2] == 3 and not bgr:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", img, params)
    if not ok:
        raise ValueError("OpenCV could not encode the band")
    return buf.tobytes()


def _headers(jpeg: bytes) -> tuple[int, int]:
    """Where the frame height of the SOF segment sits, and where the scan's
    entropy-coded data starts (just past the SOS segment)."""
    pos, height_at = 2, -1
    while pos + 4 <= len(jpeg):
        if jpeg[pos] != 0xFF:
            break
        marker = jpeg[pos + 1]
        (length,) = struct.unpack_from(">H", jpeg, pos + 2)
        if marker in _SOF:
            height_at = pos + 5
        if marker == _SOS:
            if height_at < 0:
                break
            return height_at, pos + 2 + length
        pos += 2 + length
    raise ValueError("not a baseline JPEG with one scan")


def stitch(bands: list[bytes], edges: list[int], mcu: int) -> bytes:
    """The bands' scans joined into one JPEG (module docstring): band ``k`` holds rows
    ``edges[k]`` to ``edges[k + 1]``, every inner edge on an MCU row of ``mcu`` pixels."""
    first = bands[0]
    height_at, _ = _headers(first)
    parts: list[Any] = [first[:height_at], struct.pack(">H", edges[-1]),
                        memoryview(first)[height_at + 2:-2]]
    for band, start in zip(bands[1:], edges[1:-1], strict=True):
        _, scan = _headers(band)
        rows = start // mcu  # MCU rows before this band
        parts += [bytes((0xFF, 0xD0 + (rows - 1) % 8)),
                  _renumbered(memoryview(band)[scan:-2], rows % 8)]
    if not all(band.endswith(_EOI) for band in bands):
        raise ValueError("a band does not end with EOI")
    parts.append(_EOI)
    return b"".join(parts)


class _Helper(threading.Thread):
    """A band thread of this process; runs what it is handed, one at a time."""

    def __init__(self) -> None:
        super().__init__(name="jpeg-band", daemon=True)
        self.jobs: queue.SimpleQueue[tuple[Future[bytes], Callable[[], bytes]]] = (
            queue.SimpleQueue())
        self.tid = 0
        self._ready = threading.Event()
        self.start()
        self._ready.wait()

    def run(self) -> None:
        self.tid = threading.get_native_id()
        self._ready.set()
        while True:
            future, work = self.jobs.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(work())
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    future.set_exception(exc)

    def submit(self, work: Callable[[], bytes]) -> Future[bytes]:
        future: Future[bytes] = Future()
        self.jobs.put((future, work))
        return future


def _helpers(count: int) -> list[_Helper]:
    """``count`` band threads of this process (started on first use; a forked child
    starts its own)."""
    global _owner
    with _helpers_lock:
        if _owner != os.getpid():
            _helper_list.clear()
            _owner = os.getpid()
        while len(_helper_list) < count:
            _helper_list.append(_Helper())
        return _helper_list[:count]


def _steer(helpers: list[_Helper]) -> None:
    """Let the helpers run anywhere but on the caller's CPU.

    A thread woken by one that keeps running is queued on the waker's CPU when the
    others look busy, and in a virtual machine an idle vCPU looks busy (the hypervisor
    has descheduled it): the helper would wait for the caller's band to end, and two
    bands would take as long as one frame (measured on this project's 2-vCPU machine:
    a 1920×1080 frame in two bands took 8-11 ms unsteered, 6.3 steered, 9.8 whole).
    Allowed elsewhere only, the helper wakes the other CPU."""
    try:
        cpu = _getcpu()
        allowed = os.sched_getaffinity(0) - {cpu}
        if cpu < 0 or not allowed:
            return
        for helper in helpers:
            os.sched_setaffinity(helper.tid, allowed)
    except (OSError, AttributeError):
        pass  # not Linux, or not allowed: the scheduler places them as it will


def _libc_getcpu() -> Any:
    try:
        fn = ctypes.CDLL(None).sched_getcpu
    except (OSError, AttributeError):
        return lambda: -1
    fn.restype, fn.argtypes = ctypes.c_int, []
    return fn


_getcpu = _libc_getcpu()


def encode_jpeg(img: np.ndarray, quality: int, *, threads: int = 1, bgr: bool = False
                ) -> bytes:
    """``img`` (RGB, or BGR with ``bgr``, or gray; uint8) as a baseline JPEG; frames at
    least MIN_ROWS tall carry a restart marker per MCU row and are encoded as up to
    ``threads`` bands at once: the same bytes however many threads ran."""
    height, width = img.shape[:2]
    if max(height, width) > MAX_SIDE:
        raise ValueError(f"JPEG holds at most {MAX_SIDE} px a side")
    channels = img.shape[2] if img.ndim == 3 else 1
    params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    if height < MIN_ROWS:
        return _band(img, params, bgr)
    params += [cv2.IMWRITE_JPEG_RST_INTERVAL, restart_interval(width, channels)]
    mcu = mcu_size(channels)
    edges = _edges(height, threads, mcu)
    if len(edges) <= 2:
        return _band(img, params, bgr)
    helpers = _helpers(len(edges) - 2)
    _steer(helpers)
    rest = [h.submit(functools.partial(_band, img[a:b], params, bgr))
            for h, a, b in zip(helpers, edges[1:-1], edges[2:], strict=True)]
    try:
        first = _band(img[:edges[1]], params, bgr)
    finally:
        bands = [f.result() for f in rest]
    return stitch([first, *bands], edges, mcu)
