"""Bench and stress against a real local stack (``imgpipe up``): structure and counters."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imgpipe.bench import stress
from imgpipe.bench.bench import main as bench_main
from imgpipe.bench.stack import LocalStack

pytestmark = pytest.mark.slow
SMALL = ["--size", "320x240", "--ops", "resize:w=160|blur:radius=1"]


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    s = LocalStack(2)
    try:
        s.start(timeout=120)
        yield s
    finally:
        s.stop()


@pytest.mark.timeout(300)
def test_bench_pipeline_with_one_worker(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    code = bench_main(["--images", "2", "--size", "320x240", "--repeat", "1", "--probe", "2",
                       "--modes", "sequential,limit,pipeline-w1", "--json", str(out)])
    doc = json.loads(out.read_text())
    by = {m["mode"]: m for m in doc["modes"]}
    assert code == 0, by
    pipe = by["pipeline-w1"]
    assert pipe["kind"] == "pipeline" and pipe["workers"] == 1
    assert pipe["errors"] == 0 and pipe["undecodable"] == 0
    assert pipe["output_sizes"] == by["sequential"]["output_sizes"]
    assert pipe["efficiency_vs_limit"] is not None
    # Where the pipeline's CPU went: every component of the stack has its share, and
    # the filter processes (the worker's pool) are told apart from the worker itself.
    parts = pipe["cpu_ms_per_image_by_component"]
    assert set(parts) >= {"gateway", "ventilator", "worker", "filter", "sink", "client"}, parts
    # (psutil counts 10 ms ticks: one component of a 2-image pass may round to 0, the
    # stack as a whole cannot)
    assert all(v >= 0 for v in parts.values()) and sum(parts.values()) > 0
    assert by["limit"]["cpu_ms_per_image_by_component"] is None
    probe = doc["latency_probe"]
    assert probe["mode"] == "pipeline-w1" and probe["count"] == 2
    assert probe["image"] == {"width": 320, "height": 240, "bytes": probe["image"]["bytes"]}
    assert probe["ratio_p50"] is not None
    # Where each probe request's time went, from its job's timings: every part named,
    # and together they are the request's end-to-end time (the parts are medians of two
    # requests, so they add up to the median of those two within rounding).
    split = probe["e2e_split_ms"]
    assert list(split) == ["gateway", "dispatch", "to_worker", "worker", "store"], split
    assert split["worker"] > 0 and split["dispatch"] >= 0
    assert sum(split.values()) == pytest.approx(probe["e2e_ms"]["p50"], abs=0.1)
    assert doc["goals"][0]["value"] is not None and doc["goals"][2]["value"] is not None


@pytest.mark.timeout(300)
def test_bench_pipeline_against_a_running_stack(stack: LocalStack, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    code = bench_main(["--images", "3", "--repeat", "1", "--probe", "0", "--modes", "pipeline",
                       "--url", stack.url, "--json", str(out), *SMALL])
    doc = json.loads(out.read_text())
    assert code == 0, doc["modes"]
    (pipe,) = doc["modes"]
    assert pipe["mode"] == "pipeline-url" and pipe["workers"] == 2
    assert pipe["output_sizes"] == [[160, 120]]


@pytest.mark.timeout(300)
def test_bench_one_gateway_against_two_of_the_same_stack(stack: LocalStack,
                                                          tmp_path: Path) -> None:
    """--url A,B: the pipeline on A alone, then round-robin over A and B, in one run."""
    import subprocess
    import sys

    from imgpipe.bench.stack import free_port
    from imgpipe.core.runtime import die_with_parent
    from tests.support import answers, wait_for

    port = free_port()
    second = f"http://127.0.0.1:{port}"
    with open(tmp_path / "gateway2.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "imgpipe", "gateway", "--data-dir",
             str(stack.data_dir), "--gateway-port", str(port)], env=stack.env(),
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    try:
        wait_for(answers(proc, f"{second}/healthz", lambda: "the second gateway exited:\n"
                         + (tmp_path / "gateway2.log").read_text(errors="replace")[-2000:]),
                 60, interval=0.2, what="the second gateway")
        out = tmp_path / "r.json"
        code = bench_main(["--images", "4", "--repeat", "1", "--probe", "0", "--modes",
                           "pipeline", "--url", f"{stack.url},{second}", "--json", str(out),
                           *SMALL])
        doc = json.loads(out.read_text())
        assert code == 0, doc["modes"]
        assert [m["mode"] for m in doc["modes"]] == ["pipeline-url", "pipeline-url-g2"]
        assert doc["config"]["urls"] == [stack.url, second]
        for m in doc["modes"]:
            assert m["errors"] == 0 and m["output_sizes"] == [[160, 120]], m
        for m in doc["modes"]:  # split by component in both (a few ms of CPU per image:
            # the 10 ms ticks of a 4-image pass may round a component to 0)
            assert {"gateway", "worker", "sink"} <= set(m["cpu_ms_per_image_by_component"])
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.timeout(300)
def test_stress_burst(stack: LocalStack, tmp_path: Path) -> None:
    out = tmp_path / "burst.json"
    code = stress.main(["burst", "5", "--url", stack.url, "--timeout", "120",
                        "--json", str(out), *SMALL])
    s = json.loads(out.read_text())
    assert code == 0, s
    assert s["submitted"] == 5 and s["accepted"] == 5
    assert s["job_states"] == {"done": 5}
    assert s["outputs_done"] == 5 and s["server_errors"] == 0 and s["unfinished"] == 0
    assert s["status_counts"] == {"202": 5}
    assert {"gateway", "worker", "ventilator", "sink"} <= set(s["peak_rss_mb_by_role"])


@pytest.mark.timeout(300)
def test_stress_continuous(stack: LocalStack, tmp_path: Path) -> None:
    out = tmp_path / "cont.json"
    code = stress.main(["continuous", "--rate", "4", "--duration", "1.5", "--url", stack.url,
                        "--timeout", "120", "--json", str(out), *SMALL])
    s = json.loads(out.read_text())
    assert code == 0, s
    assert s["submitted"] + s["skipped_client_saturated"] == 6
    assert s["job_states"].get("done") == s["accepted"] == s["submitted"]
    assert s["target_rate_per_s"] == 4


def test_stress_burst_against_nothing_fails(tmp_path: Path) -> None:
    from imgpipe.bench.stack import free_port

    url = f"http://127.0.0.1:{free_port()}"
    assert stress.main(["burst", "2", "--url", url, "--timeout", "5", *SMALL]) == 1


@pytest.mark.timeout(400)
def test_chaos_kills_workers_and_counts_every_output(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    with LocalStack(3) as s:
        code = stress.main(["chaos", "--url", s.url, "--kills", "2", "--interval", "1",
                            "--outputs", "24", "--size", "640x360", "--timeout", "200",
                            "--json", str(out)])
    r = json.loads(out.read_text())
    c = r["counters"]
    assert r["killed"] == 2, r["kills"]
    assert c["expected"] == 24 and c["done"] == 24
    assert c["lost"] == c["duplicated"] == c["wrong_size"] == c["undecodable"] == 0
    assert r["requests"]["total"] > 0
    assert code == (0 if r["requests"]["share"] >= 0.99 else 1)


@pytest.mark.timeout(300)
def test_bench_scales_a_running_stack_between_passes(stack_factory: Any,
                                                     tmp_path: Path) -> None:
    """--scale-with: one run, the stack behind --url at each worker count in turn."""
    import shlex
    import sys

    s = stack_factory(1)
    scale = (f"{shlex.quote(sys.executable)} -m imgpipe scale {{n}} --data "
             f"{shlex.quote(str(s.settings.data_dir))}")
    out = tmp_path / "r.json"
    code = bench_main(["--images", "2", "--repeat", "1", "--probe", "0", "--modes", "pipeline",
                       "--url", s.url, "--workers", "1,2", "--scale-with", scale,
                       "--json", str(out), *SMALL])
    doc = json.loads(out.read_text())
    assert code == 0, doc["modes"]
    assert [(m["mode"], m["workers"]) for m in doc["modes"]] == [
        ("pipeline-url-w1", 1), ("pipeline-url-w2", 2)]
    assert all(m["output_sizes"] == [[160, 120]] for m in doc["modes"])
    assert len(s.workers()) == 2
