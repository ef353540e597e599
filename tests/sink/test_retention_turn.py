"""Several sinks on one store: one runs the retention pass at a time (a lease)."""

from __future__ import annotations

from imgpipe.core.config import Settings
from imgpipe.core.store import Store
from imgpipe.sink.service import RETENTION_LEASE, retention_turn


def test_one_sink_at_a_time_runs_retention_and_another_takes_over(store: Store) -> None:
    settings = Settings(sweep_interval_s=10.0)
    assert retention_turn(store, "sink-a", settings, now=100.0)
    assert not retention_turn(store, "sink-b", settings, now=101.0)
    assert retention_turn(store, "sink-a", settings, now=110.0)       # renewed each pass
    assert not retention_turn(store, "sink-b", settings, now=139.0)
    # sink-a died after its pass at 110: three intervals later the other leads.
    assert retention_turn(store, "sink-b", settings, now=140.5)
    assert not retention_turn(store, "sink-a", settings, now=141.0)
    assert store.release_lease(RETENTION_LEASE, "sink-b")               # a clean stop
    assert retention_turn(store, "sink-a", settings, now=142.0)
