"""``imgpipe bench`` on a tiny run: its structure, never its timings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from imgpipe.bench.bench import LOCAL_MODES, main

TINY = ["--images", "2", "--size", "320x240", "--repeat", "1", "--probe", "0"]


def run(tmp_path: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    out = tmp_path / "r.json"
    code = main([*TINY, "--json", str(out), "--html", str(tmp_path / "r.html"),
                 "--png", str(tmp_path / "r.png"), *extra])
    return code, json.loads(out.read_text())


@pytest.mark.timeout(300)
def test_tiny_run_of_every_local_mode(tmp_path: Path) -> None:
    code, doc = run(tmp_path, "--modes", ",".join(LOCAL_MODES))
    assert code == 0
    assert set(doc) >= {"version", "created", "machine", "config", "images", "modes",
                        "latency_probe", "stages_ms", "goals", "notes"}
    assert doc["config"]["images"] == 2 and doc["config"]["size"] == "320x240"
    assert [m["mode"] for m in doc["modes"]] == list(LOCAL_MODES)
    for m in doc["modes"]:
        assert "error" not in m, m
        assert set(m) >= {"images_per_s", "latency_ms", "cpu_s", "cpu_ms_per_image",
                          "peak_rss_mb", "speedup_vs_naive", "efficiency_vs_limit",
                          "cpu_efficiency_vs_limit", "runs",
                          "output_sizes"}
        assert m["images_per_s"]["min"] <= m["images_per_s"]["median"] <= \
            m["images_per_s"]["max"]
        assert len(m["runs"]) == 1 and m["runs"][0]["images"] == 2
        assert m["output_sizes"] == [[1440, 1080]]
        assert m["undecodable"] == 0
    by = {m["mode"]: m for m in doc["modes"]}
    assert by["naive-sequential"]["speedup_vs_naive"] == 1.0
    assert by["limit"]["efficiency_vs_limit"] == 1.0
    assert by["processes"]["workers"] >= 1 and by["threads-4"]["workers"] == 4
    assert doc["latency_probe"] is None
    assert [g["met"] for g in doc["goals"]] == [None, None, None]
    assert any(k.startswith("decode") for k in doc["stages_ms"])
    assert (tmp_path / "r.html").stat().st_size > 0
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(300)
def test_rounds_run_every_image_again_in_one_pass(tmp_path: Path) -> None:
    code, doc = run(tmp_path, "--modes", "sequential,limit", "--rounds", "3")
    assert code == 0
    assert doc["config"]["rounds"] == 3 and doc["config"]["images"] == 2
    for m in doc["modes"]:
        assert "error" not in m, m
        assert m["runs"][0]["images"] == 6


@pytest.mark.parametrize("args", [["--modes", "sequential,bogus"], ["--workers", "0"],
                                  ["--size", "big"], ["--images", "0"], ["--rounds", "0"],
                                  ["--concurrency", "0"],
                                  ["--url", "http://192.0.2.1:8000"]])
def test_bad_flags_exit_2(args: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*TINY, *args])
    assert exc.value.code == 2


def test_bad_ops_exit_2(tmp_path: Path) -> None:
    assert main([*TINY, "--modes", "sequential", "--ops", "nosuchfilter"]) == 2


@pytest.mark.parametrize(("workload", "size", "first_op", "goals"), [
    ("chain", "3840x2160", "resize:w=1920,h=1080", ["pipeline >= 0.85 x limit"]),
    ("resize", "3840x2160", "resize:w=1920,h=1080", ["pipeline >= 0.8 x limit"]),
    ("small", "1280x800", "resize:w=640,h=400", []),
])
def test_workloads_set_the_chain_size_and_goal(workload: str, size: str, first_op: str,
                                               goals: list[str], tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    # One image, one pass: the workload's own size and chain (the 4K ones take a second).
    assert main(["--workload", workload, "--images", "1", "--repeat", "1", "--probe", "0",
                 "--modes", "sequential", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["config"]["workload"] == workload and doc["config"]["size"] == size
    assert doc["config"]["ops"].split("|")[0] == first_op
    assert [g["goal"] for g in doc["goals"]][:len(goals)] == goals
    assert not any("x limit" in g["goal"] for g in doc["goals"][len(goals):])
    # --ops and --size still override the workload's
    assert main(["--workload", workload, *TINY, "--modes", "sequential", "--ops",
                 "resize:w=100", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["config"]["size"] == "320x240" and doc["config"]["ops"] == "resize:w=100"


def test_input_folder_is_used(tmp_path: Path) -> None:
    from imgpipe.bench.images import generate

    for i, data in enumerate(generate(2, (200, 100))):
        (tmp_path / f"{i}.jpg").write_bytes(data)
    code, doc = run(tmp_path, "--input", str(tmp_path), "--modes", "sequential",
                    "--ops", "resize:w=100")
    assert code == 0
    assert doc["config"]["size"] == "200x100"
    assert doc["modes"][0]["output_sizes"] == [[100, 50]]


def test_a_mode_that_cannot_run_is_reported_not_fatal(tmp_path: Path) -> None:
    code, doc = run(tmp_path, "--modes", "naive-sequential,sequential", "--ops", "edges")
    assert code == 1
    by = {m["mode"]: m for m in doc["modes"]}
    assert "edges" in by["naive-sequential"]["error"]
    assert "error" not in by["sequential"]
