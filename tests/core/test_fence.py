"""A dispatch written under the ventilator lease's fencing token: refused by the store
once the token is not current, on each backend."""

from __future__ import annotations

import pytest

from imgpipe.core.records import Fenced, Original, new_job_id
from imgpipe.core.store import Store


def one_output(store: Store) -> str:
    job = new_job_id()
    store.save_original(job, 0, "jpeg", b"x")
    store.create_job(job, [Original("jpeg", 1, 1, 1)], [("resize:w=1", "light")])
    return store.job(job).outputs[0].task_id


def test_a_dispatch_under_a_stale_token_is_refused(store: Store) -> None:
    tid = one_output(store)
    t0 = 1000.0
    old = store.acquire_lease("ventilator", "a", 5.0, now=t0)
    assert old == 1
    assert store.mark_dispatched(tid, 1, now=t0 + 1, fence=("ventilator", old))
    # a pauses past its expiry; b takes the lease: a's token is no longer current.
    new = store.acquire_lease("ventilator", "b", 5.0, now=t0 + 6)
    assert new == old + 1
    with pytest.raises(Fenced):
        store.mark_dispatched(tid, 2, now=t0 + 6.5, fence=("ventilator", old))
    assert store.job(tid.split(":")[0]).outputs[0].attempts == 1  # the refused write left no trace
    assert store.mark_dispatched(tid, 2, now=t0 + 7, fence=("ventilator", new))


def test_an_expired_token_is_refused_even_before_anyone_takes_over(store: Store) -> None:
    tid = one_output(store)
    token = store.acquire_lease("ventilator", "a", 5.0, now=100.0)
    assert token is not None
    with pytest.raises(Fenced):
        store.mark_dispatched(tid, 1, now=105.5, fence=("ventilator", token))
    with pytest.raises(Fenced):
        store.mark_dispatched(tid, 1, now=100.5, fence=("ventilator", token + 1))


def test_a_fenced_dispatch_of_a_final_output_is_just_false(store: Store) -> None:
    tid = one_output(store)
    token = store.acquire_lease("ventilator", "a", 5.0, now=100.0)
    assert token is not None
    assert store.fail(tid, "gone", now=100.1) is not None
    assert not store.mark_dispatched(tid, 1, now=100.2, fence=("ventilator", token))
    lease = store.lease("ventilator")
    assert lease is not None and (lease.holder, lease.token, lease.expires) == ("a", token, 105.0)
    assert store.lease("nothing") is None
