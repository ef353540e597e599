"""`make scale N=5` with no compose stack running scales the local stack (issue 8), and
the container probes agree with the running stack's real gateway."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

import pytest

from imgpipe import health
from tests.compose.files import ROOT
from tests.support import settings_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_make_scale_brings_the_local_stack_to_n_workers(stack_factory: Any) -> None:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    stack = stack_factory(2)
    before = {w["id"] for w in stack.wait_workers(2)}
    # IMGPIPE_DATA_DIR tells `imgpipe scale` which stack; `-o` keeps make from
    # reinstalling the venv this test already runs in.
    env = {k: v for k, v in settings_env(stack.settings).items() if not k.startswith("MAKE")}
    env["PATH"] = os.environ.get("PATH", "")
    done = subprocess.run([make, "--no-print-directory", "-o", ".venv/.installed", "scale",
                           "N=5"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    after = stack.wait_workers(5)  # through GET /api/workers
    assert before <= {w["id"] for w in after}, "scaling up keeps the running workers"

    # The same stack, probed as its containers would be: the real gateway's /healthz.
    gateway = health.check("gateway", stack.settings, timeout=5, ready=True)
    assert gateway.ok and "gateway ready" in gateway.line, gateway.line
    worker = health.check("worker", stack.settings, timeout=5)
    assert worker.ok, worker.line
