"""Snapshot -> tables and numbers: pure functions, no Streamlit, no sockets.

Everything the page shows is computed here (and the charts in :mod:`dashboard.charts`)
from a :class:`~dashboard.collector.Snapshot`, so tests check it directly.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from imgpipe.core.protocol import WORK_STAGES
from imgpipe.dashboard.charts import STAGE_COLORS
from imgpipe.dashboard.collector import Snapshot

TREND_WINDOW_S = 5.0
JOB_TIMINGS_TITLE = "Where the time went, per recent job"
FLEET_COLUMNS = ["id", "host", "pid", "state", "cpu %", "rss MB", "done", "failed",
                 "in flight", "last beat s"]


def fleet_frame(snap: Snapshot) -> pd.DataFrame:
    """One row per known worker: the fleet table."""
    rows = [{"id": w["id"], "host": w["host"], "pid": w["pid"], "state": w["state"],
             "cpu %": round(float(w["cpu"]), 1), "rss MB": round(w["rss"] / 2**20, 1),
             "done": w["done"], "failed": w["failed"], "in flight": len(w["inflight"]),
             "last beat s": round(float(w["age_s"]), 1)} for w in snap.workers]
    return pd.DataFrame(rows, columns=FLEET_COLUMNS)


def series_frame(snap: Snapshot, window_s: float = 300.0) -> pd.DataFrame:
    """The last ``window_s`` of the sampled series, with ``ms`` (epoch milliseconds)."""
    cols = ["ts", "alive", "busy", "throughput", "p50", "p95", "p99", "queue_depth",
            "inflight"]
    df = pd.DataFrame([p for p in snap.series if snap.now - p["ts"] <= window_s],
                      columns=cols)
    df["ms"] = pd.to_numeric(df["ts"], errors="coerce") * 1000.0
    for col in cols[1:]:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    return df


def queue_trend(snap: Snapshot, window_s: float = TREND_WINDOW_S) -> float | None:
    """Growth of the queue in outputs/s over the last ``window_s`` (least squares)."""
    pts = [(p["ts"], p["queue_depth"]) for p in snap.series
           if p.get("queue_depth") is not None and snap.now - p["ts"] <= window_s + 0.5]
    if len(pts) < 2:
        return None
    t0 = pts[0][0]
    xs = [t - t0 for t, _ in pts]
    ys = [float(q) for _, q in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


def live_metrics(snap: Snapshot) -> dict[str, Any]:
    """The newest numbers in the shape of the gateway's ``/api/metrics`` (for advice)."""
    last = snap.series[-1] if snap.series else {}
    states = [w["state"] for w in snap.workers]
    alive = sum(1 for s in states if s != "lost")
    busy = sum(1 for s in states if s == "busy")
    out: dict[str, Any] = {
        "queue_depth": last.get("queue_depth") or 0,
        "in_flight": last.get("inflight") or 0,
        "throughput_per_s": round(float(last.get("throughput") or 0.0), 3),
        "workers": {"alive": alive, "busy": busy, "idle": alive - busy,
                    "lost": states.count("lost")},
        "latency_ms": {k: last.get(k) for k in ("p50", "p95", "p99")},
        "queue_known": last.get("queue_depth") is not None,
    }
    trend = queue_trend(snap)
    if trend is not None:
        out["queue_trend_per_s"] = round(trend, 3)
    return out


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def storage_summary(snap: Snapshot) -> str | None:
    """One line on the data dir from the gateway's totals: bytes held, jobs expired and
    evicted, the result cache's hit ratio; None before the gateway has answered."""
    totals = (snap.gateway or {}).get("totals")
    if not isinstance(totals, dict) or "bytes" not in totals:
        return None
    hits, misses = totals.get("cache_hits", 0), totals.get("cache_misses", 0)
    ratio = f"{hits / (hits + misses):.0%} ({hits} of {hits + misses})" if hits + misses \
        else "no lookups yet"
    return (f"Data dir {_size(totals['bytes'])} · {totals.get('jobs_expired', 0)} "
            f"job(s) expired · {totals.get('jobs_evicted', 0)} evicted · "
            f"result cache {ratio}")


def events_frame(snap: Snapshot, limit: int = 50) -> pd.DataFrame:
    """Newest events first."""
    rows = [{"time": datetime.fromtimestamp(e["ts"]).strftime("%H:%M:%S"),
             "source": e["source"], "event": e["what"], "worker": e["worker"],
             "task": e["task_id"], "detail": e["detail"]}
            for e in reversed(snap.events[-limit:])]
    return pd.DataFrame(rows, columns=["time", "source", "event", "worker", "task", "detail"])


def gaps_frame(snap: Snapshot) -> pd.DataFrame:
    """Per publisher and kind: messages received, missed (by seq) and restarts."""
    return pd.DataFrame(snap.gaps, columns=["source", "kind", "received", "missed",
                                            "restarts", "last_seq"])


def _job_timings(job: dict[str, Any]) -> tuple[int, dict[str, float]] | None:
    """(done outputs, mean ms per stage rounded to 0.1) or None when nothing finished.

    A stage no output reported (an output served without decode, say) counts as 0 ms.
    """
    outs = [o for o in job.get("outputs") or []
            if isinstance(o, dict) and o.get("state") == "done"
            and isinstance(o.get("timings_ms"), dict)]
    if not outs:
        return None
    means = {}
    for stage in WORK_STAGES:
        vals = [float(o["timings_ms"][stage]) for o in outs
                if isinstance(o["timings_ms"].get(stage), int | float)]
        means[stage] = round(sum(vals) / len(vals), 1) if vals else 0.0
    return len(outs), means


def jobs_timing_figure(jobs: list[dict[str, Any]]) -> go.Figure:
    """One horizontal stacked bar per job (newest on top): mean ms per output per stage.

    Built only from finished outputs and rounded to 0.1 ms, so the same jobs give the
    same figure JSON: Streamlit keys a Plotly element by its whole figure, and an
    unchanged figure is neither remounted nor redrawn. Colours match the stage chart.
    """
    rows = [(job, t) for job in jobs if (t := _job_timings(job)) is not None]
    layout: dict[str, Any] = {
        "title": {"text": JOB_TIMINGS_TITLE, "x": 0, "xanchor": "left"},
        "margin": {"l": 10, "r": 10, "t": 70, "b": 40},
        "height": 150 + 34 * max(len(rows), 1)}
    if not rows:
        return go.Figure(layout={**layout, "xaxis": {"visible": False},
                                 "yaxis": {"visible": False},
                                 "annotations": [{"text": "no finished output yet",
                                                  "showarrow": False, "x": 0.5, "y": 0.5,
                                                  "xref": "paper", "yref": "paper",
                                                  "font": {"color": "#888"}}]})
    labels = [f"{str(job.get('id', '?'))[:8]} · {job.get('state', '?')}" for job, _ in rows]
    if len(set(labels)) < len(labels):   # bars on one category would stack: use full ids
        labels = [f"{job.get('id', '?')} · {job.get('state', '?')}" for job, _ in rows]
    extra = [[n, round(sum(m.values()), 1)] for _, (n, m) in rows]
    fig = go.Figure(layout={
        **layout, "barmode": "stack",
        "xaxis": {"title": {"text": "mean ms per output"}, "rangemode": "tozero"},
        "yaxis": {"type": "category", "autorange": "reversed", "automargin": True},
        "legend": {"orientation": "h", "x": 0, "y": 1.02, "yanchor": "bottom",
                   "traceorder": "normal"},
        "bargap": 0.35, "hovermode": "closest"})
    for stage in WORK_STAGES:
        fig.add_trace(go.Bar(
            name=stage, orientation="h", y=labels, x=[m[stage] for _, (_, m) in rows],
            marker={"color": STAGE_COLORS[stage]}, customdata=extra,
            hovertemplate=(f"%{{y}}<br>{stage}: %{{x:.1f}} ms per output<br>"
                           "outputs: %{customdata[0]}<br>total: %{customdata[1]:.1f} ms "
                           "per output<extra></extra>")))
    return fig
