"""Test-only filters, registered only when ``IMGPIPE_TEST_HOOKS`` is on.

* ``crash`` kills the process that runs it with SIGKILL, as an OOM kill or a segfault
  in a native library would: the worker must survive, replace its filter process and
  report the task as retryable.
* ``sleep:ms=N`` sleeps N ms and returns its input: a filter that overruns a deadline.

Without :func:`enable_test_filters` these names are unknown filters (400 at the gateway).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

from imgpipe.filters.params import Params, param
from imgpipe.filters.pixels import Image
from imgpipe.filters.registry import REGISTRY, register

MAX_SLEEP_MS = 600_000


@dataclass(frozen=True)
class CrashParams(Params):
    pass


@dataclass(frozen=True)
class SleepParams(Params):
    ms: int = param(100, lo=0, hi=MAX_SLEEP_MS, doc="how long to sleep, milliseconds")


def _crash(img: Image, p: CrashParams) -> Image:
    """Kill the running process with SIGKILL (test only)."""
    os.kill(os.getpid(), signal.SIGKILL)
    return img  # not reached


def _sleep(img: Image, p: SleepParams) -> Image:
    """Sleep ms milliseconds, then return the input unchanged (test only)."""
    time.sleep(p.ms / 1000)
    return img


def enable_test_filters() -> None:
    """Register ``crash`` and ``sleep``; calling it again is harmless."""
    if "crash" not in REGISTRY:
        register("crash", params=CrashParams)(_crash)
    if "sleep" not in REGISTRY:
        register("sleep", params=SleepParams)(_sleep)
