from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imgpipe.filters import REGISTRY
from imgpipe.filters.testing import enable_test_filters
from imgpipe.workers.pool import FilterPool
from imgpipe.workers.shm import BufferSet


@pytest.fixture
def test_filters() -> Iterator[None]:
    """``crash`` and ``sleep`` registered in this process for one test, then removed
    (so no other test that walks the registry ever runs ``crash``)."""
    added = [name for name in ("crash", "sleep") if name not in REGISTRY]
    enable_test_filters()
    yield
    for name in added:
        REGISTRY.pop(name, None)


@pytest.fixture(scope="module")
def pool() -> Iterator[FilterPool]:
    """One filter process with the test filters, shared by a module's tests."""
    p = FilterPool(1, test_hooks=True)
    yield p
    p.close()


@pytest.fixture
def buffers() -> Iterator[BufferSet]:
    bs = BufferSet(2)
    yield bs
    bs.close()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``tmpfs("40m")`` mounts a tmpfs of that size under ``tmp_path`` (a small /dev/shm,
    as a container has) and returns it; unmounted at teardown. Skips without root or
    when this host does not allow the mount."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        target = tmp_path / f"shm{len(mounted)}"
        target.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=1777",
                               "tmpfs", str(target)], capture_output=True, text=True,
                              timeout=30)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        # Lazily if a process still maps a file there; the mount goes with the last one.
        if subprocess.run(["umount", str(target)], capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", str(target)], check=True, timeout=30)
