"""Measuring: percentiles, medians over repeats, CPU of a whole process tree."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from imgpipe.bench import measure
from imgpipe.bench.measure import ResourceMonitor, RunResult, percentile, summarize, timed_run

BURN = ("import time\n"
        "t = time.process_time()\n"
        "while time.process_time() - t < 0.4:\n"
        "    pass\n")


@pytest.mark.parametrize(("q", "want"), [(0, 1.0), (50, 2.5), (100, 4.0), (95, 3.85)])
def test_percentile_interpolates(q: float, want: float) -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], q) == pytest.approx(want)


def test_percentile_of_nothing_is_zero() -> None:
    assert percentile([], 50) == 0.0


def test_summarize_takes_medians_and_the_range() -> None:
    runs = [RunResult(images=4, wall_s=w, latencies_ms=[10.0, 20.0], cpu_s=c, peak_rss_mb=r)
            for w, c, r in ((2.0, 1.0, 100.0), (1.0, 2.0, 300.0), (4.0, 3.0, 200.0))]
    s = summarize(runs)
    assert s["images_per_s"] == {"median": 2.0, "min": 1.0, "max": 4.0}
    assert s["cpu_s"] == 2.0
    assert s["cpu_ms_per_image"] == 500.0
    assert s["peak_rss_mb"] == 300.0
    assert s["latency_ms"]["p50"] == 15.0
    assert s["errors"] == 0


def test_errors_do_not_count_as_images_done() -> None:
    r = RunResult(images=4, wall_s=1.0, latencies_ms=[], errors=["x", "y"])
    assert r.images_per_s == 2.0


def test_monitor_counts_the_cpu_of_child_processes() -> None:
    """A child that burns 0.4 CPU-seconds (by its own clock) shows up in the tree's CPU."""
    with ResourceMonitor() as mon:
        subprocess.run([sys.executable, "-c", BURN], check=True, timeout=60)
    assert mon.cpu_s >= 0.3
    assert mon.peak_rss > 0


def test_the_monitor_samples_often_at_first_then_seldom() -> None:
    # Often while short-lived children may come and go; then seldom, since each sample
    # of a whole stack costs CPU taken from the stack it measures.
    assert ResourceMonitor.interval(0.0) == measure.SAMPLE_S
    assert ResourceMonitor.interval(measure.SETTLE_S - 0.01) == measure.SAMPLE_S
    assert ResourceMonitor.interval(measure.SETTLE_S) == measure.SLOW_SAMPLE_S
    assert measure.SLOW_SAMPLE_S >= 4 * measure.SAMPLE_S


def test_timed_run_prefers_the_modes_own_wall_time() -> None:
    r = timed_run(lambda: ([1.0], [(1, 1)], [], 0.5), 1, monitor=False)
    assert r.wall_s == 0.5
    assert r.cpu_s is None
    r = timed_run(lambda: ([1.0], [(1, 1)], [], None), 1)
    assert r.wall_s > 0
    assert r.cpu_s is not None


def test_sizes_given_as_a_function_are_read_once_the_clock_has_stopped() -> None:
    called: list[float] = []

    def sizes() -> list[tuple[int, int] | None]:
        called.append(time.perf_counter())
        return [(2, 1)]

    t0 = time.perf_counter()
    r = timed_run(lambda: ([1.0], sizes, [], None), 1)
    assert r.out_sizes == [(2, 1)]
    assert len(called) == 1 and called[0] >= t0 + r.outer_wall_s
