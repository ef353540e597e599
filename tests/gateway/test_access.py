"""API keys: 401 without a known key, jobs private to their key, open probes, the start check."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from imgpipe.core.config import Settings, client_headers
from imgpipe.core.errors import ConfigError
from imgpipe.core.store import Store
from imgpipe.gateway.access import check_exposure, digest, load_keys
from tests.gateway import images as im
from tests.support import settings_env

A, B = "key-a-0123456789", "key-b-9876543210"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def keyed(settings: Settings, make_gateway: Any) -> Any:
    return make_gateway(settings.with_overrides(api_keys=f"{A}, {B}"))


@pytest.fixture
def keyed_on(settings: Settings, make_gateway: Any, store_url: str) -> Any:
    """``keyed`` on each job store backend."""
    return make_gateway(settings.with_overrides(api_keys=f"{A}, {B}", store_url=store_url))


def submit(gw: Any, key: str | None) -> str:
    body, ctype = im.multipart([im.jpeg()], ["invert"])
    res = gw.post(body, ctype, headers=bearer(key) if key else None)
    assert res.status_code == 202, res.text
    return str(res.json["id"])


@pytest.mark.parametrize("headers", [{}, bearer("nope"), {"Authorization": "Basic eDp5"},
                                     {"Authorization": "Bearer "}, bearer(A + "x")],
                         ids=["missing", "unknown", "basic", "empty", "longer"])
@pytest.mark.parametrize("path", ["/api/jobs", "/api/filters", "/api/metrics",
                                  "/api/jobs/0b7d2a1e-3c4f-4a5b-8c6d-7e8f9a0b1c2d"])
def test_api_routes_need_a_known_key(keyed: Any, path: str, headers: dict[str, str]) -> None:
    res = keyed.client.simulate_get(path, headers=headers)
    assert res.status_code == 401, res.text
    assert res.json["error"] == "unauthorized" and res.json["detail"]
    assert res.headers["www-authenticate"].startswith("Bearer")


def test_a_submit_without_a_key_is_401_and_records_nothing(keyed: Any) -> None:
    body, ctype = im.multipart([im.jpeg()], ["invert"])
    res = keyed.post(body, ctype)
    assert res.status_code == 401
    assert keyed.store.totals().jobs == 0


@pytest.mark.parametrize("path", ["/healthz", "/metrics", "/openapi.json"])
def test_probes_and_the_spec_stay_open(keyed: Any, path: str) -> None:
    assert keyed.client.simulate_get(path).status_code != 401


def test_a_job_is_visible_only_to_the_key_that_made_it(keyed_on: Any) -> None:
    keyed = keyed_on
    job = submit(keyed, A)
    row = keyed.store.job(job)
    assert row.owner == digest(A) and A not in str(row)        # the hash, never the key
    assert keyed.client.simulate_get(f"/api/jobs/{job}", headers=bearer(A)).status_code == 200
    other = keyed.client.simulate_get(f"/api/jobs/{job}", headers=bearer(B))
    unknown = keyed.client.simulate_get("/api/jobs/0b7d2a1e-3c4f-4a5b-8c6d-7e8f9a0b1c2d",
                                        headers=bearer(B))
    assert other.status_code == unknown.status_code == 404
    assert other.json["error"] == unknown.json["error"] == "not_found"
    out = keyed.client.simulate_get(f"/api/jobs/{job}/outputs/0", headers=bearer(B))
    assert out.status_code == 404 and job in out.json["detail"]
    mine = keyed.client.simulate_get("/api/jobs", headers=bearer(A)).json["jobs"]
    theirs = keyed.client.simulate_get("/api/jobs", headers=bearer(B)).json["jobs"]
    assert [j["id"] for j in mine] == [job] and theirs == []


def test_without_keys_every_job_is_visible(gateway: Any) -> None:
    job = submit(gateway, None)
    res = gateway.client.simulate_get(f"/api/jobs/{job}", remote_addr="10.1.2.3")
    assert res.status_code == 200
    assert [j["id"] for j in gateway.client.simulate_get("/api/jobs").json["jobs"]] == [job]


def test_a_key_file_with_comments_and_blank_lines(tmp_path: Path, settings: Settings,
                                                  make_gateway: Any) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# the team's keys\n\n{A}  # alice\n   \n{B}\n")
    assert load_keys(f"@{path}") == {A, B}
    gw = make_gateway(settings.with_overrides(api_keys=f"@{path}"))
    assert gw.client.simulate_get("/api/filters", headers=bearer(B)).status_code == 200
    assert gw.client.simulate_get("/api/filters", headers=bearer("# the")).status_code == 401
    with pytest.raises(ConfigError, match="API_KEYS"):
        load_keys(f"@{tmp_path / 'missing'}")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_loopback_needs_no_keys(settings: Settings, host: str) -> None:
    check_exposure(settings.with_overrides(gateway_host=host))


def test_beyond_loopback_needs_keys_or_insecure(settings: Settings) -> None:
    exposed = settings.with_overrides(gateway_host="0.0.0.0")
    with pytest.raises(ConfigError, match="IMGPIPE_API_KEYS.*--insecure"):
        check_exposure(exposed)
    check_exposure(exposed.with_overrides(insecure=True))
    check_exposure(exposed.with_overrides(api_keys=A))
    with pytest.raises(ConfigError, match="IMGPIPE_API_KEYS"):
        check_exposure(exposed.with_overrides(api_keys=" , "))
    with pytest.raises(ConfigError, match="key file"):
        check_exposure(settings.with_overrides(api_keys="@/nonexistent/keys"))


@pytest.mark.parametrize("command", ["gateway", "up"])
def test_the_commands_refuse_to_start_beyond_loopback(settings: Settings, command: str) -> None:
    out = subprocess.run([sys.executable, "-m", "imgpipe", command, "--gateway-host",
                          "0.0.0.0"], env=settings_env(settings), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "IMGPIPE_API_KEYS" in out.stderr and "--insecure" in out.stderr


def test_clients_send_the_key_from_the_environment() -> None:
    assert client_headers({"IMGPIPE_API_KEY": A}) == bearer(A)
    assert client_headers({}) == {}
    assert Settings.from_env({"IMGPIPE_API_KEY": A}) == Settings()  # a client's, not a setting


def test_config_never_shows_the_keys() -> None:
    shown = {d["variable"]: d["value"] for d in
             Settings(api_keys=A, admin_key=B).describe()}
    assert shown["IMGPIPE_API_KEYS"] == shown["IMGPIPE_ADMIN_KEY"] == "(set)"


def test_an_old_database_gains_the_owner_column(tmp_path: Path) -> None:
    tmp_path.mkdir(exist_ok=True)
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    db.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, created REAL NOT NULL, finished REAL,"
               " state TEXT NOT NULL, total INTEGER NOT NULL, done INTEGER NOT NULL DEFAULT 0,"
               " failed INTEGER NOT NULL DEFAULT 0)")
    db.execute("INSERT INTO jobs (id, created, state, total) VALUES"
               " ('0b7d2a1e-3c4f-4a5b-8c6d-7e8f9a0b1c2d', 1.0, 'queued', 0)")
    db.commit()
    db.close()
    store = Store(tmp_path)
    try:
        assert store.job("0b7d2a1e-3c4f-4a5b-8c6d-7e8f9a0b1c2d").owner is None
        Store(tmp_path).close()  # a second open finds the column there
        check = sqlite3.connect(tmp_path / "jobs.sqlite3")
        try:
            names = {r[1] for r in check.execute("PRAGMA index_list(jobs)")}
        finally:
            check.close()
        assert "jobs_owner" in names
    finally:
        store.close()


def test_openapi_documents_the_bearer_scheme_and_the_new_statuses(gateway: Any) -> None:
    spec = gateway.client.simulate_get("/openapi.json").json
    assert spec["components"]["securitySchemes"]["bearer"] == {
        **spec["components"]["securitySchemes"]["bearer"], "type": "http", "scheme": "bearer"}
    for path, item in spec["paths"].items():
        for op in item.values():
            assert ("401" in op["responses"]) == path.startswith("/api/"), path
            assert ("security" in op) == path.startswith("/api/"), path
    process = spec["paths"]["/api/process/"]["post"]["responses"]
    assert "Retry-After" in process["429"]["headers"]
    assert "job_too_expensive" in process["413"]["description"]
