"""Process helpers every component shares: the host's idleness and its CPUs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imgpipe.core.runtime import host_idle, usable_cpus


@pytest.mark.parametrize(("text", "idle"), [
    (b"0.52 0.61 0.70 1/812 4242\n", True),  # the caller alone
    (b"3.10 2.00 1.50 3/812 4242\n", False),  # two more threads want a CPU
    (b"garbage\n", False),
    (b"", False),
])
def test_host_idle_reads_the_runnable_count(tmp_path: Path, text: bytes, idle: bool) -> None:
    path = tmp_path / "loadavg"
    path.write_bytes(text)
    assert host_idle(str(path)) is idle


def test_host_idle_is_false_where_there_is_no_loadavg(tmp_path: Path) -> None:
    assert host_idle(str(tmp_path / "missing")) is False


@pytest.mark.parametrize(("text", "cap"), [
    (b"150000 100000\n", 2),  # --cpus=1.5: two threads' worth, rounded up
    (b"100000 100000\n", 1),
    (b"max 100000\n", None),  # no quota: the affinity alone
    (b"bogus\n", None),
])
def test_usable_cpus_is_the_affinity_capped_by_the_cgroup_quota(
        tmp_path: Path, text: bytes, cap: int | None) -> None:
    path = tmp_path / "cpu.max"
    path.write_bytes(text)
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(str(path)) == (min(affinity, cap) if cap else affinity)
    assert usable_cpus(str(tmp_path / "missing")) == affinity
