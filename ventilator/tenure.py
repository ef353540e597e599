"""The ventilator's lease: at most one ventilator dispatches, the others stand by.

The active ventilator holds the job store's named lease ``ventilator``
(:meth:`Store.acquire_lease`) and renews it every third of ``ventilator_lease_s``. It
counts its lease valid until ``ttl - margin`` after the *start* of its last successful
renew, on the monotonic clock: the store dates the expiry from a moment no earlier than
that start, so this process stops dispatching before anyone else can take the lease,
however long a renew, a pause (SIGSTOP, a frozen VM) or a partition lasted. A renew that
finds another holder ends the tenure at once. On top of the timer, every dispatch is
written with the tenure's fencing token (``Store.mark_dispatched(fence=...)``), so the
store itself refuses a holder whose token is no longer current.

A standby tries again when the holder's lease is due to expire (at most every third of
the TTL). Taking over, it measures the time since the previous holder's last renew —
its ``expires`` minus the TTL, so every ventilator must run with the same
``ventilator_lease_s`` — to the tenure's start and to its first dispatch.

Socket- and store-free: the service passes clocks and store answers in, as the
dispatcher's tests do with its ``now``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imgpipe.core.records import Lease

NAME = "ventilator"
RETRY_MIN_S = 0.05   # a standby's shortest wait between two tries


@dataclass
class Takeover:
    """One tenure that began while another holder's lease had been live."""

    token: int
    previous: str            # the previous holder
    previous_renew: float    # its last renew, epoch seconds
    took_at: float           # when this tenure began, epoch seconds
    first_dispatch_at: float | None = None

    @property
    def took_s(self) -> float:
        return self.took_at - self.previous_renew

    @property
    def dispatch_s(self) -> float | None:
        if self.first_dispatch_at is None:
            return None
        return self.first_dispatch_at - self.previous_renew

    def as_dict(self) -> dict[str, Any]:
        return {"token": self.token, "previous": self.previous,
                "previous_renew": self.previous_renew, "took_at": self.took_at,
                "took_s": round(self.took_s, 3),
                "first_dispatch_at": self.first_dispatch_at,
                "first_dispatch_s": None if self.dispatch_s is None
                else round(self.dispatch_s, 3)}


class Tenure:
    """Active (with a fencing token) or standby; what the service does next and when."""

    def __init__(self, holder: str, ttl_s: float) -> None:
        self.holder = holder
        self.ttl_s = ttl_s
        self.renew_s = ttl_s / 3
        self.margin_s = ttl_s / 10   # clock rate differences, the statement's own latency
        self.token: int | None = None
        self.valid_until = 0.0       # monotonic
        self.next_try = 0.0          # monotonic
        self.since = 0.0             # epoch seconds: this tenure's start
        self.dispatches = 0          # in this tenure
        self.last_dispatch_at = 0.0  # epoch seconds, any tenure
        self.takeover: Takeover | None = None   # the last one
        self.counters = {"tenures": 0, "takeovers": 0, "leases_lost": 0, "fenced": 0}

    @property
    def active(self) -> bool:
        return self.token is not None

    @property
    def role(self) -> str:
        return "active" if self.active else "standby"

    def valid(self, mono: float) -> bool:
        """Whether this process may dispatch now (``mono``: the monotonic clock)."""
        return self.token is not None and mono < self.valid_until

    def due(self, mono: float) -> bool:
        return mono >= self.next_try

    def answered(self, token: int | None, *, started: float, wall: float,
                 previous: Lease | None) -> str:
        """Record the store's answer to a take-or-renew begun at ``started`` (monotonic)
        and ``wall`` (epoch); ``previous`` is the lease as read before a standby's try.

        Returns ``renewed``, ``took`` (a new tenure: the caller loads the store's open
        work afresh), ``lost`` (the caller drops everything it was dispatching) or
        ``standby``.
        """
        outcome = "standby"
        if token is not None and token == self.token:
            outcome = "renewed"
        elif token is not None:
            outcome = "took" if self.token is None else "lost"  # lost, then taken again
            self.drop()
            self._begin(token, wall, previous)
        elif self.token is not None:
            outcome = "lost"
            self.drop()
        if self.token is not None:
            self.valid_until = started + self.ttl_s - self.margin_s
            self.next_try = started + self.renew_s
        else:
            wait = self.renew_s
            if previous is not None and previous.holder != self.holder:
                wait = min(wait, max(RETRY_MIN_S, previous.expires - wall))
            self.next_try = started + wait
        return outcome

    def failed(self, mono: float) -> None:
        """The store did not answer: try again soon; the timer still ends the tenure."""
        self.next_try = mono + min(self.renew_s, 0.5)

    def drop(self) -> None:
        """End the tenure: nothing more is dispatched under its token."""
        if self.token is not None:
            self.counters["leases_lost"] += 1
        self.token = None
        self.valid_until = 0.0

    def dispatched(self, wall: float) -> Takeover | None:
        """Count one dispatch; the takeover it completes, on a takeover's first."""
        self.dispatches += 1
        self.last_dispatch_at = wall
        t = self.takeover
        if self.dispatches == 1 and t is not None and t.token == self.token:
            t.first_dispatch_at = wall
            return t
        return None

    def _begin(self, token: int, wall: float, previous: Lease | None) -> None:
        self.token = token
        self.since = wall
        self.dispatches = 0
        self.counters["tenures"] += 1
        if previous is not None and previous.holder != self.holder and previous.expires > 0:
            self.counters["takeovers"] += 1
            self.takeover = Takeover(token, previous.holder,
                                     previous.expires - self.ttl_s, wall)

    def stats(self) -> dict[str, Any]:
        return {"role": self.role, "lease_token": self.token, "active_since": self.since
                if self.active else None, "last_dispatch_at": self.last_dispatch_at or None,
                "takeover": self.takeover.as_dict() if self.takeover else None,
                **self.counters}

    def metric_values(self) -> dict[str, Any]:
        t = self.takeover
        values: dict[str, Any] = {"active": int(self.active), "lease_token": self.token or 0,
                                  **self.counters}
        if t is not None:
            values["takeover_s"] = round(t.took_s, 3)
            if t.dispatch_s is not None:
                values["takeover_dispatch_s"] = round(t.dispatch_s, 3)
        return values
