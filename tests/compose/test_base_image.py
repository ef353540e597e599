"""compose/base-image.sh picks the Debian mirror this host's apt uses (no engine needed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.compose.files import COMPOSE_DIR

SCRIPT = COMPOSE_DIR / "base-image.sh"
DEB822 = """\
Types: deb
URIs: http://security.mirror.test/debian-security
Suites: bookworm-security
Components: main

Types: deb
URIs: http://mirror.test/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
ONE_LINE = """\
# a comment
deb-src http://src.mirror.test/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://line.mirror.test/debian bookworm main
deb http://line.mirror.test/debian-security bookworm-security main
"""


def mirror(apt_dir: Path, **env: str) -> str:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    environ = {k: v for k, v in os.environ.items() if k != "DEBIAN_MIRROR"}
    proc = subprocess.run([bash, str(SCRIPT), "--print-mirror"], capture_output=True,
                          text=True, timeout=30, env={**environ, "APT_DIR": str(apt_dir), **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def apt(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "apt" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tmp_path / "apt" / "sources.list.d").mkdir(parents=True, exist_ok=True)
    return tmp_path / "apt"


def test_deb822_sources_skip_the_security_suite(tmp_path: Path) -> None:
    assert mirror(apt(tmp_path, {"sources.list.d/debian.sources": DEB822})) \
        == "http://mirror.test/debian"


def test_one_line_sources_with_options(tmp_path: Path) -> None:
    assert mirror(apt(tmp_path, {"sources.list": ONE_LINE})) == "http://line.mirror.test/debian"


def test_no_sources_falls_back_to_the_documented_default(tmp_path: Path) -> None:
    assert mirror(apt(tmp_path, {})) == "http://deb.debian.org/debian"


def test_debian_mirror_wins(tmp_path: Path) -> None:
    apt_dir = apt(tmp_path, {"sources.list": ONE_LINE})
    assert mirror(apt_dir, DEBIAN_MIRROR="http://chosen.test/debian") == "http://chosen.test/debian"
