"""imgpipe ships as one package, and a running stack imports only that package.

The wheel holds ``imgpipe`` (its component folders reached through the symlinks
``imgpipe/core -> ../core`` and so on) and its dist-info, nothing else; and a stack
started from a folder full of look-alike packages still runs on imgpipe's own modules.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from tests.images import jpeg
from tests.support import make_settings, start_stack, stop_stack

ROOT = Path(__file__).resolve().parents[1]

# Not copied into the build tree: the venv, VCS data, caches, earlier build output.
NOT_SOURCE = shutil.ignore_patterns(".venv", ".git", "*_cache", ".hypothesis", "__pycache__",
                                    "*.pyc", "*.egg-info")
NOT_SOURCE_AT_ROOT = {"build", "dist", "data", "artifacts"}


# Files of each kind of component that must be in the wheel as regular files.
SHIPPED = ["core/store.py", "gateway/app.py", "dashboard/app.py", "workers/child.py"]

# The old top-level names, which nothing imports any more, plus names every child does
# import: imgpipe itself and pyzmq. Those two make the test fail if a child's sys.path
# starts with its working directory (child_argv without -P).
SHADOWED = ["core", "filters", "gateway", "ventilator", "workers", "sink", "dashboard",
            "bench", "imgpipe", "zmq"]


def not_source(folder: str, names: list[str]) -> set[str]:
    skip = NOT_SOURCE(folder, names)
    return skip | (NOT_SOURCE_AT_ROOT & set(names)) if Path(folder) == ROOT else skip


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wheel_holds_one_top_level_package(tmp_path: Path) -> None:
    # Built from a copy: setuptools writes build/ and *.egg-info into the tree it builds.
    # No build isolation: the dev extra installs the build requirements, nothing is fetched.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=not_source)
    out = tmp_path / "wheelhouse"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
         "--no-build-isolation", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"pip wheel failed:\n{done.stdout}\n{done.stderr}"
    [whl] = out.glob("*.whl")
    dist_info = "-".join(whl.name.split("-")[:2]) + ".dist-info"  # name-version-...whl

    with zipfile.ZipFile(whl) as zf:
        infos = {info.filename: info for info in zf.infolist()}
        assert {name.split("/")[0] for name in infos} == {"imgpipe", dist_info}
        for rel in SHIPPED:
            info = infos.get(f"imgpipe/{rel}")
            assert info is not None, f"imgpipe/{rel} is not in {whl.name}"
            mode = info.external_attr >> 16
            assert stat.S_ISREG(mode), f"imgpipe/{rel}: mode {oct(mode)}, not a regular file"
            assert zf.read(info) == (src / rel).read_bytes(), f"imgpipe/{rel} differs"
        top_level = f"{dist_info}/top_level.txt"
        if top_level in infos:
            assert zf.read(top_level).decode().split() == ["imgpipe"]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_up_ignores_packages_in_the_working_directory(tmp_path: Path) -> None:
    here = tmp_path / "cwd"
    for name in SHADOWED:
        (here / name).mkdir(parents=True)
        (here / name / "__init__.py").write_text(f"raise ImportError('shadowed: {name}')\n")
    # The supervisor runs as `python -P` there, like the `imgpipe` script: what is
    # tested is what it starts.
    stack = start_stack(make_settings(tmp_path / "stack" / "data"), 1, cwd=here)
    try:
        cwds = set()
        for child in psutil.Process(stack.proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                cwds.add(Path(child.cwd()))
        assert cwds == {here}, "the children should run in the folder of look-alikes"

        resp = httpx.post(f"{stack.url}/api/process/", params={"wait": 30},
                          files=[("image", ("in.jpg", jpeg(160, 120), "image/jpeg"))],
                          data={"ops": "resize:w=64"}, timeout=60)
        assert resp.status_code == 200, resp.text
        job = resp.json()
        assert job["state"] == "done", job
        [output] = job["outputs"]
        got = httpx.get(stack.url + output["url"], timeout=30)
        assert got.status_code == 200, got.text
        with Image.open(io.BytesIO(got.content)) as img:
            assert img.width == 64
    finally:
        code = stop_stack(stack)
    assert code == 0
    log = stack.log_path.read_text(errors="replace")
    assert "shadowed" not in log, log[-6000:]
