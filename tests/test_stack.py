"""The local stack as a user drives it: `imgpipe up`, `imgpipe scale`, Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from core.control import SUPERVISOR_FILE
from tests.support import settings_env, stop_stack, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def scale(stack: Any, n: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imgpipe", "scale", str(n), "--data", str(stack.settings.data_dir)],
        env=settings_env(stack.settings), capture_output=True, text=True, timeout=30)


def shm_segments(pids: set[int]) -> list[str]:
    return [name for name in os.listdir("/dev/shm")
            if name.startswith("imgpipe-") and int(name.split("-")[1]) in pids]


def test_up_then_scale_follows_the_worker_count(stack_factory: Any) -> None:
    stack = stack_factory(2)
    assert (stack.settings.data_dir / SUPERVISOR_FILE).exists()
    first = {w["id"] for w in stack.wait_workers(2)}

    done = scale(stack, 4)
    assert done.returncode == 0, done.stderr
    assert "4 worker(s)" in done.stdout
    assert first <= {w["id"] for w in stack.wait_workers(4)}  # scaling up keeps the old ones

    done = scale(stack, 1)
    assert done.returncode == 0, done.stderr
    stack.wait_workers(1)


def test_scale_without_a_stack_says_so(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "imgpipe", "scale", "3", "--data",
                           str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "no local stack runs" in done.stderr


def test_stop_leaves_no_process_and_no_shared_memory(stack_factory: Any) -> None:
    stack = stack_factory(2)
    sup = psutil.Process(stack.proc.pid)
    family = {p.pid for p in sup.children(recursive=True)}
    assert len(family) >= 5  # ventilator, sink, gateway (+ its workers), 2 workers
    stack.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    assert stop_stack(stack) == 0
    alive = [p for p in family if psutil.pid_exists(p)
             and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left running: {alive}"
    assert not shm_segments(family)
    assert not (stack.settings.data_dir / SUPERVISOR_FILE).exists()


def test_a_killed_child_is_restarted(stack_factory: Any) -> None:
    stack = stack_factory(1)
    old = stack.wait_workers(1)[0]
    os.kill(old["pid"], signal.SIGKILL)

    def replaced() -> bool:
        ws = stack.workers()
        return len(ws) == 1 and ws[0]["pid"] != old["pid"]

    wait_for(replaced, 60, interval=0.3, what="a new worker after SIGKILL")
    assert not shm_segments({old["pid"]})
