"""The ventilator's lease as a state machine: clocks and store answers passed in."""

from __future__ import annotations

from imgpipe.core.records import Lease
from imgpipe.ventilator.tenure import Tenure


def test_a_tenure_is_valid_until_the_ttl_less_a_margin_from_the_renews_start() -> None:
    t = Tenure("a", 6.0)
    assert t.role == "standby" and not t.valid(0.0)
    assert t.answered(1, started=10.0, wall=1000.0, previous=None) == "took"
    assert t.active and t.valid(10.0) and t.valid(15.3) and not t.valid(15.4)
    assert t.next_try == 12.0  # a third of the TTL
    # A renew that took long still counts from its start.
    assert t.answered(1, started=12.0, wall=1002.0, previous=None) == "renewed"
    assert t.valid(17.3) and not t.valid(17.4)


def test_a_renew_that_finds_another_holder_ends_the_tenure_at_once() -> None:
    t = Tenure("a", 6.0)
    t.answered(1, started=0.0, wall=100.0, previous=None)
    assert t.answered(None, started=2.0, wall=102.0, previous=None) == "lost"
    assert not t.active and not t.valid(2.0)
    assert t.counters["leases_lost"] == 1


def test_a_token_that_changed_under_a_holder_is_a_new_tenure() -> None:
    t = Tenure("a", 6.0)
    t.answered(1, started=0.0, wall=100.0, previous=None)
    assert t.answered(3, started=9.0, wall=109.0, previous=None) == "lost"
    assert t.active and t.token == 3 and t.counters["tenures"] == 2


def test_a_standby_retries_when_the_holders_lease_expires_and_measures_the_takeover() -> None:
    t = Tenure("b", 6.0)
    held = Lease("ventilator", "a", 4, expires=1002.5)   # a renewed at 996.5
    assert t.answered(None, started=50.0, wall=1001.0, previous=held) == "standby"
    assert t.next_try == 51.5  # when a's lease runs out, sooner than a third of the TTL
    assert t.answered(5, started=51.5, wall=1002.6, previous=held) == "took"
    assert t.takeover is not None and round(t.takeover.took_s, 3) == 6.1
    assert t.dispatched(1002.8) is t.takeover
    assert t.takeover.dispatch_s is not None and round(t.takeover.dispatch_s, 3) == 6.3
    assert t.dispatched(1002.9) is None  # only the first dispatch completes it
    values = t.metric_values()
    assert values["active"] == 1 and values["takeovers"] == 1
    assert values["takeover_dispatch_s"] == 6.3


def test_a_released_lease_or_ones_own_is_no_takeover() -> None:
    t = Tenure("b", 6.0)
    t.answered(2, started=0.0, wall=100.0, previous=Lease("ventilator", "a", 1, expires=0.0))
    assert t.takeover is None and t.counters["takeovers"] == 0
    t.drop()
    t.answered(3, started=9.0, wall=109.0, previous=Lease("ventilator", "b", 2, expires=105.0))
    assert t.takeover is None and t.counters["tenures"] == 2
