"""Reading the delivery files the way Docker does, for the static tests beside this file.

No Docker engine runs where the tests run, so the compose files and the Dockerfile are
parsed here and cross-checked against the code they start: the settings, the CLI
table and each subcommand's own argument parser.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import yaml

from imgpipe.cli import COMMANDS
from imgpipe.core.config import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
MULTIHOST_FILE = COMPOSE_DIR / "multihost.yml"
HA_FILE = COMPOSE_DIR / "ha.yml"
DOCKERFILE = COMPOSE_DIR / "Dockerfile"
SCHEMA = ROOT.parent / "shared/data/compose-spec.schema.json"

# Which process binds each endpoint (DESIGN.md: stable nodes bind, dynamic nodes connect).
BINDER = {"intake_endpoint": "ventilator", "light_task_endpoint": "ventilator",
          "heavy_task_endpoint": "ventilator", "control_endpoint": "ventilator",
          "bus_endpoint": "ventilator", "result_endpoint": "sink", "event_endpoint": "sink",
          "dashboard_bus_endpoint": "dashboard"}
ENDPOINTS = tuple(f.name for f in dataclasses.fields(Settings) if f.name.endswith("_endpoint"))


def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} is not a mapping"
    return data


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's ``environment`` (mapping or list form) as strings, as Compose passes it."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def interpolate(value: str, environ: dict[str, str] | None = None) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR-default}`` substitution."""
    env = environ or {}

    def one(m: re.Match[str]) -> str:
        name, op, default = m.group(1), m.group(2), m.group(3) or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        assert name in env, f"${{{name}}} has no default"
        return env[name]

    return re.sub(r"\$\{(\w+)(?:(:?-)([^}]*))?\}", one, value)


def size_bytes(value: str | int) -> int:
    """A Compose byte size (``1g``, ``512m``, ``64000000``) in bytes."""
    m = re.fullmatch(r"(\d+)([bkmg]?)b?", str(value).lower())
    assert m, f"bad size {value!r}"
    return int(m.group(1)) * 1024 ** "bkmg".index(m.group(2) or "b")


def published(service: dict[str, Any],
              environ: dict[str, str] | None = None) -> list[tuple[int, int]]:
    """(published, target) for each port of a service, short or long syntax, with the
    file's ``${VAR:-default}`` resolved against ``environ`` (empty: the defaults)."""
    out = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            out.append((int(interpolate(str(port["published"]), environ)),
                        int(port["target"])))
            continue
        spec = interpolate(str(port), environ).split("/")[0]
        parts = spec.split(":")
        assert len(parts) in (2, 3), f"publish {port!r} as [ADDR:]HOST:CONTAINER"
        out.append((int(parts[-2]), int(parts[-1])))
    return out


def publish_addresses(service: dict[str, Any],
                      environ: dict[str, str] | None = None) -> list[str]:
    """The host address each short-syntax port binds ("" for every interface)."""
    out = []
    for port in service.get("ports") or []:
        parts = interpolate(str(port), environ).split("/")[0].split(":")
        out.append(parts[0] if len(parts) == 3 else "")
    return out


def endpoint_port(url: str) -> int:
    match = re.fullmatch(r"tcp://([^:/]+):(\d+)", url)
    assert match, f"{url} is not tcp://host:port"
    return int(match.group(2))


def endpoint_host(url: str) -> str:
    match = re.fullmatch(r"tcp://([^:/]+):(\d+)", url)
    assert match, f"{url} is not tcp://host:port"
    return match.group(1)


# --- subcommand parsers ---------------------------------------------------------------------
class Parsed(Exception):
    """Raised in place of running a subcommand once its arguments parsed."""

    def __init__(self, ns: argparse.Namespace) -> None:
        super().__init__("parsed")
        self.ns = ns


def parse_command(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``imgpipe ARGV`` with the subcommand's own parser, without running it.

    The subcommand's ``main`` builds its parser as it likes; ``parse_args`` is wrapped
    so the first successful parse stops it. A flag the parser refuses raises
    SystemExit, which a test reports as a broken command line.
    """
    name, rest = argv[0], list(argv[1:])
    assert name in COMMANDS, f"`imgpipe {name}` is not a command (see imgpipe/cli.py)"
    module, func, _ = COMMANDS[name]
    entry = getattr(importlib.import_module(module), func)
    real = argparse.ArgumentParser.parse_args

    def stop_after_parse(self: argparse.ArgumentParser, args: Any = None,
                         namespace: Any = None) -> argparse.Namespace:
        ns = real(self, args, namespace)
        # argparse accepts unambiguous prefixes; a file must spell a flag in full.
        spelled = [a.split("=")[0] for a in (args or []) if a.startswith("--")]
        abbreviated = [a for a in spelled if a not in self._option_string_actions]
        assert not abbreviated, f"`imgpipe {name}`: not a full flag name: {abbreviated}"
        raise Parsed(ns)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", stop_after_parse):
        try:
            entry(rest)
        except Parsed as done:
            return done.ns
    raise AssertionError(f"`imgpipe {name}` ran without parsing its arguments")


def module_exists(command: str) -> bool:
    return importlib.util.find_spec(COMMANDS[command][0]) is not None


# --- Dockerfile -----------------------------------------------------------------------------
@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def exec_form(self) -> list[str]:
        """The JSON (exec) form of ENTRYPOINT/CMD/HEALTHCHECK CMD; shell form fails."""
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(a, str) for a in value), self
        return value


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARGs with defaults, stages): joins continuations, drops comments."""
    instructions: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append(Instruction(keyword.upper(), rest.strip(), start))
    assert not pending, "the Dockerfile ends inside a continued line"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = ins.args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(words[0], name, []))
        elif not stages and ins.keyword == "ARG":
            key, _, default = ins.args.partition("=")
            global_args[key] = default
        else:
            assert stages, f"{ins.keyword} before the first FROM (line {ins.line})"
            stages[-1].instructions.append(ins)
    return global_args, stages


def env_of(stage: Stage) -> dict[str, str]:
    """The ENV a stage sets (``KEY=value`` pairs, shell-quoted values allowed)."""
    env: dict[str, str] = {}
    for ins in stage.all("ENV"):
        for word in shlex.split(ins.args):
            key, sep, value = word.partition("=")
            assert sep, f"ENV {word!r}: use KEY=value (line {ins.line})"
            env[key] = value
    return env


def healthcheck_options(ins: Instruction) -> tuple[dict[str, str], list[str]]:
    """(options such as interval/timeout, the CMD exec form) of a HEALTHCHECK."""
    options: dict[str, str] = {}
    rest = ins.args
    while rest.startswith("--"):
        word, _, rest = rest.partition(" ")
        key, _, value = word[2:].partition("=")
        options[key] = value
        rest = rest.strip()
    keyword, _, form = rest.partition(" ")
    assert keyword.upper() == "CMD", f"HEALTHCHECK must run CMD, got {rest!r}"
    return options, Instruction("CMD", form.strip(), ins.line).exec_form()


def seconds(duration: str) -> float:
    """A Docker duration such as ``10s``, ``1m30s`` or ``500ms`` in seconds."""
    total = 0.0
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    for number, unit in parts:
        total += float(number) * units[unit]
    return total
