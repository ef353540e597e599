"""compose/ha.yml checked without a Docker engine (tests/compose/test_engine_ha.py runs it).

A valid Compose file whose settings are real settings; every endpoint lists both peers
of its kind by the fixed address each one has on the project network; PostgreSQL and
the ZeroMQ plane are not published, only the load balancer (and the dashboard); the
balancer lists every gateway; the store URL names the database the db service makes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

import jsonschema
import pytest

from imgpipe.core.config import Settings, endpoints
from tests.compose.files import (
    BINDER,
    DOCKERFILE,
    ENDPOINTS,
    HA_FILE,
    SCHEMA,
    endpoint_host,
    endpoint_port,
    env_of,
    environment,
    interpolate,
    load_yaml,
    parse_command,
    parse_dockerfile,
    publish_addresses,
    published,
)

DEFAULTS = Settings()
PAIRS = {"ventilator": ("ventilator1", "ventilator2"), "sink": ("sink1", "sink2"),
         "dashboard": ("dashboard",)}
IMGPIPE = ("gateway1", "gateway2", "ventilator1", "ventilator2", "sink1", "sink2", "worker",
           "dashboard")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(HA_FILE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def settings_of(service: dict[str, Any], environ: dict[str, str] | None = None) -> Settings:
    """What a container of ``service`` builds: the image's ENV, then the service's, with
    the file's ``${VAR:-default}`` resolved against ``environ`` (empty: the defaults)."""
    _, stages = parse_dockerfile(DOCKERFILE.read_text())
    env = {**env_of(stages[-1]),
           **{k: interpolate(v, environ) for k, v in environment(service).items()}}
    return Settings.from_env({k: v for k, v in env.items() if k.startswith("IMGPIPE_")}
                             ).validate()


def address(service: dict[str, Any], environ: dict[str, str] | None = None) -> str:
    return interpolate(service["networks"]["default"]["ipv4_address"], environ)


def test_validates_against_the_compose_spec_schema(compose: dict[str, Any]) -> None:
    if not SCHEMA.exists():
        pytest.skip(f"the Compose JSON schema is not at {SCHEMA}")
    schema = json.loads(SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in cls(schema).iter_errors(compose)]
    assert not errors, "\n".join(errors)


def test_compose_itself_reads_it() -> None:
    """`docker compose config` (v2) or `docker-compose config` (v1), no engine needed."""
    cli = None
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"],
                                                 capture_output=True, timeout=30).returncode == 0:
        cli = ["docker", "compose"]
    elif shutil.which("docker-compose"):
        cli = ["docker-compose"]
    if cli is None:
        pytest.skip("no compose client installed")
    proc = subprocess.run([*cli, "-f", str(HA_FILE), "config", "-q"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", IMGPIPE)
def test_every_variable_is_a_valid_setting_and_the_store_is_the_db(
        name: str, services: dict[str, Any]) -> None:
    settings = settings_of(services[name])
    assert settings.store_url == "postgresql://imgpipe:imgpipe@db:5432/imgpipe"
    db = environment(services["db"])
    assert settings_of(services[name], {"DB_PASSWORD": "s3cret"}).store_url == \
        f"postgresql://{db['DB_USER']}:s3cret@db:5432/{db['DB_NAME']}"


@pytest.mark.parametrize("name", IMGPIPE)
def test_every_endpoint_lists_each_binder_by_its_fixed_address(
        name: str, services: dict[str, Any]) -> None:
    environ = {"HA_NET": "10.1.2"}
    settings = settings_of(services[name], environ)
    for setting in ENDPOINTS:
        entries = endpoints(getattr(settings, setting))
        binders = PAIRS[BINDER[setting]]
        assert [endpoint_host(e) for e in entries] == \
            [address(services[b], environ) for b in binders], f"{name}: {setting}"
        assert {endpoint_port(e) for e in entries} == \
            {endpoint_port(getattr(DEFAULTS, setting))}, f"{name}: {setting}"
    assert settings.bind_host == "0.0.0.0"


def test_the_fixed_addresses_are_in_the_project_subnet(compose: dict[str, Any]) -> None:
    (subnet,) = compose["networks"]["default"]["ipam"]["config"]
    prefix = interpolate(subnet["subnet"]).removesuffix(".0/24")
    holders = [s for s in compose["services"].values() if "networks" in s]
    addresses = [address(s) for s in holders]
    assert len(set(addresses)) == len(addresses) == 5
    assert all(a.rsplit(".", 1)[0] == prefix for a in addresses)


def test_only_the_balancer_and_the_dashboard_are_published(services: dict[str, Any]) -> None:
    assert published(services["lb"]) == [(8000, 8000)]
    assert published(services["dashboard"]) == [(8501, 8501)]
    assert publish_addresses(services["lb"], {"PUBLISH_HOST": "127.0.0.1"}) == ["127.0.0.1"]
    for name, svc in services.items():
        if name not in ("lb", "dashboard"):
            assert not published(svc), f"{name} publishes a port"


def test_the_balancer_fronts_every_gateway(services: dict[str, Any]) -> None:
    backends = environment(services["lb"])["LB_BACKENDS"].split(",")
    gateways = sorted(n for n in services if n.startswith("gateway"))
    assert backends == [f"{g}:{settings_of(services[g]).gateway_port}" for g in gateways]
    assert gateways == ["gateway1", "gateway2"]


def test_gateways_ventilators_and_sinks_share_the_data_volume(services: dict[str, Any]) -> None:
    for name in ("gateway1", "gateway2", "ventilator1", "ventilator2", "sink1", "sink2"):
        assert "data:/data" in services[name]["volumes"], name
        assert services[name]["depends_on"]["db"]["condition"] == "service_healthy"
    assert "data:/data" not in services["worker"]["volumes"]


@pytest.mark.parametrize("name", IMGPIPE)
def test_commands_parse_and_every_service_is_checked_and_restarts(
        name: str, services: dict[str, Any]) -> None:
    svc = services[name]
    parse_command(svc["command"])
    role = svc["command"][0]
    assert svc["healthcheck"]["test"][:3] == ["CMD", "imgpipe", "health"]
    assert svc["healthcheck"]["test"][3] == role
    assert svc["restart"] == "unless-stopped"


def test_the_infra_services_run_unprivileged_with_their_own_checks(
        services: dict[str, Any]) -> None:
    assert services["db"]["user"] == "postgres" and services["lb"]["user"] == "haproxy"
    assert services["db"]["healthcheck"]["test"] == ["CMD", "db.sh", "check"]
    assert services["lb"]["healthcheck"]["test"] == ["CMD", "lb.sh", "check"]
    assert services["db"]["volumes"] == ["db:/var/lib/postgresql/data"]
