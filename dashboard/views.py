"""Snapshot -> tables and figures: pure functions, no Streamlit, no sockets.

Everything the page draws is computed here from a :class:`~dashboard.collector.Snapshot`
so tests check it directly. Times on the x axes are local clock times.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from core.protocol import STAGES
from dashboard.collector import Snapshot

TREND_WINDOW_S = 5.0
COLORS = {"p50": "#2a9d8f", "p95": "#e9c46a", "p99": "#e76f51", "throughput": "#264653",
          "busy": "#e76f51", "queue": "#457b9d", "inflight": "#f4a261"}
STAGE_COLORS = {"queue": "#adb5bd", "decode": "#457b9d", "filters": "#e76f51",
                "encode": "#2a9d8f"}
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
    """The last ``window_s`` of the sampled series, with a ``time`` column (local)."""
    cols = ["ts", "alive", "busy", "throughput", "p50", "p95", "p99", "queue_depth",
            "inflight"]
    df = pd.DataFrame([p for p in snap.series if snap.now - p["ts"] <= window_s],
                      columns=cols)
    df["time"] = [datetime.fromtimestamp(t) for t in df["ts"]]
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


def _layout(fig: go.Figure, title: str, ytitle: str, height: int = 260) -> go.Figure:
    fig.update_layout(title={"text": title, "font": {"size": 15}, "x": 0.01},
                      height=height,
                      margin={"l": 50, "r": 20, "t": 40, "b": 30},
                      legend={"orientation": "h", "y": 1.02, "yanchor": "bottom",
                              "x": 1, "xanchor": "right"},
                      yaxis_title=ytitle, hovermode="x unified", uirevision="keep")
    return fig


def _empty(fig: go.Figure, text: str) -> go.Figure:
    fig.add_annotation(text=text, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5,
                       font={"color": "#888", "size": 13})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def throughput_figure(df: pd.DataFrame) -> go.Figure:
    """Outputs per second, with busy workers on a second axis."""
    fig = go.Figure()
    if df.empty:
        return _layout(_empty(fig, "waiting for the first sample"), "Throughput", "")
    fig.add_scatter(x=df["time"], y=df["throughput"], name="outputs/s", mode="lines",
                    fill="tozeroy", line={"color": COLORS["throughput"], "width": 2})
    fig.add_scatter(x=df["time"], y=df["busy"], name="busy workers", yaxis="y2",
                    mode="lines", line={"color": COLORS["busy"], "shape": "hv", "dash": "dot"})
    fig.add_scatter(x=df["time"], y=df["alive"], name="alive workers", yaxis="y2",
                    mode="lines", line={"color": "#adb5bd", "shape": "hv"})
    top = max(1.0, float(df["alive"].max() or 0)) + 0.5
    fig.update_layout(yaxis={"rangemode": "tozero"},
                      yaxis2={"overlaying": "y", "side": "right", "range": [0, top],
                              "title": "workers", "showgrid": False, "dtick": 1})
    return _layout(fig, "Throughput and busy workers", "outputs/s")


def latency_figure(df: pd.DataFrame) -> go.Figure:
    """End-to-end latency percentiles over time (from the sink's metrics)."""
    fig = go.Figure()
    have = [k for k in ("p50", "p95", "p99") if k in df and df[k].notna().any()]
    if not have:
        return _layout(_empty(fig, "no output finished in the gateway's latency window"),
                       "Latency percentiles (upload to result)", "ms")
    for key in have:
        fig.add_scatter(x=df["time"], y=df[key], name=key, mode="lines",
                        line={"color": COLORS[key], "width": 2}, connectgaps=False)
    fig.update_layout(yaxis={"rangemode": "tozero"})
    return _layout(fig, "Latency percentiles (upload to result)", "ms")


def queue_figure(df: pd.DataFrame) -> go.Figure:
    """Outputs waiting for a worker and outputs being worked on."""
    fig = go.Figure()
    if df.empty:
        return _layout(_empty(fig, "waiting for the first sample"), "Queue", "")
    if df["queue_depth"].notna().any():
        fig.add_scatter(x=df["time"], y=df["queue_depth"], name="queued", mode="lines",
                        fill="tozeroy", line={"color": COLORS["queue"], "width": 2})
    fig.add_scatter(x=df["time"], y=df["inflight"], name="in flight", mode="lines",
                    line={"color": COLORS["inflight"], "width": 2, "shape": "hv"})
    fig.update_layout(yaxis={"rangemode": "tozero"})
    return _layout(fig, "Queue depth and in flight", "outputs")


def stage_figure(snap: Snapshot) -> go.Figure:
    """Where the time goes: mean ms per stage, one stacked bar per reporting source."""
    fig = go.Figure()
    stages = [s for s in STAGES if s != "total"]
    sources = sorted(src for src, ms in snap.stages.items()
                     if any(float(ms.get(s) or 0.0) > 0 for s in stages))
    if not sources:
        return _layout(_empty(fig, "no output finished yet"), "Mean time per stage", "")
    for stage in stages:
        fig.add_bar(y=sources, x=[float(snap.stages[s].get(stage) or 0.0) for s in sources],
                    name=stage, orientation="h", marker_color=STAGE_COLORS[stage])
    height = max(200, 60 + 34 * len(sources))
    fig.update_layout(barmode="stack", hovermode="y unified")
    fig = _layout(fig, "Mean time per stage", "", height=height)
    fig.update_layout(xaxis_title="ms per output", hovermode="y unified")
    return fig
