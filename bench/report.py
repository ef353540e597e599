"""The bench report: a JSON document, a rich table and the goals of issue 7.

The JSON is the source of truth; the table and the charts are drawn from it, so a
saved report can be re-drawn later. Ratios: ``speedup_vs_naive`` is a mode's median
images/s over naive-sequential's, ``efficiency_vs_limit`` over the limit's.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import socket
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

# (what, target ratio, higher is better)
# The pipeline's share of the limit wanted per workload (the small one is reported only).
LIMIT_SHARE = {"chain": 0.85, "resize": 0.8}
GOALS = (
    ("pipeline >= {share} x limit", None, True),
    ("pipeline >= 25 x naive-sequential", 25.0, True),
    ("one image e2e p50 <= 1.2 x bare compute", 1.2, False),
)


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"host": socket.gethostname(), "cpus": os.cpu_count(), "cpu_model": model,
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform(),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]}


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def add_ratios(modes: list[dict[str, Any]]) -> None:
    """Fill the ratios in place (None when unknown).

    ``cpu_efficiency_vs_limit`` is the limit's CPU time per image over the mode's: the
    share of the mode's CPU that is the chain's own work. On a machine shared with
    other load, throughput ratios of modes run minutes apart drift with that load;
    this one does not, and it is what throughput ÷ limit tends to when CPU is the
    bottleneck.
    """
    def rate(name: str) -> float | None:
        for m in modes:
            if m["mode"] == name and m.get("images_per_s"):
                return float(m["images_per_s"]["median"]) or None
        return None

    naive, limit = rate("naive-sequential"), rate("limit")
    limit_cpu = next((m.get("cpu_ms_per_image") for m in modes if m["mode"] == "limit"), None)
    for m in modes:
        r = m["images_per_s"]["median"] if m.get("images_per_s") else None
        m["speedup_vs_naive"] = round(r / naive, 2) if r and naive else None
        m["efficiency_vs_limit"] = round(r / limit, 3) if r and limit else None
        cpu = m.get("cpu_ms_per_image")
        m["cpu_efficiency_vs_limit"] = round(limit_cpu / cpu, 3) if cpu and limit_cpu else None


def check_outputs(modes: list[dict[str, Any]]) -> list[str]:
    """Notes for modes whose outputs are undecodable or not the size sequential made."""
    ref = next((m["output_sizes"] for m in modes if m["mode"] == "sequential"
                and "output_sizes" in m), None)
    notes = []
    for m in modes:
        if m.get("undecodable"):
            notes.append(f"{m['mode']}: {m['undecodable']} output(s) did not decode")
        if ref is not None and "output_sizes" in m and m["output_sizes"] != ref:
            notes.append(f"{m['mode']}: output sizes {m['output_sizes']} differ from "
                         f"sequential's {ref}")
    return notes


def goals(modes: list[dict[str, Any]], probe: dict[str, Any] | None,
          workload: str = "chain") -> list[dict[str, Any]]:
    pipes = [m for m in modes if m["kind"] == "pipeline" and m.get("images_per_s")]
    eff = max((m["efficiency_vs_limit"] for m in pipes if m["efficiency_vs_limit"]),
              default=None)
    speed = max((m["speedup_vs_naive"] for m in pipes if m["speedup_vs_naive"]), default=None)
    ratio = probe.get("ratio_p50") if probe else None
    out: list[dict[str, Any]] = []
    for (what, target, higher), value in zip(GOALS, (eff, speed, ratio), strict=True):
        if target is None:
            if workload not in LIMIT_SHARE:
                continue
            target = LIMIT_SHARE[workload]
            what = what.format(share=target)
        met = None if value is None else (value >= target if higher else value <= target)
        out.append({"goal": what, "target": target, "value": value, "met": met})
    if out and str(out[0]["goal"]).endswith("x limit"):
        out[0]["cpu_estimate"] = max((m["cpu_efficiency_vs_limit"] for m in pipes
                                  if m.get("cpu_efficiency_vs_limit")), default=None)
    return out


def write_json(report: dict[str, Any], path: Path) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def _num(v: Any, fmt: str = "{:.1f}") -> str:
    return "–" if v is None else fmt.format(v)


def table(report: dict[str, Any]) -> Table:
    cfg = report["config"]
    rounds = cfg.get("rounds", 1)
    each = f" × {rounds} rounds" if rounds > 1 else ""
    t = Table(title=f"imgpipe bench: {cfg['images']} image(s){each} {cfg['size']}, median "
                    f"of {cfg['repeat']} pass(es)", caption=f"ops {cfg['ops']}")
    for col in ("mode", "procs", "img/s (min–max)", "p50 ms", "p95 ms", "CPU ms/img",
                "cores", "peak RSS MB", "× naive", "÷ limit", "CPU eff"):
        t.add_column(col, justify="left" if col == "mode" else "right")
    for m in report["modes"]:
        if m.get("error"):
            t.add_row(m["mode"], _num(m.get("workers"), "{}"), f"[red]{m['error'][:60]}[/]",
                      *["" for _ in range(8)])
            continue
        r = m["images_per_s"]
        t.add_row(m["mode"], _num(m.get("workers"), "{}"),
                  f"{r['median']:.2f} ({r['min']:.2f}–{r['max']:.2f})",
                  _num(m["latency_ms"]["p50"]), _num(m["latency_ms"]["p95"]),
                  _num(m["cpu_ms_per_image"]), _num(m["cores_used"], "{:.2f}"),
                  _num(m["peak_rss_mb"], "{:.0f}"), _num(m["speedup_vs_naive"], "{:.1f}×"),
                  _num(m["efficiency_vs_limit"], "{:.2f}"),
                  _num(m.get("cpu_efficiency_vs_limit"), "{:.2f}"))
    return t


def print_report(report: dict[str, Any], console: Console) -> None:
    console.print(table(report))
    probe = report.get("latency_probe")
    if probe:
        console.print(f"latency probe ({probe['mode']}, {probe['count']}× one "
                      f"{probe['image']['width']}×{probe['image']['height']} image): e2e p50 "
                      f"{probe['e2e_ms']['p50']:.0f} ms, p95 {probe['e2e_ms']['p95']:.0f} ms; "
                      f"bare compute p50 {probe['compute_ms']['p50']:.0f} ms, p95 "
                      f"{probe['compute_ms']['p95']:.0f} ms; ratio {probe['ratio_p50']}")
        if split := probe.get("e2e_split_ms"):
            console.print("  where e2e went (ms, medians): " + ", ".join(
                f"{k.replace('_', ' ')} {v:.1f}" for k, v in split.items()))
    for m in report["modes"]:
        if parts := m.get("cpu_ms_per_image_by_component"):
            console.print(f"CPU ms per image, {m['mode']}: " + ", ".join(
                f"{k} {v:.1f}" for k, v in parts.items()))
    stages = report.get("stages_ms")
    if stages:
        console.print("sequential stages (ms, median): " + ", ".join(
            f"{k} {v:.1f}" for k, v in stages.items()))
    for g in report["goals"]:
        mark = {True: "[green]met[/]", False: "[red]missed[/]", None: "[yellow]not measured[/]"}
        extra = (f" (from CPU time per image: {g['cpu_estimate']:.2f})"
                 if g.get("cpu_estimate") else "")
        console.print(f"goal {g['goal']}: {_num(g['value'], '{:.2f}')} → {mark[g['met']]}"
                      + extra)
    for note in report.get("notes", []):
        console.print(f"[yellow]note:[/] {note}")
