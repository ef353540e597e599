"""compose/docker-compose.yml (and multihost.yml) checked without a Docker engine.

The file must be a valid Compose file (the Compose specification's JSON schema, and
``docker stack config`` where the docker client is installed), and everything in it
must agree with the code: each IMGPIPE_* variable is a real setting, each endpoint
names the service that binds it on that setting's default port, each command and
health check parses with its subcommand's own parser.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from typing import Any

import jsonschema
import pytest

from imgpipe.cli import COMMANDS
from imgpipe.core.config import Settings
from tests.compose.files import (
    BINDER,
    COMPOSE_DIR,
    COMPOSE_FILE,
    DOCKERFILE,
    ENDPOINTS,
    MULTIHOST_FILE,
    SCHEMA,
    endpoint_host,
    endpoint_port,
    env_of,
    environment,
    interpolate,
    load_yaml,
    module_exists,
    parse_command,
    parse_dockerfile,
    publish_addresses,
    published,
    seconds,
    size_bytes,
)

DEFAULTS = Settings()
ROLES = ("gateway", "ventilator", "sink", "worker", "dashboard")
DATA_USERS = ("gateway", "ventilator", "sink")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def image_env() -> dict[str, str]:
    _, stages = parse_dockerfile(DOCKERFILE.read_text())
    return env_of(stages[-1])


def container_settings(image_env: dict[str, str], service: dict[str, Any]) -> Settings:
    """The settings a container of ``service`` builds: image ENV, then the service's."""
    env = {k: v for k, v in {**image_env, **environment(service)}.items()
           if k.startswith("IMGPIPE_")}
    return Settings.from_env(env).validate()


# --- the file is a Compose file ---------------------------------------------------------------
@pytest.fixture(scope="module")
def validator() -> Any:
    if not SCHEMA.exists():
        pytest.skip(f"the Compose JSON schema is not at {SCHEMA}; schema checks skipped")
    schema = json.loads(SCHEMA.read_text())
    # The schema names draft-07 by a URL without the trailing '#'; say it outright.
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    return cls(schema)


@pytest.mark.parametrize("path", [COMPOSE_FILE, MULTIHOST_FILE,
                                  COMPOSE_FILE.with_name("small-workers.yml")],
                         ids=lambda p: p.name)
def test_validates_against_the_compose_spec_schema(validator: Any, path: Any) -> None:
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in validator.iter_errors(load_yaml(path))]
    assert not errors, "\n".join(errors)


def test_the_schema_check_catches_mistakes(validator: Any, compose: dict[str, Any]) -> None:
    """Guard against a validator that accepts anything (e.g. a schema that did not load)."""
    for breakage in (lambda c: c["services"]["worker"].update(replicas=3),
                     lambda c: c["services"]["gateway"].update(ports="8000:8000"),
                     lambda c: c["services"]["worker"]["deploy"].update(replicas=[3]),
                     lambda c: c["services"]["sink"]["healthcheck"].update(test=42)):
        broken = copy.deepcopy(compose)
        breakage(broken)
        assert list(validator.iter_errors(broken)), "a broken file passed the schema"


@pytest.mark.parametrize("files", [[COMPOSE_FILE], [COMPOSE_FILE, MULTIHOST_FILE]],
                         ids=["base", "multihost"])
def test_docker_stack_loader_accepts_it(files: list[Any]) -> None:
    """The docker client's own stack loader (v3 schema, no engine needed)."""
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client on PATH; `docker stack config` not run")
    args = [docker, "stack", "config"]
    for f in files:
        args += ["-c", str(f)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=COMPOSE_DIR)
    if "unknown command" in proc.stderr or "is not a docker command" in proc.stderr:
        pytest.skip("this docker client has no `stack config`")
    assert proc.returncode == 0, proc.stderr
    merged = proc.stdout
    assert "IMGPIPE_LIGHT_TASK_ENDPOINT: tcp://ventilator:5551" in merged


def test_services_are_the_roles(services: dict[str, Any]) -> None:
    assert sorted(services) == sorted(ROLES)


# --- settings ---------------------------------------------------------------------------------
@pytest.mark.parametrize("role", ROLES)
def test_every_variable_is_a_valid_setting(role: str, services: dict[str, Any],
                                           image_env: dict[str, str]) -> None:
    env = environment(services[role])
    assert env, f"{role} sets no environment"
    assert all(k.startswith("IMGPIPE_") for k in env), f"{role}: only IMGPIPE_* settings"
    container_settings(image_env, services[role])  # raises on an unknown or bad variable


@pytest.mark.parametrize("role", ROLES)
def test_every_endpoint_names_its_binder_on_the_default_port(role: str,
                                                             services: dict[str, Any],
                                                             image_env: dict[str, str]
                                                             ) -> None:
    assert sorted(BINDER) == sorted(ENDPOINTS), "a new endpoint setting: add it to BINDER"
    env = environment(services[role])
    settings = container_settings(image_env, services[role])
    for name in ENDPOINTS:
        var = "IMGPIPE_" + name.upper()
        assert var in env, f"{role} leaves {var} at its loopback default"
        url = getattr(settings, name)
        assert endpoint_host(url) == BINDER[name], f"{role}: {var}={url}"
        assert endpoint_port(url) == endpoint_port(getattr(DEFAULTS, name)), f"{role}: {var}"
    assert settings.bind_host == "0.0.0.0", f"{role} must bind every interface in a container"
    assert settings.gateway_url == f"http://gateway:{DEFAULTS.gateway_port}"


def test_the_http_servers_listen_on_every_interface(services: dict[str, Any],
                                                    image_env: dict[str, str]) -> None:
    for role in ("gateway", "dashboard"):  # the dashboard serves on gateway_host too
        assert container_settings(image_env, services[role]).gateway_host == "0.0.0.0"


# --- ports --------------------------------------------------------------------------------------
def test_only_the_http_ports_are_published(services: dict[str, Any],
                                           image_env: dict[str, str]) -> None:
    gw = container_settings(image_env, services["gateway"])
    dash = container_settings(image_env, services["dashboard"])
    assert gw.gateway_port == DEFAULTS.gateway_port
    assert dash.dashboard_port == DEFAULTS.dashboard_port
    assert published(services["gateway"]) == [(gw.gateway_port, gw.gateway_port)]
    assert published(services["dashboard"]) == [(dash.dashboard_port, dash.dashboard_port)]
    for role in ("ventilator", "sink", "worker"):
        assert not published(services[role]), f"{role} publishes an internal port"


def test_published_ports_and_address_are_variables_with_the_defaults(
        services: dict[str, Any]) -> None:
    """Users get 8000/8501 on every interface; tests move them to loopback ports."""
    env = {"PUBLISH_HOST": "127.0.0.1", "PUBLISH_HTTP_PORT": "18000",
           "PUBLISH_DASHBOARD_PORT": "18501"}
    assert published(services["gateway"], env) == [(18000, DEFAULTS.gateway_port)]
    assert published(services["dashboard"], env) == [(18501, DEFAULTS.dashboard_port)]
    for role in ("gateway", "dashboard"):
        assert publish_addresses(services[role]) == ["0.0.0.0"]
        assert publish_addresses(services[role], env) == ["127.0.0.1"]


def test_multihost_publishes_exactly_what_a_remote_worker_connects_to(
        services: dict[str, Any], image_env: dict[str, str]) -> None:
    """A worker connects to its task endpoints, the result endpoint and the buses."""
    extra = load_yaml(MULTIHOST_FILE)["services"]
    settings = container_settings(image_env, services["worker"])
    needed = {settings.light_task_endpoint, settings.heavy_task_endpoint,
              settings.result_endpoint, *settings.bus_endpoints}
    offered = {f"tcp://{role}:{target}" for role, svc in extra.items()
               for host_port, target in published(svc) if host_port == target}
    assert offered == needed
    assert not published(extra.get("gateway", {})) and not published(extra.get("worker", {}))


def test_the_plane_is_sealed_in_every_service(services: dict[str, Any],
                                              image_env: dict[str, str]) -> None:
    """The stable nodes bind beyond loopback, so CURVE is on everywhere: stable nodes
    (and the gateway, their same-host peer) hold the server pair and admit listed keys;
    a worker holds a client pair and never the server's secret."""
    for role, svc in services.items():
        settings = container_settings(image_env, svc)
        assert settings.curve_enabled, role
        mounts = [interpolate(str(v)).split(":") for v in svc.get("volumes", [])]
        key_dir = settings.curve_server_public_file.rsplit("/", 1)[0]
        assert [key_dir, "ro"] in [m[1:] for m in mounts], f"{role} does not mount the keys"
        if role == "worker":
            assert settings.curve_client_secret_file and not settings.curve_server_secret_file
        else:
            assert settings.curve_server_secret_file and settings.curve_authorized_dir, role


# --- volumes ------------------------------------------------------------------------------------
def test_the_data_volume_is_shared_by_the_store_users_only(compose: dict[str, Any],
                                                           services: dict[str, Any],
                                                           image_env: dict[str, str]) -> None:
    volumes = compose.get("volumes") or {}
    for role in DATA_USERS:
        data_dir = str(container_settings(image_env, services[role]).data_dir)
        mounts = [str(v).split(":") for v in services[role].get("volumes") or []]
        named = [m for m in mounts if m[0] in volumes]
        assert [m[1] for m in named] == [data_dir], f"{role} must mount the named data volume"
    sources = {str(v).split(":")[0] for r in DATA_USERS for v in services[r]["volumes"]
               if str(v).split(":")[0] in volumes}
    assert len(sources) == 1, "one volume, shared"
    for role in ("worker", "dashboard"):
        mounts = [str(v).split(":") for v in services[role].get("volumes") or []]
        assert all(m[0] not in volumes and m[-1] == "ro" for m in mounts), \
            f"{role} needs no data volume; it mounts only read-only files"


# --- commands and health checks -----------------------------------------------------------------
@pytest.mark.parametrize("role", ROLES)
def test_command_is_the_role_and_its_flags_parse(role: str, services: dict[str, Any]) -> None:
    command = services[role]["command"]
    assert isinstance(command, list) and command[0] == role, "exec form, role first"
    assert role in COMMANDS
    if not module_exists(role):
        pytest.skip(f"{COMMANDS[role][0]} is not written yet")
    parse_command(command)


def test_worker_flags_reach_the_settings(services: dict[str, Any]) -> None:
    if not module_exists("worker"):
        pytest.skip("workers.service is not written yet")
    ns = parse_command(services["worker"]["command"])
    assert ns.worker_serves in ("light", "heavy", "all")


@pytest.mark.parametrize("role", ROLES)
def test_healthcheck_probes_its_own_role(role: str, services: dict[str, Any]) -> None:
    check = services[role]["healthcheck"]
    test = check["test"]
    assert test[0] == "CMD" and test[1] == "imgpipe", "exec form of `imgpipe health`"
    ns = parse_command(test[1 + 1:])
    assert ns.role == role
    assert ns.timeout < seconds(check["timeout"]), "the probe must answer before Docker gives up"
    assert seconds(check["interval"]) >= seconds(check["timeout"])
    assert int(check["retries"]) >= 2, "one slow answer must not mark a container unhealthy"


# --- scaling and restarts -------------------------------------------------------------------------
def test_worker_shm_holds_its_slots_at_the_pixel_limit(
        services: dict[str, Any], image_env: dict[str, str]) -> None:
    """Docker's 64 MB /dev/shm would make a worker lower its slots or refuse to start."""
    from imgpipe.workers.shm import slot_bytes

    worker = services["worker"]
    settings = container_settings(image_env, worker)
    assert size_bytes(worker["shm_size"]) >= settings.worker_slots * slot_bytes(
        settings.max_pixels)


def test_worker_is_scalable(services: dict[str, Any]) -> None:
    worker = services["worker"]
    for key in ("container_name", "hostname", "ports", "expose"):
        assert key not in worker, f"worker sets {key}: two replicas would clash"
    assert all(str(v).endswith(":ro") for v in worker.get("volumes", [])), \
        "a worker's mounts are read-only, shared by its replicas"
    deploy = worker["deploy"]
    assert int(deploy["replicas"]) >= 1
    limits = deploy["resources"]["limits"]
    assert float(limits["cpus"]) > 0 and str(limits["memory"])[-1] in "GM"


@pytest.mark.parametrize("role", ROLES)
def test_every_service_restarts_and_stops_gracefully(role: str,
                                                     services: dict[str, Any]) -> None:
    svc = services[role]
    assert svc["restart"] in ("unless-stopped", "always"), "compose restarts it"
    assert svc["deploy"]["restart_policy"]["condition"] == "any", "swarm restarts it"
    assert svc.get("init") is True, "an init reaps the process pool's and gunicorn's children"
    assert "container_name" not in svc, "stack deploy and scaling name containers themselves"
    assert "image" in svc and (svc["image"] == services["gateway"]["image"]), "one image"
    if "stop_grace_period" in svc:
        assert seconds(svc["stop_grace_period"]) >= 10


def test_one_service_builds_the_image(services: dict[str, Any]) -> None:
    builders = {role: s["build"] for role, s in services.items() if "build" in s}
    assert list(builders) == ["gateway"]
    build = builders["gateway"]
    assert (COMPOSE_DIR / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE


def test_the_build_base_defaults_to_the_dockerfiles(services: dict[str, Any]) -> None:
    """`make image` passes PYTHON_IMAGE (pulled, or built by compose/base-image.sh)."""
    args, _ = parse_dockerfile(DOCKERFILE.read_text())
    build_arg = services["gateway"]["build"]["args"]["PYTHON_IMAGE"]
    assert build_arg == "${PYTHON_IMAGE:-" + args["PYTHON_IMAGE"] + "}"


def test_stable_nodes_share_the_data_node_under_swarm(services: dict[str, Any]) -> None:
    """SQLite WAL needs one kernel: gateway, ventilator and sink are placed together."""
    placements = [services[r]["deploy"]["placement"]["constraints"] for r in DATA_USERS]
    assert all(p == placements[0] and p for p in placements)
    assert "placement" not in services["worker"]["deploy"]
