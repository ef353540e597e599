"""The job document's timings: where an output's time went outside the worker."""

from __future__ import annotations

from dataclasses import replace

import pytest

from imgpipe.core.records import Output
from imgpipe.gateway.documents import hop_timings, output_doc

DONE = Output(task_id="j:0", job_id="00000000-0000-4000-8000-000000000000", n=0, image=0,
              ops="resize:w=10", cost="light", state="done", attempts=1, queued_at=100.0,
              dispatched_at=100.002, finished_at=100.030,
              timings_ms={"queue": 3.0, "decode": 15.0, "filters": 0.5, "encode": 4.0,
                          "total": 21.0})


def test_dispatch_and_store_split_queued_to_finished() -> None:
    hops = hop_timings(DONE)
    assert hops == {"dispatch": pytest.approx(2.0), "store": pytest.approx(6.0)}
    # dispatch + the hop to the worker is the worker's queue; with the worker's total
    # and the store they make up queued -> finished
    t = DONE.timings_ms
    assert (t["queue"] or 0) + (t["total"] or 0) + hops["store"] == pytest.approx(30.0)


@pytest.mark.parametrize("change", [
    {"state": "running", "finished_at": None},
    {"state": "failed"},
    {"cached": True, "dispatched_at": None},
    {"timings_ms": {"queue": 3.0, "total": None}},
])
def test_unknown_parts_are_none(change: dict) -> None:
    assert hop_timings(replace(DONE, **change)) == {"dispatch": None, "store": None}


def test_the_document_keeps_the_workers_timings_and_adds_the_hops() -> None:
    doc = output_doc(DONE)["timings_ms"]
    assert list(doc) == ["queue", "decode", "filters", "encode", "total", "dispatch", "store"]
    assert doc["decode"] == 15.0 and doc["store"] == pytest.approx(6.0)
