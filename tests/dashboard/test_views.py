"""Snapshot -> dataframes and charts, checked on snapshots built by the real collector."""

from __future__ import annotations

import pytest

from core.advice import SCALE_UP, recommend
from core.config import Settings
from dashboard import charts, views
from dashboard.charts import Chart
from dashboard.collector import Collector, Snapshot
from tests.dashboard.feed import event, heartbeat, metric


@pytest.fixture
def busy_snapshot(settings: Settings) -> Snapshot:
    """Three busy workers, a queue growing by 2 a second, latency and stage figures."""
    c = Collector(settings)
    try:
        for t in range(6):
            now = 1000.0 + t
            for i in range(3):
                c.handle(heartbeat(f"w{i}", t + 1, state="busy", done=3 * t + i,
                                   inflight=[f"t{i}{t}"]), now=now)
            c.handle(metric("vent", "ventilator", t + 1, queue_depth=30 + 2 * t, inflight=3),
                     now=now)
            c.set_gateway_metrics({"latency_ms": {"p50": 900.0 + t, "p95": 1500.0,
                                                  "p99": 2000.0}}, now=now)
            c.handle(metric("w0", "worker", t + 1, throughput=3.0, queue_ms_mean=100.0,
                            decode_ms_mean=30.0, filters_ms_mean=60.0, encode_ms_mean=10.0,
                            total_ms_mean=200.0), now=now)
            c.sample(now)
        c.handle(event("task retried", worker="w1", detail="attempt 2"), now=1005.5)
        return c.snapshot(now=1005.5)
    finally:
        c.stop()


def test_fleet_frame(busy_snapshot: Snapshot) -> None:
    df = views.fleet_frame(busy_snapshot)
    assert list(df.columns) == views.FLEET_COLUMNS
    assert list(df["id"]) == ["w0", "w1", "w2"]
    assert set(df["state"]) == {"busy"}
    assert df["rss MB"].tolist() == [150.0] * 3
    assert df["done"].tolist() == [15, 16, 17]
    assert df["last beat s"].tolist() == [0.5] * 3


def test_fleet_frame_empty(settings: Settings) -> None:
    df = views.fleet_frame(Collector(settings).snapshot())
    assert df.empty and list(df.columns) == views.FLEET_COLUMNS


def test_series_and_trend(busy_snapshot: Snapshot) -> None:
    df = views.series_frame(busy_snapshot)
    assert len(df) == 6
    assert df["queue_depth"].tolist() == [30, 32, 34, 36, 38, 40]
    assert df["busy"].tolist() == [3] * 6
    assert views.queue_trend(busy_snapshot) == pytest.approx(2.0)


def test_live_metrics_feed_the_advice(busy_snapshot: Snapshot) -> None:
    m = views.live_metrics(busy_snapshot)
    assert m["workers"] == {"alive": 3, "busy": 3, "idle": 0, "lost": 0}
    assert (m["queue_depth"], m["in_flight"], m["throughput_per_s"]) == (40, 3, 3.0)
    assert m["queue_trend_per_s"] == pytest.approx(2.0)
    assert m["latency_ms"]["p95"] == 1500.0
    advice = recommend(m)
    assert advice["action"] == SCALE_UP and advice["workers"] > 3


def series(chart: Chart, name: str) -> list[float]:
    rows = chart.data[chart.data["series"] == name]
    return rows["value"].tolist()


def test_charts_carry_the_numbers(busy_snapshot: Snapshot) -> None:
    df = views.series_frame(busy_snapshot)
    assert df["ms"].tolist() == [1_000_000.0 + 1000 * t for t in range(6)]
    thr = charts.throughput_chart(df)
    assert set(thr.data["series"]) == {"outputs/s", "busy workers", "alive workers"}
    assert series(thr, "outputs/s") == [3.0] * 6 and series(thr, "busy workers") == [3] * 6
    assert thr.spec["resolve"] == {"scale": {"y": "independent"}}   # workers on the right
    lat = charts.latency_chart(df)
    assert set(lat.data["series"]) == {"p50", "p95", "p99"}
    assert series(lat, "p50")[-1] == 905.0
    q = charts.queue_chart(df)
    assert series(q, "queued") == [30, 32, 34, 36, 38, 40]
    assert series(q, "in flight") == [3] * 6
    st = charts.stage_chart(busy_snapshot)
    assert set(st.data["source"]) == {"w0"}
    assert st.data[["stage", "ms"]].values.tolist() == [["queue", 100.0], ["decode", 30.0],
                                                        ["filters", 60.0], ["encode", 10.0]]
    for chart in (thr, lat, q, st):
        assert not chart.message
        assert chart.spec["usermeta"]["embedOptions"]["renderer"] == "svg"


def test_chart_specs_do_not_depend_on_the_numbers(busy_snapshot: Snapshot,
                                                  settings: Settings) -> None:
    """The browser swaps data in place only while the spec stays the same (no remount)."""
    other = Collector(settings)
    try:
        for t in range(3):
            other.handle(heartbeat("zz", t + 1, state="idle", done=t), now=2000.0 + t)
            other.handle(metric("vent", "ventilator", t + 1, queue_depth=t, inflight=0),
                         now=2000.0 + t)
            other.set_gateway_metrics({"latency_ms": {"p95": 7.0}}, now=2000.0 + t)
            other.handle(metric("zz", "worker", t + 1, throughput=0.5, decode_ms_mean=5.0,
                                total_ms_mean=5.0), now=2000.0 + t)
            other.sample(2000.0 + t)
        snap = other.snapshot(now=2002.5)
    finally:
        other.stop()
    a, b = views.series_frame(busy_snapshot), views.series_frame(snap)
    assert not a.equals(b)
    for make in (charts.throughput_chart, charts.latency_chart, charts.queue_chart):
        assert make(a).spec == make(b).spec and not make(a).data.equals(make(b).data)
    assert (charts.stage_chart(busy_snapshot).spec == charts.stage_chart(snap).spec)
    assert set(charts.latency_chart(b).data["series"]) == {"p95"}


def test_charts_on_an_empty_snapshot_say_why(settings: Settings) -> None:
    snap = Collector(settings).snapshot()
    df = views.series_frame(snap)
    for chart in (charts.throughput_chart(df), charts.latency_chart(df),
                  charts.queue_chart(df), charts.stage_chart(snap)):
        assert chart.message and chart.data["text"].tolist() == [chart.message]
        assert chart.spec["mark"]["type"] == "text"


def test_events_newest_first_and_gaps(busy_snapshot: Snapshot) -> None:
    ev = views.events_frame(busy_snapshot)
    assert ev.iloc[0]["event"] == "task retried" and ev.iloc[0]["worker"] == "w1"
    gaps = views.gaps_frame(busy_snapshot)
    assert set(gaps["kind"]) == {"heartbeat", "metric"}
    assert gaps["missed"].sum() == 0 and gaps["received"].sum() == 30
