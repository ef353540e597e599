"""Cost limits at the door, and per-client rate and concurrency limits.

**Cost.** From each image's header size the gateway computes every output's size
(:func:`~imgpipe.filters.chain.output_size`) and its estimated CPU time
(:func:`~imgpipe.filters.chain.estimate_ms`, weights measured per filter in
``filters/registry.py``). It answers 413:

* ``output_too_large`` when a chain would make an image over ``max_pixels``;
* ``job_too_expensive`` when one output is estimated over half of ``task_timeout_s``
  (it would overrun its deadline on a worker and be re-dispatched until it fails:
  such a chain never reaches a worker), or the whole job over ``max_job_cost``.

**Clients.** A client is its API key, or its address without keys. Two limits, each
answered 429 with ``Retry-After``:

* concurrency: at most ``client_concurrency`` of its jobs queued or running, counted
  in the shared job store (an indexed count), so it holds across gunicorn workers and
  gateways; two submits racing in different processes may both pass (a soft limit);
* rate: a token bucket of ``client_rate_per_min`` jobs per minute holding at most a
  minute's worth, kept per gunicorn worker process (N processes admit up to N times
  the rate).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from imgpipe.core.config import Settings
from imgpipe.core.store import Store
from imgpipe.filters import parse_chain
from imgpipe.filters.chain import estimate_ms, output_size
from imgpipe.gateway.errors import OutputTooLarge, TooExpensive, TooManyRequests

MAX_CLIENTS = 10_000  # buckets kept per process; full (idle) buckets go first
TASK_BUDGET = 0.5     # an output may be estimated at this share of task_timeout_s


def check_cost(sizes: list[tuple[int, int]], chains: list[str], settings: Settings) -> float:
    """The job's estimated cost in CPU seconds; 413 naming the chain when over a limit.

    ``sizes`` are the images' (width, height) from their headers, ``chains`` canonical.
    """
    budget_ms = settings.task_timeout_s * TASK_BUDGET * 1000
    total_ms = 0.0
    for c, spec in enumerate(chains):
        chain = parse_chain(spec, max_filters=settings.max_filters)
        for i, (w, h) in enumerate(sizes):
            ow, oh = output_size(chain, w, h)
            if ow * oh > settings.max_pixels:
                raise OutputTooLarge(
                    f"ops #{c + 1} {spec[:200]!r} would make image #{i + 1} ({w}x{h}) "
                    f"{ow}x{oh} ({ow * oh / 1e6:.1f} megapixels); the limit is "
                    f"{settings.max_pixels / 1e6:g}", field="ops")
            ms = estimate_ms(chain, w, h)
            if ms > budget_ms:
                raise TooExpensive(
                    f"ops #{c + 1} {spec[:200]!r} on image #{i + 1} ({w}x{h}) is estimated "
                    f"at {ms / 1000:.0f} CPU seconds, over the per-output budget of "
                    f"{budget_ms / 1000:g} s (half of IMGPIPE_TASK_TIMEOUT_S); make the "
                    f"output smaller or the chain lighter", field="ops")
            total_ms += ms
    if total_ms / 1000 > settings.max_job_cost:
        raise TooExpensive(
            f"the job is estimated at {total_ms / 1000:.0f} CPU seconds, over the limit of "
            f"{settings.max_job_cost:g} (IMGPIPE_MAX_JOB_COST); send fewer images or chains, "
            f"or smaller outputs", field="ops")
    return total_ms / 1000


class ClientLimits:
    """Per-client admission: call :meth:`admit` before reading a submit's body."""

    def __init__(self, settings: Settings, store: Store, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.rate_per_s = settings.client_rate_per_min / 60.0
        self.capacity = max(1.0, settings.client_rate_per_min)
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at)

    def _now(self) -> float:
        return self.clock()

    def admit(self, client: str) -> None:
        """429 when ``client`` has too many jobs open or no token left; else take a token."""
        open_jobs = self.store.open_jobs_of(client)
        limit = self.settings.client_concurrency
        if open_jobs >= limit:
            raise TooManyRequests(
                f"{open_jobs} of your jobs are still queued or running (limit {limit}); "
                f"retry once some finish", retry_after=2, error="too_many_jobs")
        with self._lock:
            now = self._now()
            tokens, at = self._buckets.get(client, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - at) * self.rate_per_s)
            if tokens < 1.0:
                self._buckets[client] = (tokens, now)
                wait = math.ceil((1.0 - tokens) / self.rate_per_s)
                raise TooManyRequests(
                    f"over the rate limit of {self.settings.client_rate_per_min:g} jobs per "
                    f"minute; retry in {wait} s", retry_after=wait, error="rate_limited")
            self._buckets[client] = (tokens - 1.0, now)
            if len(self._buckets) > MAX_CLIENTS:
                self._forget_full(now)

    def _forget_full(self, now: float) -> None:
        """Drop buckets that have refilled: forgetting them changes nothing."""
        for key, (tokens, at) in list(self._buckets.items()):
            if tokens + (now - at) * self.rate_per_s >= self.capacity:
                del self._buckets[key]
