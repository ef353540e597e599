"""`make scale N=5` and `make compose-up` print commands that match the compose file and CLI.

``make -n`` shows what the targets would run without running anything, so the check
needs neither Docker nor a running stack.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess

import pytest

from tests.compose.files import (
    COMPOSE_FILE,
    MULTIHOST_FILE,
    ROOT,
    load_yaml,
    module_exists,
    parse_command,
)

SERVICES = load_yaml(COMPOSE_FILE)["services"]


def dry_run(*args: str) -> str:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    proc = subprocess.run([make, "-n", "--no-print-directory", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def compose_commands(text: str) -> list[list[str]]:
    """Every `docker compose ...` (v2) or `docker-compose ...` (v1) command in the dry run,
    split into words, the v1 name spelled as v2's."""
    found = re.findall(r"docker[ -]compose [^;\n\\)\"]*", text)
    return [[w for w in shlex.split(cmd.replace("docker-compose", "docker compose", 1))
             if not re.match(r"\d?>", w)] for cmd in found]


def check_compose_call(words: list[str]) -> dict[str, str]:
    """The -f file is ours and exists; returns the -f/-p options."""
    opts: dict[str, str] = {}
    for flag in ("-f", "-p"):
        assert flag in words, f"{' '.join(words)}: no {flag}"
        opts[flag] = words[words.index(flag) + 1]
    assert (ROOT / opts["-f"]).resolve() == COMPOSE_FILE
    return opts


def scale_of(words: list[str]) -> dict[str, int]:
    return {s.split("=")[0]: int(s.split("=")[1])
            for i, s in enumerate(words) if i and words[i - 1] == "--scale"}


def test_scale_uses_compose_when_a_stack_runs_else_the_local_stack() -> None:
    out = dry_run("scale", "N=5")
    calls = compose_commands(out)
    ups = [w for w in calls if "up" in w]
    assert len(ups) == 1, out
    up = ups[0]
    check_compose_call(up)
    assert scale_of(up) == {"worker": 5} and "worker" in SERVICES
    assert "--no-recreate" in up, "scaling must not restart the running workers"
    assert "-d" in up
    probes = [w for w in calls if "ps" in w]
    assert probes and all(check_compose_call(p) == check_compose_call(up) for p in probes), \
        "the 'is a stack running' probe must ask the same project"
    local = re.search(r"(\S*imgpipe) (scale [^;\n]+)", out)
    assert local, f"no local `imgpipe scale` branch in:\n{out}"
    argv = local.group(2).split()
    assert argv == ["scale", "5"]
    if module_exists("scale"):
        parse_command(argv)


def test_compose_up_builds_and_scales_the_workers() -> None:
    out = dry_run("compose-up", "N=4")
    calls = compose_commands(out)
    (build,) = [w for w in calls if "build" in w]
    (up,) = [w for w in calls if "up" in w]
    opts = check_compose_call(up)
    assert check_compose_call(build) == opts
    assert "PYTHON_IMAGE=$base" in out and "compose/base-image.sh" in out, \
        "the build's base comes from compose/base-image.sh (pulled or built locally)"
    assert "pip wheel" in out and "compose/wheelhouse" in out
    assert "-d" in up
    assert scale_of(up) == {"worker": 4}
    scale_opts = check_compose_call([w for w in compose_commands(dry_run("scale", "N=2"))
                                     if "up" in w][0])
    assert opts == scale_opts, "compose-up and scale must name the same file and project"


def test_the_project_is_a_make_variable() -> None:
    for target in ("compose-up", "scale", "compose-down"):
        for call in compose_commands(dry_run(target, "PROJECT=imgpipe-t1")):
            assert check_compose_call(call)["-p"] == "imgpipe-t1", call


def test_extra_compose_files_go_on_top() -> None:
    for target in ("compose-up", "scale", "compose-down"):
        for call in compose_commands(dry_run(target, "EXTRA_COMPOSE_FILES=compose/multihost.yml")):
            files = [call[i + 1] for i, w in enumerate(call) if w == "-f"]
            assert [(ROOT / f).resolve() for f in files] == [COMPOSE_FILE, MULTIHOST_FILE], call


def test_compose_cli_is_v2_or_v1() -> None:
    """`docker compose` where the plugin answers, else `docker-compose`, else v2's name."""
    text = (ROOT / "Makefile").read_text()
    assert "docker compose version" in text and "command -v docker-compose" in text


def test_compose_down_names_the_same_project() -> None:
    (down,) = compose_commands(dry_run("compose-down"))
    assert "down" in down and "--remove-orphans" in down
    up = [w for w in compose_commands(dry_run("compose-up")) if "up" in w][0]
    assert check_compose_call(down) == check_compose_call(up)
