"""The store's fence, not the timer: a ventilator that believes it still holds the
lease (its clock missed a pause) is refused by the job store and stands by."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from imgpipe.core.protocol import Heartbeat
from imgpipe.core.sockets import make_socket
from imgpipe.core.store import Store
from imgpipe.ventilator.service import Ventilator
from tests.support import make_settings, wait_for
from tests.ventilator.procs import make_job


@pytest.mark.timeout(60)
def test_a_ventilator_fooled_by_its_clock_is_refused_by_the_store(
        tmp_path: Path, zctx: zmq.Context[Any], store_url: str) -> None:
    settings = dataclasses.replace(
        make_settings(tmp_path / "data", dashboard_bus_endpoint="", store_url=store_url),
        ventilator_lease_s=2.0)
    store = Store.from_settings(settings)
    vent = Ventilator(settings, zctx)
    pull = make_socket(zctx, zmq.PULL, settings, connect=settings.light_task_endpoint)
    try:
        vent.hold_lease()
        assert vent.tenure.active and vent.tenure.token == 1
        # The fault: a timer that never notices the pause.
        vent.tenure.valid = lambda _mono: vent.tenure.token is not None  # type: ignore[method-assign]
        job = make_job(store, 1, ["resize:w=64"])
        vent.rescan(time.time())
        now = time.time()
        vent.disp.on_heartbeat(Heartbeat(worker="w1", host="h", pid=1, seq=1, ts=now,
                                         slots=2, free=2), now)
        wait_for(lambda: int(vent.tasks["light"].getsockopt(zmq.EVENTS)) & zmq.POLLOUT, 10,
                 what="the task socket connected")
        # Meanwhile the lease expired and another ventilator took it.
        assert store.acquire_lease("ventilator", "other", 60.0, now=now + 3) == 2
        vent.dispatch()
        assert not vent.tenure.active and vent.tenure.counters["fenced"] == 1
        assert not vent.disp.entries, "a fenced ventilator keeps nothing to dispatch"
        assert not pull.poll(200, zmq.POLLIN), "a task went out under a stale token"
        out = store.job(job).outputs[0]
        assert (out.state, out.attempts) == ("queued", 0)
    finally:
        pull.close(linger=0)
        vent.close()
        store.close()
