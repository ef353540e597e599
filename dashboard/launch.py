"""``imgpipe dashboard``: run the Streamlit app with imgpipe's settings.

Streamlit owns its process (its server, its script threads), so this command does
not go through ``core.runtime.serve``: it validates the settings, puts them in the
environment as ``IMGPIPE_*`` variables (which ``app.py`` reads with
``Settings.from_env()``) and replaces itself with ``streamlit run``. A supervisor's
SIGTERM then reaches Streamlit directly, and Streamlit stops cleanly on it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from imgpipe.core.config import Settings, add_settings_args, settings_from_args
from imgpipe.core.errors import ConfigError

APP = Path(__file__).with_name("app.py")


def streamlit_command(settings: Settings) -> list[str]:
    """The ``streamlit run`` command line for ``settings`` (the HTTP side of it)."""
    return [sys.executable, "-P", "-m", "streamlit", "run", str(APP),
            "--server.port", str(settings.dashboard_port),
            "--server.address", settings.gateway_host,
            "--server.headless", "true",
            "--server.fileWatcherType", "none",
            "--server.runOnSave", "false",
            "--browser.gatherUsageStats", "false",
            "--client.toolbarMode", "minimal",
            "--theme.base", "light"]


def child_env(settings: Settings, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment Streamlit's script sees: the settings. ``imgpipe`` is importable
    because it is installed; nothing is put on ``PYTHONPATH`` (a folder there could
    shadow a module)."""
    env = dict(os.environ if environ is None else environ)
    env.update(settings.to_env())
    env.setdefault("STREAMLIT_BROWSER_GATHER_USAGE_STATS", "false")
    return env


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="imgpipe dashboard", description=__doc__.split("\n")[0])
    add_settings_args(parser, "dashboard_port", "gateway_host", "gateway_url",
                      "dashboard_bus_endpoint", "data_dir", "bind_host", "log_level")
    parser.add_argument("--print-command", action="store_true",
                        help="print the streamlit command instead of running it")
    ns = parser.parse_args(list(argv))
    try:
        settings = settings_from_args(ns)
    except ConfigError as exc:
        print(f"imgpipe dashboard: {exc}", file=sys.stderr)
        return 2
    cmd = streamlit_command(settings)
    if ns.print_command:
        print(" ".join(cmd))
        return 0
    sys.stdout.flush()
    os.execve(sys.executable, cmd, child_env(settings))
    return 0  # not reached
