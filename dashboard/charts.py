"""Series frame / snapshot -> Vega-Lite charts whose spec never depends on the numbers.

The live page redraws every second. ``st.plotly_chart`` hashes the whole figure (data
included) into the element's identity, so a chart whose numbers changed is unmounted
and a fresh one mounted each second; until the new one has measured its box and drawn,
the slot is white (a screenshot, or a slow tab, shows blank charts). ``st.vega_lite_chart``
takes the data apart from the spec: with the spec unchanged, the browser keeps the same
view and swaps its dataset in place, so a drawn chart stays drawn.

Hence each chart here is a constant spec (domains, colours, titles fixed; nothing
computed from the values) and a long-form frame. Only the switch between "no data yet"
and data changes the spec. Times are epoch milliseconds: the browser shows its own
local clock. Charts render to SVG (crisp, and testable: ``g.mark-line path``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from imgpipe.core.protocol import WORK_STAGES
from imgpipe.dashboard.collector import Snapshot

HEIGHT = 280   # px: the whole chart (title, legend, axes and plot)
STAGE_COLORS = {"queue": "#adb5bd", "decode": "#457b9d", "filters": "#e76f51",
                "encode": "#2a9d8f"}
THROUGHPUT = {"throughput": ("outputs/s", "#264653"), "busy": ("busy workers", "#e76f51"),
              "alive": ("alive workers", "#adb5bd")}
LATENCY = {"p50": ("p50", "#2a9d8f"), "p95": ("p95", "#e9c46a"), "p99": ("p99", "#e76f51")}
QUEUE = {"queue_depth": ("queued", "#457b9d"), "inflight": ("in flight", "#f4a261")}
COUNT_AXIS = {"format": "d", "tickMinStep": 1}
TIME_X = {"field": "ms", "type": "temporal", "title": None,
          "axis": {"format": "%H:%M:%S", "labelOverlap": True, "tickCount": 5}}


@dataclass(frozen=True)
class Chart:
    """What ``st.vega_lite_chart(chart.data, chart.spec)`` draws."""

    spec: dict[str, Any]
    data: pd.DataFrame
    message: str = ""   # why there is nothing to draw yet ("" when there is)


def _base(title: str, height: Any = HEIGHT) -> dict[str, Any]:
    return {"title": {"text": title, "anchor": "start", "fontSize": 15},
            "height": height, "padding": {"left": 4, "right": 4, "top": 4, "bottom": 4},
            "usermeta": {"embedOptions": {"renderer": "svg", "actions": False}}}


def _message(title: str, text: str) -> Chart:
    """A placeholder saying why there is nothing to draw yet."""
    spec = {**_base(title), "mark": {"type": "text", "color": "#888", "fontSize": 13},
            "encoding": {"text": {"field": "text", "type": "nominal"}}}
    return Chart(spec, pd.DataFrame({"text": [text]}), message=text)


def _long(df: pd.DataFrame, names: dict[str, tuple[str, str]]) -> pd.DataFrame:
    """Wide series -> rows of (ms, series, value); missing values are left out."""
    cols = [c for c in names if c in df]
    out = df[["ms", *cols]].melt(id_vars="ms", var_name="series", value_name="value")
    out["series"] = out["series"].map({c: names[c][0] for c in cols})
    out["value"] = pd.to_numeric(out["value"], errors="coerce")
    return out.dropna(subset=["value"]).reset_index(drop=True)


def _color(names: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """A fixed colour per series, so a series that appears later keeps its colour."""
    return {"field": "series", "type": "nominal",
            "scale": {"domain": [n for n, _ in names.values()],
                      "range": [c for _, c in names.values()]},
            "legend": {"orient": "top", "title": None, "symbolOpacity": 1, "offset": 4}}


def _hover(names: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """A rule under the pointer with every series' value at that time (one tooltip)."""
    fields = [n for n, _ in names.values()]
    return {"transform": [{"pivot": "series", "value": "value", "groupby": ["ms"]}],
            "mark": {"type": "rule", "color": "#888"},
            "params": [{"name": "hover", "select": {"type": "point", "fields": ["ms"],
                                                    "nearest": True, "on": "pointerover",
                                                    "clear": "pointerout"}}],
            "encoding": {"x": TIME_X,
                         "opacity": {"condition": {"param": "hover", "empty": False,
                                                   "value": 0.4}, "value": 0},
                         "tooltip": [{"field": "ms", "type": "temporal", "title": "time",
                                      "format": "%H:%M:%S"},
                                     *({"field": f, "type": "quantitative", "format": ".4~f"}
                                       for f in fields)]}}


def _y(title: str, axis: dict[str, Any] | None = None, *, least: float = 1.0) -> dict[str, Any]:
    """A value axis from 0 that spans at least ``least`` (all-zero data stays readable)."""
    return {"field": "value", "type": "quantitative", "title": title,
            "scale": {"zero": True, "domain": {"unionWith": [0, least]}}, "axis": axis or {}}


def _step(series: str, dash: list[int] | None = None) -> dict[str, Any]:
    """One series as a step line (a count holds its value until the next sample)."""
    return {"transform": [{"filter": {"field": "series", "equal": series}}],
            "mark": {"type": "line", "interpolate": "step-after", "strokeWidth": 2,
                     **({"strokeDash": dash} if dash else {})}}


def throughput_chart(df: pd.DataFrame) -> Chart:
    """Outputs per second (left axis) with busy and alive workers (right axis)."""
    title = "Throughput and busy workers"
    if df.empty:
        return _message(title, "waiting for the first sample")
    color = _color(THROUGHPUT)
    spec = {**_base(title), "layer": [
        {"transform": [{"filter": {"field": "series", "equal": THROUGHPUT["throughput"][0]}}],
         "mark": {"type": "area", "line": True, "opacity": 0.35},
         "encoding": {"x": TIME_X, "y": _y("outputs/s", least=0.1), "color": color}},
        {"encoding": {"x": TIME_X, "color": color,
                      "y": _y("workers", {**COUNT_AXIS, "orient": "right", "grid": False})},
         "layer": [_step(THROUGHPUT["busy"][0], [4, 3]), _step(THROUGHPUT["alive"][0])]},
        _hover(THROUGHPUT)], "resolve": {"scale": {"y": "independent"}}}
    return Chart(spec, _long(df, THROUGHPUT))


def latency_chart(df: pd.DataFrame) -> Chart:
    """End-to-end latency percentiles over time (from the gateway's metrics)."""
    title = "Latency percentiles (upload to result)"
    data = _long(df, LATENCY)
    if data.empty:
        return _message(title, "no output finished in the gateway's latency window")
    spec = {**_base(title), "layer": [
        {"mark": {"type": "line", "strokeWidth": 2},
         "encoding": {"x": TIME_X, "y": _y("ms"), "color": _color(LATENCY)}},
        _hover(LATENCY)]}
    return Chart(spec, data)


def queue_chart(df: pd.DataFrame) -> Chart:
    """Outputs waiting for a worker and outputs being worked on."""
    title = "Queue depth and in flight"
    if df.empty:
        return _message(title, "waiting for the first sample")
    color = _color(QUEUE)
    spec = {**_base(title), "layer": [
        {"transform": [{"filter": {"field": "series", "equal": QUEUE["queue_depth"][0]}}],
         "mark": {"type": "area", "line": True, "opacity": 0.35},
         "encoding": {"x": TIME_X, "y": _y("outputs", COUNT_AXIS), "color": color}},
        {**_step(QUEUE["inflight"][0]),
         "encoding": {"x": TIME_X, "y": _y("outputs", COUNT_AXIS), "color": color}},
        _hover(QUEUE)]}
    return Chart(spec, _long(df, QUEUE))


def stage_chart(snap: Snapshot) -> Chart:
    """Where the time goes: mean ms per stage, one stacked bar per reporting source."""
    title = "Mean time per stage"
    stages = list(WORK_STAGES)
    rows = [{"source": src, "stage": stage, "order": i, "ms": float(ms.get(stage) or 0.0)}
            for src, ms in sorted(snap.stages.items()) for i, stage in enumerate(stages)]
    data = pd.DataFrame(rows, columns=["source", "stage", "order", "ms"])
    if not (data["ms"] > 0).any():
        return _message(title, "no output finished yet")
    data = data[data.groupby("source")["ms"].transform("sum") > 0].reset_index(drop=True)
    spec = {**_base(title, {"step": 30}), "mark": {"type": "bar"},
            "encoding": {
                "y": {"field": "source", "type": "nominal", "title": None, "sort": None,
                      "axis": {"labelLimit": 220}},
                "x": {"field": "ms", "type": "quantitative", "stack": "zero",
                      "title": "ms per output"},
                "color": {"field": "stage", "type": "nominal",
                          "scale": {"domain": stages,
                                    "range": [STAGE_COLORS[s] for s in stages]},
                          "legend": {"orient": "top", "title": None, "symbolOpacity": 1, "offset": 4}},
                "order": {"field": "order", "type": "ordinal"},
                "tooltip": [{"field": "source", "type": "nominal"},
                            {"field": "stage", "type": "nominal"},
                            {"field": "ms", "type": "quantitative", "format": ".1f"}]}}
    return Chart(spec, data)
