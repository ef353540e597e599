"""``imgpipe stress`` without a stack: refusals, and the counters over job documents."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from imgpipe.bench import chaos, stress
from imgpipe.bench.load import LoadSummary, Submission


@pytest.mark.parametrize("args", [
    ["burst", "1", "--url", "http://192.0.2.1:8000"],
    ["continuous", "--rate", "1", "--duration", "1", "--url", "http://192.0.2.1:8000"],
    ["chaos", "--url", "http://192.0.2.1:8000"],
    ["burst", "0"], ["burst", "1", "--size", "1x"], ["continuous", "--rate", "0",
                                                     "--duration", "1"]])
def test_stress_refuses_bad_or_remote_targets(args: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        stress.main(args)
    assert exc.value.code == 2



def sub(status: int | None, state: str | None = None, job: str = "j1", **kw: Any) -> Submission:
    s = Submission(t_submit=0.0, status=status, job_id=job if status == 202 else None,
                   accept_ms=5.0)
    if state:
        s.final = {"state": state, "progress": {"done": 1 if state == "done" else 0,
                                                "failed": 0, "total": 1}, **kw}
        s.done_ms = 100.0
    return s


def test_summary_counts_and_fails_on_unfinished_or_5xx() -> None:
    ok = LoadSummary(2.0, [sub(202, "done"), sub(202, "done"), sub(503)], 1)
    d = ok.to_dict()
    assert (d["submitted"], d["accepted"], d["rejected_503"]) == (3, 2, 1)
    assert d["job_states"] == {"done": 2} and d["outputs_done"] == 2
    assert d["status_counts"] == {"202": 2, "503": 1}
    assert not ok.failed
    assert LoadSummary(1.0, [sub(202)], 1).failed                 # never finished
    assert LoadSummary(1.0, [sub(202, "failed")], 1).failed       # finished failed
    assert LoadSummary(1.0, [sub(500)], 1).failed                 # a server error
    none = sub(None)
    none.error = "ConnectError: refused"
    assert LoadSummary(1.0, [none], 1).failed                     # no answer at all


def test_a_429_is_a_refusal_not_an_error() -> None:
    limited = LoadSummary(1.0, [sub(202, "done"), sub(429)], 1)
    assert limited.to_dict()["rejected_429"] == 1 and not limited.failed


def test_chaos_counts_lost_and_duplicated_outputs() -> None:
    outs = [{"n": 0, "state": "failed", "attempts": 3},
            {"n": 1, "state": "queued", "attempts": 1},
            {"n": 1, "state": "queued", "attempts": 2}]
    s1 = sub(202, "partial", job="a", outputs=outs)
    s1.final["progress"] = {"done": 0, "failed": 1, "total": 2}  # type: ignore[index]
    s2 = sub(202, job="b")  # accepted, never final: all its outputs are lost
    rejected = sub(503)
    with httpx.Client() as http:  # no output is done, so nothing is fetched
        c = chaos.verify(http, "http://127.0.0.1:9", [s1, s2, rejected], per_job=2)
    assert c["expected"] == 4
    assert c["lost"] == 4
    assert c["duplicated"] == 1
    assert c["failed"] == 1 and c["retried"] == 2
    assert c.get("done", 0) == 0


def test_chaos_chains_resize_to_the_sizes_it_checks() -> None:
    specs = chaos.chains(2.0)
    assert [s.split("|")[0] for s in specs] == [f"resize:w={w},h={h}" for w, h in chaos.SIZES]
