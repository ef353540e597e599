"""``imgpipe health``: the container probes, against real sockets and real HTTP servers.

The ventilator side is played by a ROUTER that answers ``ping``/``workers``/``stats``
the way ``core.control`` documents them; the last tests run the real ventilator, sink
and worker processes and probe them as a container would. Failure paths must answer 1 with a line
naming what is wrong, and must not wait out their timeout when nothing listens.
"""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from imgpipe import health
from imgpipe.core.config import Settings
from imgpipe.core.protocol import Reply, Request, decode, encode
from imgpipe.core.sockets import make_socket
from tests.support import free_port, settings_env, wait_for

LONG = "60"  # a --timeout no failure path may wait out (the test's own timeout is 30 s)
HOST = socket.gethostname()


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = health.main(list(argv))
    out = capsys.readouterr().out.strip()
    assert "\n" not in out, f"one line expected, got {out!r}"
    return code, out


def env_for(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    """Make ``health.main`` build ``settings`` from the environment, as in a container."""
    for key in list(os.environ):
        if key.startswith("IMGPIPE_"):
            monkeypatch.delenv(key)
    for key, value in settings.to_env().items():
        monkeypatch.setenv(key, value)


class FakeVentilator:
    """A ROUTER on the control endpoint answering from ``answers`` (op -> data or callable)."""

    def __init__(self, ctx: zmq.Context[Any], settings: Settings,
                 answers: dict[str, Any]) -> None:
        self.ctx, self.settings, self.answers = ctx, settings, answers
        self.asked: list[str] = []
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def loop(self) -> None:
        sock = make_socket(self.ctx, zmq.ROUTER, self.settings,
                           bind=self.settings.control_endpoint)
        try:
            self.ready.set()
            while not self.stop.is_set():
                if not sock.poll(50, zmq.POLLIN):
                    continue
                ident, empty, *frames = sock.recv_multipart()
                req = decode(frames, expect=Request)
                assert isinstance(req, Request)
                self.asked.append(req.op)
                answer = self.answers.get(req.op)
                if answer is None:
                    continue  # silent: the probe must give up at its deadline
                data = answer() if callable(answer) else answer
                sock.send_multipart([ident, empty, *encode(Reply(ok=True, data=data))])
        finally:
            sock.close(linger=0)

    def __enter__(self) -> FakeVentilator:
        self.thread.start()
        assert self.ready.wait(5), "fake ventilator did not bind"
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)


def worker_row(**over: Any) -> dict[str, Any]:
    row = {"id": f"{HOST}-4242", "host": HOST, "pid": 4242, "state": "idle", "serves": "all",
           "slots": 2, "free": 2, "inflight": [], "done": 0, "failed": 0, "cpu": 0.0,
           "rss": 1, "last_beat_age_s": 0.4, "started": 0.0}
    row.update(over)
    return row


@pytest.fixture
def sink_socket(zctx: zmq.Context[Any], settings: Settings) -> Iterator[zmq.Socket[Any]]:
    """A PULL bound where the sink binds its results, so the sink looks listening here."""
    sock = make_socket(zctx, zmq.PULL, settings, bind=settings.result_endpoint)
    yield sock
    sock.close(linger=0)


# --- nothing listening: exit 1 at once, with the endpoint in the line ---------------------
@pytest.mark.timeout(30)
@pytest.mark.parametrize("role, names", [
    ("ventilator", "control"), ("sink", "result"), ("worker", "control"),
    ("gateway", "/healthz"), ("dashboard", "/_stcore/health")])
def test_nothing_listening_is_unhealthy_at_once(role: str, names: str, settings: Settings,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    env_for(monkeypatch, settings)
    code, line = run_main(capsys, role, "--timeout", LONG)
    assert code == 1
    assert line.startswith("unhealthy: ") and names in line, line


@pytest.mark.timeout(30)
def test_unresolvable_ventilator_host_is_named(settings: Settings,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    env_for(monkeypatch, settings.with_overrides(
        control_endpoint="tcp://no-such-host.invalid:5555"))
    code, line = run_main(capsys, "worker", "--timeout", LONG)
    assert code == 1 and "no-such-host.invalid:5555" in line, line


def test_silent_ventilator_times_out(zctx: zmq.Context[Any], settings: Settings,
                                     monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    env_for(monkeypatch, settings)
    with FakeVentilator(zctx, settings, {}) as fake:
        code, line = run_main(capsys, "ventilator", "--timeout", "0.5")
    assert code == 1 and "did not answer 'ping'" in line, line
    assert fake.asked == ["ping"]


def test_cli_child_process_answers_one_line_and_exit_1(settings: Settings) -> None:
    """What Docker runs: the console command in its own process, settings from the env."""
    proc = subprocess.run([sys.executable, "-m", "imgpipe", "health", "sink", "--timeout", "2"],
                          env=settings_env(settings), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1, proc
    assert proc.stdout.startswith("unhealthy: sink: result socket:"), proc.stdout
    assert proc.stdout.count("\n") == 1


def test_usage_errors_answer_1_not_dockers_reserved_2(capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    assert health.main(["bogus"]) == 1
    assert health.main(["worker", "--timeout", "soon"]) == 1
    assert health.main(["--help"]) == 0
    capsys.readouterr()


def test_bad_settings_are_unhealthy(monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("IMGPIPE_NOT_A_SETTING", "1")
    code, line = run_main(capsys, "ventilator")
    assert code == 1 and "IMGPIPE_NOT_A_SETTING" in line, line


# --- ventilator -----------------------------------------------------------------------------
def test_ventilator_answering_ping_is_healthy(zctx: zmq.Context[Any], settings: Settings,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    env_for(monkeypatch, settings)
    ping = {"role": "ventilator", "pid": 77, "uptime_s": 12.0}
    with FakeVentilator(zctx, settings, {"ping": ping}):
        code, line = run_main(capsys, "ventilator")
    assert code == 0, line
    assert line == f"healthy: ventilator answers at {settings.control_endpoint} (pid 77, up 12 s)"


def test_something_else_on_the_control_port_is_not_a_ventilator(
        zctx: zmq.Context[Any], settings: Settings, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    env_for(monkeypatch, settings)
    with FakeVentilator(zctx, settings, {"ping": {"role": "supervisor"}}):
        code, line = run_main(capsys, "ventilator")
    assert code == 1 and "answered ping" in line, line


# --- sink -------------------------------------------------------------------------------------
@pytest.mark.parametrize("components, healthy, says", [
    ({"sink": 0.7}, True, "heard 0.7 s ago"),
    ({"sink": 60.0}, False, "last heard 60.0 s ago"),
    ({"ventilator": 0.1}, False, "has not heard the sink"),
])
def test_sink_is_judged_by_the_ventilators_last_sighting(
        components: dict[str, float], healthy: bool, says: str, zctx: zmq.Context[Any],
        settings: Settings, sink_socket: zmq.Socket[Any], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    env_for(monkeypatch, settings)
    with FakeVentilator(zctx, settings, {"stats": {"components": components}}):
        code, line = run_main(capsys, "sink")
    assert (code == 0) is healthy and says in line, line


@pytest.mark.timeout(30)
def test_listening_sink_without_a_ventilator_is_unhealthy(
        settings: Settings, sink_socket: zmq.Socket[Any], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    env_for(monkeypatch, settings)
    code, line = run_main(capsys, "sink", "--timeout", LONG)
    assert code == 1 and "cannot ask the ventilator" in line, line


# --- worker -----------------------------------------------------------------------------------
@pytest.mark.parametrize("rows, healthy, says", [
    ([worker_row()], True, f"worker {HOST}-4242 on host {HOST} is idle"),
    ([worker_row(host="elsewhere")], False, f"no worker on host {HOST} (1 listed)"),
    ([worker_row(state="lost", last_beat_age_s=9.0)], False, "is lost"),
    ([worker_row(state="busy", last_beat_age_s=999.0)], False, "last beat 999.0 s ago"),
    ([worker_row(host="elsewhere"), worker_row(state="busy", pid=5)], True, "is busy"),
    ([], False, "(0 listed)"),
])
def test_worker_is_judged_by_the_registry_entry_of_this_host(
        rows: list[dict[str, Any]], healthy: bool, says: str, zctx: zmq.Context[Any],
        settings: Settings, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    env_for(monkeypatch, settings)
    with FakeVentilator(zctx, settings, {"workers": rows}):
        code, line = run_main(capsys, "worker")
    assert (code == 0) is healthy and says in line, line


def test_worker_pid_narrows_the_match(zctx: zmq.Context[Any], settings: Settings,
                                      monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    env_for(monkeypatch, settings)
    with FakeVentilator(zctx, settings, {"workers": [worker_row(pid=10)]}):
        assert run_main(capsys, "worker", "--pid", "10")[0] == 0
        code, line = run_main(capsys, "worker", "--pid", "11")
    assert code == 1 and f"host {HOST} pid 11" in line, line


# --- gateway and dashboard over HTTP ------------------------------------------------------------
Responder = Callable[[str], tuple[int, bytes]]


@pytest.fixture
def http_server() -> Iterator[Callable[[Responder], int]]:
    """Start a real HTTP server on 127.0.0.1 answering with a given function; its port."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(respond: Responder) -> int:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                status, body = respond(self.path)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        servers.append(server)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return int(server.server_address[1])

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status, body, flags, healthy, says", [
    (200, b'{"status":"ok"}', (), True, "gateway ready"),
    (503, b'{"error":"unhealthy","detail":"not ready: no live worker"}', (), True,
     'pipeline not ready: "not ready: no live worker"'),
    (503, b'{"error":"unhealthy","detail":"not ready: no live worker"}', ("--ready",), False,
     "answered 503"),
    (500, b"boom", (), False, "answered 500"),
    (404, b"", (), False, "answered 404"),
])
def test_gateway_probe_reads_healthz(status: int, body: bytes, flags: tuple[str, ...],
                                     healthy: bool, says: str,
                                     http_server: Callable[[Responder], int],
                                     settings: Settings, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    paths: list[str] = []

    def respond(path: str) -> tuple[int, bytes]:
        paths.append(path)
        return status, body

    port = http_server(respond)
    env_for(monkeypatch, settings.with_overrides(gateway_port=port, gateway_host="0.0.0.0"))
    code, line = run_main(capsys, "gateway", *flags)
    assert paths == ["/healthz"]
    assert (code == 0) is healthy and says in line, line
    assert f"http://127.0.0.1:{port}/healthz" in line


def test_gateway_url_flag_probes_another_base(http_server: Callable[[Responder], int],
                                              settings: Settings,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    port = http_server(lambda path: (200 if path == "/healthz" else 404, b"{}"))
    env_for(monkeypatch, settings)
    code, line = run_main(capsys, "gateway", "--url", f"http://127.0.0.1:{port}/")
    assert code == 0, line


def test_dashboard_probe_reads_streamlit_health(http_server: Callable[[Responder], int],
                                                settings: Settings,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    port = http_server(lambda path: (200, b"ok") if path == "/_stcore/health" else (404, b""))
    env_for(monkeypatch, settings.with_overrides(dashboard_port=port))
    code, line = run_main(capsys, "dashboard")
    assert code == 0 and f":{port}/_stcore/health" in line, line


# --- auto: which role runs beside the probe ---------------------------------------------------
@pytest.mark.parametrize("cmdline, role", [
    (["/opt/venv/bin/python", "/opt/venv/bin/imgpipe", "worker", "--serves", "all"], "worker"),
    (["/usr/bin/python3", "-m", "imgpipe", "sink"], "sink"),
    (["imgpipe", "ventilator"], "ventilator"),
    (["/opt/venv/bin/python", "-m", "streamlit", "run",
      "/opt/venv/lib/python3.11/site-packages/imgpipe/dashboard/app.py", "--server.port", "8501"],
     "dashboard"),
    (["/opt/venv/bin/python", "/opt/venv/bin/gunicorn", "imgpipe.gateway.wsgi:app"], "gateway"),
    (["gunicorn: master [imgpipe-gateway]"], "gateway"),
    (["/opt/venv/bin/python", "/opt/venv/bin/imgpipe", "health", "auto"], None),
    (["/sbin/docker-init", "--", "imgpipe", "up"], None),
    (["imgpipe"], None),
])
def test_role_of_command_lines(cmdline: list[str], role: str | None) -> None:
    assert health.role_of(cmdline) == role


def test_detect_role_takes_the_lowest_pid(tmp_path: Path) -> None:
    for pid, argv in ((1, ["/sbin/docker-init", "--", "imgpipe", "worker"]),
                      (7, ["/opt/venv/bin/python", "/opt/venv/bin/imgpipe", "worker"]),
                      (30, ["imgpipe", "sink"])):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv)
                                                      + b"\0")
    (tmp_path / "self").mkdir()
    assert health.detect_role(tmp_path) == "worker"
    (tmp_path / "99").mkdir()  # a process that exited between listing and reading
    assert health.detect_role(tmp_path) == "worker"


def test_detect_role_reads_a_real_processes_cmdline(tmp_path: Path) -> None:
    """A real child process, seen through its own /proc entry (other processes on the
    machine are left out, so a component someone else runs cannot answer instead)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             "imgpipe", "sink"])
    try:
        (tmp_path / str(proc.pid)).symlink_to(f"/proc/{proc.pid}")
        # /proc shows the new command line once exec has finished in the child.
        assert wait_for(lambda: health.detect_role(tmp_path), 10, what="cmdline") == "sink"
    finally:
        proc.kill()
        proc.wait(10)


def test_auto_without_a_component_is_unhealthy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(health, "detect_role", lambda: None)
    code, line = run_main(capsys, "auto")
    assert code == 1 and "no `imgpipe ROLE` process" in line


def test_auto_probes_the_detected_role(zctx: zmq.Context[Any], settings: Settings,
                                       monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    env_for(monkeypatch, settings)
    monkeypatch.setattr(health, "detect_role", lambda: "ventilator")
    with FakeVentilator(zctx, settings, {"ping": {"role": "ventilator", "pid": 1}}) as fake:
        code, line = run_main(capsys, "auto")
    assert code == 0 and fake.asked == ["ping"], line


def test_local_endpoint_reaches_this_hosts_bind(settings: Settings) -> None:
    s = settings.with_overrides(bind_host="0.0.0.0")
    assert health.local_endpoint(s, "tcp://ventilator:5555") == "tcp://127.0.0.1:5555"
    assert health.local_endpoint(s.with_overrides(bind_host="10.0.0.5"),
                                 "tcp://ventilator:5555") == "tcp://10.0.0.5:5555"
    assert health.local_endpoint(s, "ipc:///tmp/x/control") == "ipc:///tmp/x/control"


def test_listening_tells_refused_from_accepted() -> None:
    port = free_port()
    assert "Connection refused" in (health.listening(f"tcp://127.0.0.1:{port}", 2.0) or "")
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        assert health.listening(f"tcp://127.0.0.1:{srv.getsockname()[1]}", 2.0) is None


# --- the real components ----------------------------------------------------------------------
@pytest.fixture
def live_settings(settings: Settings) -> Settings:
    """Fast beats so 'lost' comes within a second or two of a kill."""
    return settings.with_overrides(heartbeat_interval_s=0.2, heartbeat_liveness=5,
                                   metrics_interval_s=0.2).validate()


@pytest.fixture
def spawn(tmp_path: Path, live_settings: Settings
          ) -> Iterator[Callable[[str], subprocess.Popen[bytes]]]:
    """Start ``imgpipe ROLE`` as a child process; every child is killed at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(role: str) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"{role}-{len(procs)}.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "imgpipe", role],
                                env=settings_env(live_settings), stdout=log,
                                stderr=subprocess.STDOUT)
        log.close()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def verdict(settings: Settings, role: str, **kw: Any) -> health.Verdict:
    return health.check(role, settings, timeout=2.0, **kw)


def failing(settings: Settings, role: str, **kw: Any) -> health.Verdict | None:
    """The verdict when it is unhealthy, else None (for wait_for)."""
    v = verdict(settings, role, **kw)
    return None if v.ok else v


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_probes_follow_the_real_components(spawn: Callable[[str], subprocess.Popen[bytes]],
                                           live_settings: Settings) -> None:
    s = live_settings
    assert not verdict(s, "ventilator").ok
    vent = spawn("ventilator")
    wait_for(lambda: verdict(s, "ventilator").ok, 30, what="ventilator healthy")
    line = verdict(s, "worker").line
    assert "lists no worker" in line, line
    assert not verdict(s, "sink").ok

    sink = spawn("sink")
    wait_for(lambda: verdict(s, "sink").ok, 30, what="sink healthy")
    worker = spawn("worker")
    wait_for(lambda: verdict(s, "worker", pid=worker.pid).ok, 60, what="worker healthy")

    worker.kill()  # SIGKILL: no goodbye, only missing heartbeats tell
    worker.wait(10)
    gone = wait_for(lambda: failing(s, "worker", pid=worker.pid), 30, what="worker unhealthy")
    assert f"pid {worker.pid}" in gone.line, gone.line

    sink.kill()
    sink.wait(10)
    stale = wait_for(lambda: failing(s, "sink"), 30, what="sink unhealthy")
    assert "result socket" in stale.line or "last heard" in stale.line, stale.line

    vent.terminate()  # what `docker stop` sends (STOPSIGNAL SIGTERM)
    assert vent.wait(30) == 0
    assert not verdict(s, "ventilator").ok


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_probe_answers_for_the_real_dashboard(spawn: Callable[[str], subprocess.Popen[bytes]],
                                              live_settings: Settings) -> None:
    assert not verdict(live_settings, "dashboard").ok
    dash = spawn("dashboard")
    wait_for(lambda: verdict(live_settings, "dashboard").ok, 90, interval=0.5,
             what="dashboard healthy")
    dash.terminate()
    assert dash.wait(30) == 0


def test_with_two_ventilators_listed_the_one_bound_here_is_probed(
        zctx: zmq.Context[Any], settings: Settings, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """compose/ha.yml lists both ventilators; this host's binds one entry's port (here
    the second): the probe finds it."""
    nobody = f"tcp://127.0.0.1:{free_port()}"
    listed = settings.with_overrides(control_endpoint=f"{nobody},{settings.control_endpoint}")
    env_for(monkeypatch, listed)
    ping = {"role": "ventilator", "pid": 77, "uptime_s": 12.0}
    with FakeVentilator(zctx, settings, {"ping": ping}):
        code, line = run_main(capsys, "ventilator")
    assert code == 0, line
    assert line == f"healthy: ventilator answers at {settings.control_endpoint} (pid 77, up 12 s)"
