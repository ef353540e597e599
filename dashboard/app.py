"""The imgpipe fleet dashboard (Streamlit): ``imgpipe dashboard`` runs this script.

The collector (the SUB socket thread) is created once per server process with
``st.cache_resource``; ``st.fragment(run_every=1)`` redraws the live panels from its
snapshot every second, so a browser tab costs one snapshot copy a second, not a
socket. Recent jobs come from the gateway's HTTP API in a slower fragment. Settings
come from ``IMGPIPE_*`` variables (``Settings.from_env()``), set by ``imgpipe
dashboard`` from its flags.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import streamlit as st

from imgpipe.core.advice import MAINTAIN, SCALE_UP, recommend
from imgpipe.core.config import Settings, is_loopback
from imgpipe.core.control import ask, supervisor_endpoint
from imgpipe.core.errors import ImgpipeError
from imgpipe.core.records import FINAL_JOB
from imgpipe.dashboard import charts, jobs, views
from imgpipe.dashboard.collector import Collector

STATE_STYLE = {"busy": "background-color:#fde2d4;color:#9a3412;font-weight:600",
               "idle": "background-color:#dcfce7;color:#166534",
               "lost": "background-color:#e5e7eb;color:#6b7280;text-decoration:line-through"}


def _release(collector: Collector) -> None:
    collector.stop()


@st.cache_resource(show_spinner=False, on_release=_release)
def get_collector(endpoint: str, _settings: Settings) -> Collector:
    """One collector per server process and bus endpoint (bound once, shared by tabs)."""
    return Collector(_settings, poll_url=_settings.gateway_url).start()


@st.cache_data(max_entries=64, show_spinner=False)
def get_final_job(base_url: str, job_id: str) -> dict[str, Any]:
    """A finished job's document never changes again: fetched once."""
    return jobs.job_document(base_url, job_id)


@st.cache_data(max_entries=256, show_spinner=False)
def get_thumbnail(url: str) -> bytes:
    """Outputs never change once done, so their thumbnails are cached by URL."""
    return jobs.fetch_thumbnail(url)


def header(settings: Settings, snap: Any) -> None:
    st.caption(f"bus `{settings.dashboard_bus_endpoint}` · gateway `{settings.gateway_url}` · "
               f"listening for {snap.now - snap.started:.0f} s · {snap.received} messages")


def kpis(snap: Any, m: dict[str, Any]) -> None:
    w = m["workers"]
    cols = st.columns(6)
    cols[0].metric("Workers alive", w["alive"], help=f"{w['lost']} lost")
    cols[1].metric("Busy", f"{w['busy']} / {w['alive']}")
    cols[2].metric("Queued", m["queue_depth"] if m["queue_known"] else "n/a",
                   help="outputs waiting for a worker (ventilator metric)")
    cols[3].metric("In flight", m["in_flight"])
    cols[4].metric("Throughput", f"{m['throughput_per_s']:.1f}/s", help="outputs per second")
    p95 = m["latency_ms"].get("p95")
    cols[5].metric("p95 latency", f"{p95:.0f} ms" if p95 is not None else "n/a")
    storage = views.storage_summary(snap)
    if storage:
        st.caption(storage)


def advice_box(m: dict[str, Any]) -> None:
    advice = recommend(m)
    text = (f"**{advice['action']}** → {advice['workers']} worker(s) — {advice['reason']}")
    if not m["queue_known"]:
        text += " · queue depth unknown (no ventilator metric on the bus)"
    if advice["action"] == SCALE_UP:
        st.warning(text)
    elif advice["action"] == MAINTAIN:
        st.success(text)
    else:
        st.info(text)


def fleet_table(snap: Any) -> None:
    df = views.fleet_frame(snap)
    st.markdown(f"**Fleet** · {len(df)} worker(s)")
    if df.empty:
        st.caption("No heartbeat yet. Workers publish to "
                   f"`{snap.endpoint}` every second once they start.")
        return
    styled = df.style.map(lambda s: STATE_STYLE.get(s, ""), subset=["state"]).format(
        {"cpu %": "{:.1f}", "rss MB": "{:.1f}", "last beat s": "{:.1f}"})
    st.table(styled, border="horizontal", hide_index=True)  # HTML: ids are page text


def logs(snap: Any) -> None:
    left, right = st.columns([3, 2])
    with left:
        st.markdown("**Events**")
        ev = views.events_frame(snap)
        if ev.empty:
            st.caption("No events yet (worker joined/lost, retries, failed tasks).")
        else:
            st.dataframe(ev, hide_index=True, width="stretch", height=240)
    with right:
        st.markdown(f"**Telemetry gaps** · {snap.missed} message(s) missed, "
                    f"{snap.received} received, {snap.bad} malformed")
        gaps = views.gaps_frame(snap)
        if gaps.empty:
            st.caption("Nothing received yet.")
        else:
            st.dataframe(gaps, hide_index=True, width="stretch", height=240)


def chart(col: Any, c: charts.Chart) -> None:
    """Vega-Lite, not Plotly: with a constant spec the browser swaps the data in place,
    so a chart drawn once stays drawn while the page redraws (see dashboard.charts)."""
    col.vega_lite_chart(c.data, c.spec, width="stretch")


@st.fragment(run_every=1)
def live(collector: Collector) -> None:
    snap = collector.snapshot()
    header(collector.settings, snap)
    if collector.error:
        st.error(collector.error)
    m = views.live_metrics(snap)
    kpis(snap, m)
    advice_box(m)
    fleet_table(snap)
    df = views.series_frame(snap)
    c1, c2 = st.columns(2)
    chart(c1, charts.throughput_chart(df))
    chart(c2, charts.latency_chart(df))
    c3, c4 = st.columns(2)
    chart(c3, charts.queue_chart(df))
    chart(c4, charts.stage_chart(snap))
    if snap.gateway is None and snap.gateway_error:
        st.caption(f"Latency percentiles and the fleet's stage means come from the gateway's "
                   f"/api/metrics: {snap.gateway_error}.")
    logs(snap)


@st.fragment(run_every=3)
def recent_jobs(settings: Settings) -> None:
    st.markdown("**Recent jobs**")
    try:
        found = jobs.recent_jobs(settings.gateway_url, limit=5)
    except jobs.GatewayUnavailable as exc:
        st.caption(f"Gateway unavailable: {exc}. Recent jobs appear when it answers.")
        return
    if not found:
        st.caption("No job yet: `imgpipe submit photo.jpg --ops 'resize:w=640' --wait`.")
        return
    if any(job.get("state") in FINAL_JOB for job in found):
        # Plotly here, unlike the live charts: the figure changes only when a job or an
        # output finishes, so the element (keyed by its figure) is not remounted each run.
        st.plotly_chart(views.jobs_timing_figure(found), key="job_timings",
                        config={"displaylogo": False})
    for job in found:
        st.caption(jobs.job_caption(job))
        if not (job.get("progress") or {}).get("done"):
            continue
        try:
            doc = (get_final_job(settings.gateway_url, str(job.get("id")))
                   if job.get("state") in FINAL_JOB
                   else jobs.job_document(settings.gateway_url, str(job.get("id"))))
        except jobs.GatewayUnavailable as exc:
            st.caption(f"outputs unavailable: {exc}")
            continue
        outputs = [o for o in doc.get("outputs") or [] if isinstance(o, dict)]
        done = [o for o in outputs if o.get("state") == "done"][:8]
        cols = st.columns(8)
        for col, out in zip(cols, done, strict=False):
            try:
                col.image(get_thumbnail(jobs.output_url(settings.gateway_url, job, out)),
                          caption=str(out.get("ops", ""))[:24], width=140)
            except (jobs.GatewayUnavailable, OSError):
                col.caption(f"output {out.get('n')} unavailable")


def admin_key_matches(given: str, expected: str) -> bool:
    """Constant-time comparison of the admin key (over digests, so lengths leak nothing)."""
    digest = hashlib.sha256
    return hmac.compare_digest(digest(given.strip().encode()).digest(),
                               digest(expected.encode()).digest())


def scale_control(settings: Settings, collector: Collector) -> None:
    st.subheader("Scale")
    endpoint = supervisor_endpoint(settings.data_dir)
    if endpoint is None:
        st.caption(f"No local stack on `{settings.data_dir}` (no supervisor.json): scale with "
                   "your orchestrator, e.g. `make scale N=5` or "
                   "`docker compose up --scale worker=5`.")
        return
    try:
        status = ask(collector.ctx, settings, "status", timeout=1.0, endpoint=endpoint)
    except ImgpipeError as exc:
        st.caption(f"The local supervisor does not answer ({exc}).")
        return
    current = int((status or {}).get("workers", 1)) if isinstance(status, dict) else 1
    if isinstance(status, dict) and status.get("autoscale"):
        st.caption(f"Autoscaling {status['autoscale']}: a manual count may be changed by it.")
    if not settings.admin_key and not is_loopback(settings.gateway_host):
        st.caption("Scaling from this page is off: the dashboard is reachable beyond "
                   "loopback and IMGPIPE_ADMIN_KEY is not set. Use `imgpipe scale N`.")
        return
    with st.form("scale"):
        n = st.number_input("Workers", min_value=0, max_value=64, value=current, step=1)
        key = (st.text_input("Admin key", type="password") if settings.admin_key else "")
        if st.form_submit_button("Apply"):
            if settings.admin_key and not admin_key_matches(key, settings.admin_key):
                st.error("Wrong admin key: nothing was changed.")
                return
            try:
                ask(collector.ctx, settings, "scale", {"workers": int(n)}, timeout=3.0,
                    endpoint=endpoint)
                st.success(f"Asked the local stack for {int(n)} worker(s).")
            except ImgpipeError as exc:
                st.error(f"Scaling failed: {exc}")


# Live panels rerun every second; Streamlit would dim them while each rerun is on its
# way, so the page would flicker. Keep stale elements at full opacity.
CSS = """<style>
[data-stale="true"], .stale-element { opacity: 1 !important; transition: none !important; }
[data-testid="stMetricValue"] { font-size: 1.9rem; }
.block-container { padding-top: 2.2rem; }
</style>"""


def main() -> None:
    st.set_page_config(page_title="imgpipe fleet", layout="wide")
    st.markdown(CSS, unsafe_allow_html=True)
    try:
        settings = Settings.from_env().validate()
    except ImgpipeError as exc:
        st.error(f"Bad settings: {exc}")
        return
    try:
        collector = get_collector(settings.dashboard_bus_endpoint, settings)
    except (OSError, TimeoutError) as exc:
        st.error(f"The dashboard cannot listen to the bus: {exc}")
        return
    st.markdown("### imgpipe · fleet")
    live(collector)
    recent_jobs(settings)
    with st.sidebar:
        scale_control(settings, collector)
        st.divider()
        st.caption("Recommendations follow `core.advice`: SCALE_UP when ≥ 80 % of workers are "
                   "busy and the queue waits or grows; SCALE_DOWN when ≤ 30 % are busy and "
                   "the queue is empty.")


main()
