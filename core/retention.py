"""The data dir's lifecycle: finished jobs expire, a byte budget evicts the oldest,
crash leftovers are swept.

:func:`sweep` is one pass, socket-free; the sink runs it every ``sweep_interval_s``
(it is the one process that writes outputs, so nothing it sweeps is being written by
another), and the gateway calls :func:`make_room` before it accepts an upload. Both
work in bounded batches, so a pass after a long pause never stalls its caller for
long; what is left waits for the next pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from imgpipe.core.config import Settings
from imgpipe.core.store import Store

log = logging.getLogger(__name__)

BATCH = 200          # jobs dropped per query
MAX_BATCHES = 10     # per pass: at most BATCH x MAX_BATCHES jobs
LEFTOVER_GRACE_S = 600.0  # a file no job owns is a leftover once this old
LEFTOVER_EVERY_S = 600.0  # how often the leftover walk runs: it lists every job's folder


@dataclass
class Swept:
    """What one pass did."""

    expired: int = 0
    evicted: int = 0
    freed: int = 0
    leftovers: int = 0


def sweep(store: Store, settings: Settings, now: float, *, leftovers: bool = True) -> Swept:
    """Expire jobs past the TTL, evict past the byte budget, and (with ``leftovers``)
    remove what crashes left. Expiry and eviction are indexed queries, cheap every pass;
    the leftover walk lists every job folder, so callers run it less often."""
    out = Swept()
    if settings.job_ttl_s > 0:
        for _ in range(MAX_BATCHES):
            ids = store.finished_jobs(before=now - settings.job_ttl_s, limit=BATCH)
            if not ids:
                break
            out.freed += store.drop_jobs(ids, why="expired", now=now)
            out.expired += len(ids)
    evicted, freed = make_room(store, settings, now)
    out.evicted, out.freed = evicted, out.freed + freed
    if leftovers:
        out.leftovers = store.sweep_leftovers(older_than=now - LEFTOVER_GRACE_S)
    if out.expired or out.evicted or out.leftovers:
        log.info("retention: %d job(s) expired, %d evicted, %d leftover(s) swept, %d bytes "
                 "freed", out.expired, out.evicted, out.leftovers, out.freed)
    return out


def make_room(store: Store, settings: Settings, now: float) -> tuple[int, int]:
    """Evict the oldest finished jobs, one at a time, until the data dir is within
    ``max_data_bytes``; (jobs evicted, bytes freed). Whether that was enough is
    :func:`over_budget`'s to say."""
    evicted = freed = 0
    if not settings.max_data_bytes:
        return 0, 0
    for _ in range(BATCH * MAX_BATCHES):
        if not over_budget(store, settings):
            break
        ids = store.finished_jobs(limit=1)
        if not ids:
            break
        freed += store.drop_jobs(ids, why="evicted", now=now)
        evicted += 1
    return evicted, freed


def over_budget(store: Store, settings: Settings) -> bool:
    return bool(settings.max_data_bytes) and store.totals().bytes >= settings.max_data_bytes
