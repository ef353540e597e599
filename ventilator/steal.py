"""Work stealing: which unclaimed tasks to send again because a worker sits idle.

A PUSH pipe parks a few tasks per connected worker — one per high-water mark on each
side, plus what the kernel buffers hold (measured in docs/pipeline.md: ~4 large tasks,
or dozens of tiny ones over ipc://). Round-robin keeps a slow worker's pipe full, so
those tasks wait for it while faster workers run dry at the end of a burst.

A task is copied when it has been unclaimed for two heartbeats and a worker that
could take it reported itself fully idle at least one beat after it was sent — proof
that it went to somebody else's pipe. At most as many copies as idle slots go out per
tick. The copy gets ``attempt + 1`` and the first result wins at the sink; a copy is
not a loss, and a task on its last attempt is never copied, so stealing can cost
duplicate work but can never fail an output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from imgpipe.ventilator.registry import CLASSES

if TYPE_CHECKING:
    from imgpipe.ventilator.dispatcher import Dispatcher, Entry


def stealable(d: Dispatcher, now: float) -> list[Entry]:
    idle_since: dict[str, float] = {}  # socket -> latest beat of a fully idle worker on it
    budget = dict.fromkeys(CLASSES, 0)  # socket -> idle slots behind it
    for w in d.registry.alive():
        for sock in CLASSES:
            if not w.serves(sock) or w.hb.free <= 0:
                continue
            budget[sock] += w.hb.free
            if w.hb.free >= w.hb.slots:
                idle_since[sock] = max(idle_since.get(sock, 0.0), w.seen)
    chosen = []
    for e in sorted(d.entries.values(), key=lambda e: e.dispatched_at):
        sock = e.sock
        if (e.state != "inflight" or e.worker is not None or e.note
                or e.attempt >= d.max_attempts or sock not in idle_since
                or budget[sock] <= 0 or now - e.dispatched_at < 2 * d.beat_s
                or idle_since[sock] < e.dispatched_at + d.beat_s or d.has_work(sock)):
            continue
        budget[sock] -= 1
        chosen.append(e)
    return chosen
