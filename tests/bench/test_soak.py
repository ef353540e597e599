"""``imgpipe stress soak`` on a tiny run: the report's structure, the cache, the chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from imgpipe.bench import soak, stress


def test_drift_is_the_change_after_warm_up() -> None:
    flat = [(t, 100.0 + (50.0 if t < 2 else 0.0)) for t in range(16)]  # warm-up, then flat
    assert soak.drift(flat) == 0.0
    growing = [(t, 100.0 + 10 * t) for t in range(16)]
    assert (d := soak.drift(growing)) is not None and d > 30
    assert soak.drift(growing[:5]) is None


def test_variants_are_new_bytes_of_the_same_image() -> None:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "teal").save(buf, "JPEG")
    base = buf.getvalue()
    a, b = soak.variant(base, 1), soak.variant(base, 2)
    assert a != b != base
    with Image.open(io.BytesIO(a)) as im:
        assert im.size == (8, 8)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_tiny_soak_against_a_stack(stack_factory: Any, tmp_path: Path) -> None:
    stack = stack_factory(2, job_ttl_s=2.0, sweep_interval_s=0.5)
    out, png = tmp_path / "soak.json", tmp_path / "soak.png"
    code = stress.main(["soak", "--url", stack.url, "--rate", "4", "--duration", "5",
                        "--repeat", "0.5", "--size", "320x240", "--sample-s", "0.5",
                        "--data", str(stack.settings.data_dir), "--json", str(out),
                        "--png", str(png)])
    report = json.loads(out.read_text())
    s = report["summary"]
    assert code == 0, s
    assert s["jobs"] == 20 and s["outcomes"] == {"done": 20}
    assert s["cache"]["hits"] > 0 and s["cache"]["hit_ratio"] > 0
    assert len(report["samples"]) >= 8
    roles = report["samples"][-1]["roles"]
    assert {"gateway", "ventilator", "sink", "worker"} <= set(roles)
    assert all(r["rss_mb"] > 0 and r["threads"] > 0 and r["open_files"] > 0
               for r in roles.values())
    assert "worker.rss_mb" in s["drift_pct"] and "data_mb" in s["drift_pct"]
    with Image.open(png) as im:
        assert im.size == (1200, 900)
