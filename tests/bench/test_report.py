"""The report: ratios, goals, output checks, the table and both charts from a report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image
from rich.console import Console

from imgpipe.bench import bench, chart, report


def mode(name: str, kind: str, rate: float, workers: int | None = None) -> dict[str, Any]:
    return {"mode": name, "kind": kind, "workers": workers,
            "images_per_s": {"median": rate, "min": rate * 0.9, "max": rate * 1.1},
            "latency_ms": {"p50": 10.0, "p95": 12.0}, "cpu_ms_per_image": 30.0,
            "cores_used": 1.0, "peak_rss_mb": 100.0, "output_sizes": [(1920, 1080)],
            "undecodable": 0}


def sample(probe_ratio: float | None = 1.2) -> dict[str, Any]:
    modes = [mode("naive-sequential", "baseline", 2.0), mode("sequential", "local", 30.0),
             mode("limit", "bound", 60.0, 2), mode("pipeline-w1", "pipeline", 28.0, 1),
             mode("pipeline-w2", "pipeline", 54.0, 2),
             {"mode": "pipeline-w3", "kind": "pipeline", "workers": 3, "error": "boom"}]
    report.add_ratios(modes)
    probe = None if probe_ratio is None else {
        "mode": "pipeline-w2", "count": 5, "image": {"width": 3840, "height": 2160, "bytes": 1},
        "e2e_ms": {"p50": 60.0, "p95": 70.0}, "compute_ms": {"p50": 50.0, "p95": 55.0},
        "ratio_p50": probe_ratio,
        "e2e_split_ms": {"gateway": 5.0, "dispatch": 1.0, "to_worker": 1.0, "worker": 50.0,
                         "store": 3.0}}
    return {"version": 1, "created": report.now_iso(), "machine": report.machine(),
            "config": {"images": 10, "size": "3840x2160", "ops": "resize:w=1920", "repeat": 3},
            "modes": modes, "latency_probe": probe, "stages_ms": {"decode": 10.0},
            "goals": report.goals(modes, probe), "notes": ["busy"]}


def test_ratios_are_against_naive_and_limit() -> None:
    modes = sample()["modes"]
    by = {m["mode"]: m for m in modes}
    assert by["pipeline-w2"]["speedup_vs_naive"] == 27.0
    assert by["pipeline-w2"]["efficiency_vs_limit"] == 0.9
    assert by["naive-sequential"]["speedup_vs_naive"] == 1.0
    assert by["limit"]["cpu_efficiency_vs_limit"] == 1.0
    assert by["pipeline-w1"]["cpu_efficiency_vs_limit"] == 1.0  # same CPU per image here
    assert "speedup_vs_naive" in by["pipeline-w3"] and by["pipeline-w3"]["speedup_vs_naive"] is None


def test_goals_take_the_best_pipeline() -> None:
    goals = sample()["goals"]
    assert [g["met"] for g in goals] == [True, True, True]
    assert goals[0]["value"] == 0.9
    assert goals[0]["cpu_estimate"] == 1.0
    goals = sample(probe_ratio=1.5)["goals"]
    assert goals[2]["met"] is False


def test_goals_unmeasured_without_a_pipeline() -> None:
    modes = [mode("naive-sequential", "baseline", 2.0), mode("limit", "bound", 60.0, 2)]
    report.add_ratios(modes)
    assert [g["met"] for g in report.goals(modes, None)] == [None, None, None]


def test_check_outputs_flags_sizes_that_differ_from_sequential() -> None:
    modes = sample()["modes"]
    modes[4]["output_sizes"] = [(1919, 1080)]
    modes[3]["undecodable"] = 2
    notes = report.check_outputs(modes)
    assert any("pipeline-w2" in n and "differ" in n for n in notes)
    assert any("pipeline-w1" in n and "did not decode" in n for n in notes)


def test_table_prints_every_mode_and_the_goals() -> None:
    console = Console(record=True, width=200)
    report.print_report(sample(), console)
    text = console.export_text()
    for name in ("naive-sequential", "limit", "pipeline-w2", "pipeline-w3", "boom",
                 "latency probe", "goal pipeline >= 0.85 x limit"):
        assert name in text
    assert "where e2e went (ms, medians): gateway 5.0, dispatch 1.0, to worker 1.0" in text


def test_e2e_split_takes_each_part_from_the_jobs_timings() -> None:
    def doc(job: str, queue: float, total: float, dispatch: float | None, store: float
            ) -> dict[str, Any]:
        return {"id": job, "outputs": [{"timings_ms": {
            "queue": queue, "total": total, "dispatch": dispatch, "store": store}}]}

    timed = [(40.0, "/api/jobs/a"), (60.0, "/api/jobs/b"), (50.0, "/api/jobs/c"),
             (70.0, None), (80.0, "/api/jobs/gone")]
    docs = [doc("a", 4.0, 20.0, 1.0, 2.0), doc("b", 6.0, 30.0, 3.0, 4.0),
            doc("c", 5.0, 25.0, None, 3.0)]  # c: from the cache, no dispatch
    split = bench.e2e_split(timed, docs)
    assert split == {"gateway": 17.0, "dispatch": 2.0, "to_worker": 3.0, "worker": 25.0,
                     "store": 3.0}
    assert bench.e2e_split(timed, []) is None


def test_charts_are_written(tmp_path: Path) -> None:
    doc = sample()
    chart.write_html(doc, tmp_path / "c.html")
    chart.write_png(doc, tmp_path / "c.png")
    html = (tmp_path / "c.html").read_text()
    assert "Throughput by mode" in html and "pipeline-w2" in html
    with Image.open(tmp_path / "c.png") as img:
        assert img.size == (1200, 520)
        assert len(img.convert("RGB").getcolors(1 << 16) or []) > 5


def test_json_round_trips(tmp_path: Path) -> None:
    import json

    doc = sample()
    report.write_json(doc, tmp_path / "sub" / "r.json")
    assert json.loads((tmp_path / "sub" / "r.json").read_text())["modes"][0]["mode"] == \
        "naive-sequential"
