"""The dashboard in a real headless Chromium, over a real local stack (`imgpipe up`).

Starts the whole stack with two real workers and the dashboard as its child, puts one
job through it, loads the page, waits until the workers' ids are on it, and saves a
screenshot to ``artifacts/dashboard.png``. Debian's chromium (``.ci/system-deps.sh``)
drives it; the test skips only when chromium is missing and CI is unset.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from imgpipe.core.config import Settings
from tests.support import settings_env, wait_for

ROOT = Path(__file__).resolve().parents[2]
SHOT = ROOT / "artifacts" / "dashboard.png"
# Debian's package; elsewhere any Chromium-family browser named by CHROMIUM_PATH.
CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# The chart titles, and the marks that show each one has data drawn.
CHARTS = {"Throughput and busy workers": "g.mark-area path, g.mark-line path",
          "Latency percentiles (upload to result)": "g.mark-line path",
          "Queue depth and in flight": "g.mark-line path",
          "Mean time per stage": "g.mark-rect path"}
# Per visible chart: its title, its box (page px), and whether a mark path of its kind
# has geometry (a drawn line, area or bar has several coordinates in its ``d``).
DRAWN = """() => [...document.querySelectorAll('[data-testid="stVegaLiteChart"] svg')]
  .filter(svg => svg.getBoundingClientRect().width > 0).map(svg => {
    const r = svg.getBoundingClientRect();
    const title = (svg.querySelector('.role-title-text') || {}).textContent || '';
    const marks = (CHARTS)[title] || 'none';
    const drawn = [...svg.querySelectorAll(marks)].some(
        p => ((p.getAttribute('d') || '').match(/\\d+/g) || []).length >= 4);
    return {title, drawn, x: Math.round(r.x), y: Math.round(r.y),
            w: Math.round(r.width), h: Math.round(r.height)};
  })""".replace("(CHARTS)", json.dumps(CHARTS))

# The Plotly job-timings chart: its bars (paths with a width), its y labels and box.
JOB_BARS = """() => [...document.querySelectorAll('.js-plotly-plot .barlayer path')]
  .some(p => ((p.getAttribute('d') || '').match(/\\d+/g) || []).length >= 4)"""
JOB_CHART = """() => {
  const plot = document.querySelector('.js-plotly-plot');
  if (!plot) return {bars: 0, labels: '', title: '', box: {}};
  const r = plot.getBoundingClientRect();
  return {bars: plot.querySelectorAll('.barlayer path').length,
          labels: [...plot.querySelectorAll('.ytick text')].map(t => t.textContent).join('|'),
          title: (plot.querySelector('.gtitle') || {}).textContent || '',
          box: {x: Math.round(r.x), y: Math.round(r.y), w: Math.round(r.width),
                h: Math.round(r.height)}};
}"""


def need_chromium() -> None:
    if os.path.exists(CHROMIUM):
        return
    if os.environ.get("CI"):
        pytest.fail("chromium is missing on CI: .ci/system-deps.sh should have installed it")
    pytest.skip("chromium not installed (run `bash .ci/system-deps.sh` as root)")


@pytest.fixture
def stack(settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    """`imgpipe up --workers 2` (gateway, ventilator, sink, workers, dashboard)."""
    log = (tmp_path / "up.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "imgpipe", "up", "--workers", "2"],
                            env=settings_env(settings), cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield settings
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)   # the group this test started
            proc.wait(10)
        log.close()
        if proc.returncode not in (0, -signal.SIGKILL):
            print((tmp_path / "up.log").read_text(errors="replace")[-4000:])


def worker_ids(settings: Settings) -> list[str]:
    body = httpx.get(f"{settings.gateway_url}/api/workers", timeout=3).json()
    rows = body.get("workers", []) if isinstance(body, dict) else body
    return sorted(w["id"] for w in rows if w.get("state") != "lost")


def png(width: int, height: int) -> bytes:
    img = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


@pytest.mark.timeout(600)
def test_dashboard_shows_the_running_workers(stack: Settings) -> None:
    need_chromium()
    from playwright.sync_api import sync_playwright

    ids = wait_for(lambda: (ids := worker_ids(stack)) and len(ids) == 2 and ids, 180,
                   interval=0.5, what="two workers in /api/workers")
    resp = httpx.post(f"{stack.gateway_url}/api/process/?wait=60",
                      files=[("image", ("g.png", png(640, 400), "image/png"))],
                      data={"ops": ["resize:w=320", "sepia"]}, timeout=90)
    assert resp.status_code == 200 and resp.json()["state"] == "done", resp.text
    job_id = resp.json()["id"]
    url = f"http://{stack.gateway_host}:{stack.dashboard_port}/"
    wait_for(lambda: httpx.get(url + "_stcore/health", timeout=3).status_code == 200, 180,
             interval=0.5, what="the dashboard's health endpoint")

    SHOT.parent.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 2100})
            page.goto(url, timeout=120_000)
            for wid in ids:                                  # the fleet table is HTML
                page.get_by_role("cell", name=wid, exact=True).wait_for(timeout=240_000)
            advice = page.locator('[data-testid="stAlert"]').first
            advice.wait_for(timeout=60_000)
            assert any(a in advice.inner_text() for a in ("SCALE_UP", "MAINTAIN",
                                                          "SCALE_DOWN"))
            page.locator('[data-testid="stImage"] img').first.wait_for(timeout=120_000)
            # The Plotly job-timings panel, once the job is listed as done: drawn bars.
            page.wait_for_function(JOB_BARS, timeout=120_000, polling=200)
            # Every chart must have its marks drawn, in the page and in the screenshot.
            page.wait_for_function(f"() => ({DRAWN})().every(c => c.drawn)", timeout=240_000,
                                   polling=100)
            page.wait_for_timeout(2000)                      # two more redraws of the page
            before = page.evaluate(DRAWN)
            page.screenshot(path=str(SHOT), timeout=120_000, animations="disabled")
            after = page.evaluate(DRAWN)
            job_chart = page.evaluate(JOB_CHART)
        finally:
            browser.close()
    assert sorted(c["title"] for c in before) == sorted(CHARTS), before
    assert all(c["drawn"] for c in before + after), (before, after)
    assert job_chart["bars"] > 0 and job_id[:8] in job_chart["labels"], job_chart
    assert "Where the time went" in job_chart["title"], job_chart
    assert SHOT.stat().st_size > 10_000
    with Image.open(SHOT) as img:
        assert img.size == (1440, 2100)
        for c in [*before, {"title": "job timings", **job_chart["box"]}]:                                     # drawn in the image too
            box = img.convert("L").crop((c["x"], c["y"], c["x"] + c["w"], c["y"] + c["h"]))
            hist = box.histogram()
            inked = sum(hist[:200]) / (box.width * box.height)
            # Not a blank box: axes, legend and marks are there. A chart whose data is
            # flat (the queue of an idle stack) inks about 2 %; a white box inks 0.
            assert inked > 0.01, (c["title"], inked)
