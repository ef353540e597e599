"""Charts of a bench report: Plotly HTML, and a PNG drawn with Pillow.

Two panels: throughput by mode (median with min–max bars) and the worker scaling
curve of the pipeline against the limit. The PNG needs no browser: kaleido would
download or need a Chrome, so the same two panels are drawn directly with Pillow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

COLOURS = {"baseline": "#9e9e9e", "local": "#1f77b4", "bound": "#2ca02c",
           "pipeline": "#ff7f0e"}


def _measured(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in report["modes"] if m.get("images_per_s")]


def _scaling(report: dict[str, Any]) -> list[tuple[int, float]]:
    pts = [(int(m["workers"]), float(m["images_per_s"]["median"])) for m in _measured(report)
           if m["kind"] == "pipeline" and m.get("workers")]
    return sorted(pts)


def _rate(report: dict[str, Any], name: str) -> float | None:
    for m in _measured(report):
        if m["mode"] == name:
            return float(m["images_per_s"]["median"])
    return None


def write_html(report: dict[str, Any], path: Path) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    modes = _measured(report)
    fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4],
                        subplot_titles=("Throughput by mode (images/s)",
                                        "Pipeline scaling with workers"))
    fig.add_trace(go.Bar(
        x=[m["mode"] for m in modes], y=[m["images_per_s"]["median"] for m in modes],
        marker_color=[COLOURS.get(m["kind"], "#1f77b4") for m in modes],
        error_y={"type": "data", "symmetric": False,
                 "array": [m["images_per_s"]["max"] - m["images_per_s"]["median"] for m in modes],
                 "arrayminus": [m["images_per_s"]["median"] - m["images_per_s"]["min"]
                                for m in modes]},
        text=[f"{m['images_per_s']['median']:.1f}" for m in modes], textposition="outside",
        name="images/s", showlegend=False), row=1, col=1)
    pts = _scaling(report)
    if pts:
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts],
                                 mode="lines+markers", name="pipeline"), row=1, col=2)
        for name, dash in (("limit", "dash"), ("processes", "dot")):
            rate = _rate(report, name)
            if rate:
                fig.add_trace(go.Scatter(x=[pts[0][0], pts[-1][0]], y=[rate, rate],
                                         mode="lines", name=name, line={"dash": dash}),
                              row=1, col=2)
    fig.update_xaxes(title_text="workers", row=1, col=2)
    cfg, mach = report["config"], report["machine"]
    fig.update_layout(title=f"imgpipe bench — {cfg['images']}× {cfg['size']}, {cfg['ops']} — "
                            f"{mach['cpus']} CPU {mach['cpu_model']}",
                      height=520, width=1200, template="plotly_white")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)


# --- PNG with Pillow ------------------------------------------------------------------


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()


def nice_top(value: float) -> float:
    """The smallest 4 × (a round step × 10^k) at or above ``value``: round gridlines."""
    import math

    raw = max(value, 1e-9) / 4
    base = 10 ** math.floor(math.log10(raw))
    step = next(m * base for m in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10) if m * base >= raw)
    return 4 * step


def _axis(d: ImageDraw.ImageDraw, box: tuple[int, int, int, int], top: float,
          font: Any) -> None:
    x0, y0, x1, y1 = box
    d.line([(x0, y0), (x0, y1), (x1, y1)], fill="#333333", width=1)
    for i in range(5):
        v = top * i / 4
        y = y1 - (y1 - y0) * i / 4
        d.line([(x0 - 4, y), (x1, y)], fill="#e0e0e0" if i else "#333333")
        d.text((x0 - 8, y), f"{v:g}", fill="#333333",
               font=font, anchor="rm")


def write_png(report: dict[str, Any], path: Path) -> None:
    """The two panels of the HTML chart as a 1200×520 PNG."""
    img = Image.new("RGB", (1200, 520), "white")
    d = ImageDraw.Draw(img)
    f_title, f_small = _font(18), _font(12)
    cfg = report["config"]
    # ASCII only: Pillow's built-in font has no dashes or multiplication signs.
    d.text((20, 12), f"imgpipe bench - {cfg['images']} images {cfg['size']} - images/s, "
                     f"median of {cfg['repeat']} (bars: min-max)", fill="black", font=f_title)
    modes = _measured(report)
    top = nice_top(max([m["images_per_s"]["max"] for m in modes] + [1.0]) * 1.08)
    box = (60, 60, 700, 430)
    d.text((box[0], 40), "Throughput by mode", fill="#333333", font=f_small)
    _axis(d, box, top, f_small)
    if modes:
        slot = (box[2] - box[0]) / len(modes)
        scale = (box[3] - box[1]) / top
        for i, m in enumerate(modes):
            r = m["images_per_s"]
            cx = box[0] + slot * (i + 0.5)
            y = box[3] - r["median"] * scale
            d.rectangle([cx - slot * 0.35, y, cx + slot * 0.35, box[3]],
                        fill=COLOURS.get(m["kind"], "#1f77b4"))
            d.line([(cx, box[3] - r["min"] * scale), (cx, box[3] - r["max"] * scale)],
                   fill="black", width=2)
            d.text((cx, box[3] - r["max"] * scale - 6), f"{r['median']:.1f}", fill="black",
                   font=f_small, anchor="md")
            # Labels alternate between two rows so long names never overlap.
            d.text((cx, box[3] + 8 + 16 * (i % 2)), m["mode"], fill="black", font=f_small,
                   anchor="mt")
    pts = _scaling(report)
    box2 = (790, 60, 1170, 430)
    d.text((box2[0], 40), "Pipeline scaling with workers", fill="#333333", font=f_small)
    limit = _rate(report, "limit")
    top2 = nice_top(max([p[1] for p in pts] + [limit or 0.0, 1.0]) * 1.08)
    _axis(d, box2, top2, f_small)
    if pts:
        lo, hi = float(pts[0][0]), float(max(pts[-1][0], pts[0][0] + 1))

        def xy(w: float, v: float) -> tuple[float, float]:
            x = box2[0] + 20 + (box2[2] - box2[0] - 40) * (w - lo) / (hi - lo)
            return x, box2[3] - v * (box2[3] - box2[1]) / top2

        if limit:
            y = xy(lo, limit)[1]
            for dash in range(box2[0], box2[2], 12):
                d.line([(dash, y), (dash + 6, y)], fill=COLOURS["bound"], width=2)
            d.text((box2[0] + 4, y - 4), "limit", fill=COLOURS["bound"], font=f_small,
                   anchor="ld")
        if len(pts) > 1:
            d.line([xy(w, v) for w, v in pts], fill=COLOURS["pipeline"], width=3)
        for w, v in pts:
            x, y = xy(w, v)
            d.ellipse([x - 5, y - 5, x + 5, y + 5], fill=COLOURS["pipeline"])
            d.text((x, y - 8), f"{v:.1f}", fill="black", font=f_small, anchor="md")
            d.text((x, box2[3] + 8), f"{w}", fill="black", font=f_small, anchor="mt")
        d.text(((box2[0] + box2[2]) / 2, box2[3] + 26), "workers", fill="#333333",
               font=f_small, anchor="mt")
    else:
        d.text((box2[0] + 20, 200), "no pipeline run", fill="#999999", font=f_small)
    mach = report["machine"]
    d.text((20, 495), f"{mach['cpus']} CPU {mach['cpu_model']} | {mach['platform']} | "
                      f"{report['created']} | load at start "
                      f"{mach.get('load_avg_at_start', ['?'])[0]}", fill="#666666", font=f_small)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
