"""Snapshot -> dataframes and charts, checked on snapshots built by the real collector."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from imgpipe.core.advice import SCALE_UP, recommend
from imgpipe.core.config import Settings
from imgpipe.dashboard import charts, views
from imgpipe.dashboard.charts import Chart
from imgpipe.dashboard.collector import Collector, Snapshot
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


def job_doc(job_id: str, state: str, *timings: dict[str, float | None],
            failed: int = 0) -> dict[str, object]:
    """A job document as ``GET /api/jobs`` returns it: done outputs, then failed ones."""
    outs = [{"n": i, "state": "done", "timings_ms": {**t, "total": None}}
            for i, t in enumerate(timings)]
    outs += [{"n": len(outs) + i, "state": "failed", "timings_ms": {"queue": 9999.0}}
             for i in range(failed)]
    return {"id": job_id, "state": state, "outputs": outs,
            "progress": {"done": len(timings), "failed": failed, "total": len(outs)}}


RECENT = [  # newest first, as the gateway lists them
    job_doc("3333aaaa-0000", "running", {"queue": 1.0, "decode": 2.0, "filters": 3.0,
                                         "encode": 4.0}),
    job_doc("2222bbbb-0000", "partial", {"queue": 10.0, "decode": 20.0, "filters": 30.0,
                                         "encode": 40.0},
            {"queue": 20.0, "decode": 40.0, "filters": 60.0, "encode": 80.04}, failed=1),
    job_doc("0000dddd-0000", "running"),          # nothing finished yet: no bar
    job_doc("1111cccc-0000", "done", {"queue": 0.123, "decode": None, "filters": 5.55,
                                      "encode": 1.0}),
]


def test_jobs_timing_figure_bars_per_job() -> None:
    fig = views.jobs_timing_figure(RECENT)
    assert [t.name for t in fig.data] == ["queue", "decode", "filters", "encode"]
    labels = ["3333aaaa · running", "2222bbbb · partial", "1111cccc · done"]
    for trace in fig.data:
        assert trace.orientation == "h" and list(trace.y) == labels
        assert trace.marker.color == charts.STAGE_COLORS[trace.name]
    assert fig.layout.barmode == "stack" and fig.layout.yaxis.autorange == "reversed"
    x = {t.name: list(t.x) for t in fig.data}
    assert x == {"queue": [1.0, 15.0, 0.1], "decode": [2.0, 30.0, 0.0],
                 "filters": [3.0, 45.0, 5.5], "encode": [4.0, 60.0, 1.0]}
    # hover: done outputs averaged, and the bar's length (ms per output)
    assert [list(c) for c in fig.data[0].customdata] == [[1, 10.0], [2, 150.0], [1, 6.6]]
    assert "outputs: %{customdata[0]}" in fig.data[0].hovertemplate
    assert fig.layout.title.text == views.JOB_TIMINGS_TITLE


def test_jobs_timing_figure_is_stable() -> None:
    """Streamlit keys a Plotly element by its figure: same jobs, same JSON, no remount."""
    first = views.jobs_timing_figure(copy.deepcopy(RECENT)).to_json()
    assert views.jobs_timing_figure(copy.deepcopy(RECENT)).to_json() == first
    jitter = copy.deepcopy(RECENT)
    jitter[1]["outputs"][0]["timings_ms"]["decode"] = 20.0000001   # rounds to the same 0.1
    assert views.jobs_timing_figure(jitter).to_json() == first
    changed = copy.deepcopy(RECENT)
    changed[0]["outputs"][0]["timings_ms"]["filters"] = 3.2
    assert views.jobs_timing_figure(changed).to_json() != first


def test_jobs_timing_figure_empty_says_why() -> None:
    for jobs in ([], [job_doc("0000dddd-0000", "failed", failed=2)]):
        fig = views.jobs_timing_figure(jobs)
        assert len(fig.data) == 0
        assert [a.text for a in fig.layout.annotations] == ["no finished output yet"]
        assert fig.layout.xaxis.visible is False


def test_jobs_timing_figure_keeps_jobs_apart_when_short_ids_clash() -> None:
    twins = [job_doc("abcdefgh-1", "done", {"queue": 1.0}),
             job_doc("abcdefgh-2", "done", {"queue": 2.0})]
    fig = views.jobs_timing_figure(twins)
    assert list(fig.data[0].y) == ["abcdefgh-1 · done", "abcdefgh-2 · done"]


def test_storage_summary_from_the_gateway_totals(busy_snapshot: Snapshot) -> None:
    assert views.storage_summary(dataclasses.replace(busy_snapshot, gateway=None)) is None
    doc = {"totals": {"bytes": 12_345_678, "jobs_expired": 5, "jobs_evicted": 2,
                      "cache_hits": 3, "cache_misses": 3}}
    line = views.storage_summary(dataclasses.replace(busy_snapshot, gateway=doc))
    assert line == ("Data dir 12.3 MB · 5 job(s) expired · 2 evicted · "
                    "result cache 50% (3 of 6)")
