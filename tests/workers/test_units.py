"""Small parts: the test-only filters, the worker's counters, its CLI endpoints."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from imgpipe.core.errors import FilterError
from imgpipe.core.protocol import Result
from imgpipe.filters import REGISTRY, apply_chain, parse_chain
from imgpipe.filters.testing import enable_test_filters
from imgpipe.workers.monitor import Stats
from imgpipe.workers.service import task_endpoints
from tests.support import make_settings


def test_test_filters_exist_only_when_enabled_and_enabling_twice_is_fine(
        test_filters: None) -> None:
    enable_test_filters()  # the fixture enabled them already: no error
    img = np.zeros((4, 4, 3), np.uint8)
    assert apply_chain(img, parse_chain("sleep:ms=1")) is img
    assert REGISTRY["crash"].cost == "light"
    with pytest.raises(FilterError, match="ms"):
        parse_chain("sleep:ms=-1")


def test_without_enabling_the_test_filters_are_unknown() -> None:
    # A fresh interpreter: this one's registry may have them enabled by another test.
    code = ("from filters import parse_chain\n"
            "for name in ('crash', 'sleep:ms=1'):\n"
            "    try:\n        parse_chain(name)\n"
            "    except Exception as exc:\n        print(type(exc).__name__, exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.splitlines()
    assert len(out) == 2 and all(line.startswith("FilterError unknown filter") for line in out)


def _result(ok: bool, retry: bool = False, **timings: float) -> Result:
    return Result(task_id="t", job_id="j", n=0, attempt=1, worker="w", ok=ok, retry=retry,
                  timings=timings)


def test_stats_count_done_failed_retried_and_stage_means() -> None:
    stats = Stats(worker="w", serves="all", slots=2)
    stats.claim("t", 1)
    assert stats.snapshot()["inflight"] == 1
    stats.finish(_result(True, decode=10.0, filters=20.0, encode=4.0, total=40.0))
    stats.finish(_result(True, decode=30.0, filters=10.0, encode=6.0, total=50.0))
    stats.finish(_result(False))
    stats.finish(_result(False, retry=True))
    v = stats.snapshot()
    assert (v["tasks_done"], v["tasks_failed"], v["tasks_retried"], v["inflight"]) == \
        (2, 1, 1, 0)
    assert (v["decode_ms_mean"], v["decode_ms_last"]) == (20.0, 30.0)
    assert (v["total_ms_mean"], v["encode_ms_last"]) == (45.0, 6.0)
    assert v["throughput"] > 0


@pytest.mark.parametrize(("serves", "classes"), [
    ("light", ["light"]), ("heavy", ["heavy"]), ("all", ["light", "heavy"])])
def test_a_worker_connects_to_the_task_sockets_of_what_it_serves(
        tmp_path: object, serves: str, classes: list[str]) -> None:
    s = make_settings(tmp_path / "d", worker_serves=serves)  # type: ignore[operator]
    want = {"light": s.light_task_endpoint, "heavy": s.heavy_task_endpoint}
    assert task_endpoints(s) == [want[c] for c in classes]
