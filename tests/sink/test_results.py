"""The sink's per-result logic on a real job store: first result wins, the rest are counted."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from imgpipe.core import lease
from imgpipe.core.errors import ProtocolError
from imgpipe.core.protocol import Result
from imgpipe.core.records import Original, new_job_id, task_id
from imgpipe.core.store import Store
from imgpipe.sink.results import ResultHandler
from tests.support import fill_disk, output_bytes

KEY = b"k" * 32


def make_job(store: Store, chains: int = 2) -> str:
    job = new_job_id()
    store.save_original(job, 0, "png", b"orig")
    store.create_job(job, [Original("png", 4, 4, 4)], [(f"resize:w={c + 1}", "light")
                                                        for c in range(chains)])
    return job


def result(job: str, n: int, *, ok: bool = True, payload: bytes = b"PNGDATA",
           worker: str = "w1", attempt: int = 1, retry: bool = False,
           error: str = "") -> Result:
    return Result(task_id=task_id(job, n), job_id=job, n=n, attempt=attempt, worker=worker,
                  lease=lease.token(KEY, task_id(job, n), attempt),
                  ok=ok, error=error, width=2, height=3, content_type="image/png",
                  format="png", timings={"decode": 1.0, "total": 4.0}, retry=retry,
                  payload=payload)


def test_first_result_wins_and_later_ones_are_duplicates(store: Store) -> None:
    job = make_job(store)
    h = ResultHandler(store, KEY)
    done = h.handle(result(job, 0, payload=b"first"))
    assert (done.state, done.job_state, done.attempt) == ("done", "running", 1)
    late = h.handle(result(job, 0, payload=b"second", worker="w2", attempt=2))
    assert late.state == "duplicate"
    assert output_bytes(store, job, 0) == b"first"
    out = store.output(job, 0)
    assert (out.state, out.worker, out.attempts, out.nbytes) == ("done", "w1", 1, 5)
    snap = h.counters.snapshot()
    assert (snap["results"], snap["written"], snap["duplicates"], snap["bytes"]) == (2, 1, 1, 5)
    assert snap["write_ms_max"] > 0 and h.counters.snapshot()["write_ms_max"] == 0.0


def test_retry_leaves_the_output_open_and_a_plain_failure_is_final(store: Store) -> None:
    job = make_job(store)
    h = ResultHandler(store, KEY)
    back = h.handle(result(job, 0, ok=False, retry=True, error="filter process died"))
    assert (back.state, back.error) == ("retry", "filter process died")
    assert store.output(job, 0).state == "queued"
    bad = h.handle(result(job, 1, ok=False, error="corrupt JPEG"))
    assert (bad.state, bad.job_state) == ("failed", "running")
    assert store.output(job, 1).error == "corrupt JPEG"
    assert h.handle(result(job, 0)).job_state == "partial"
    assert h.handle(result(job, 1)).state == "duplicate"
    assert output_bytes(store, job, 1) is None


def test_a_result_for_an_output_failed_meanwhile_leaves_no_file(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    job = make_job(store, chains=1)
    store.fail(task_id(job, 0), "lost on 3 attempts: ...")
    monkeypatch.setattr(store, "is_final", lambda _tid: False)  # lose the race on purpose
    done = ResultHandler(store, KEY).handle(result(job, 0))
    assert done.state == "duplicate"
    assert output_bytes(store, job, 0) is None
    assert store.output(job, 0).state == "failed"


def test_mismatched_ids_are_refused(store: Store) -> None:
    job = make_job(store)
    res = result(job, 0)
    res.n = 1
    with pytest.raises(ProtocolError):
        ResultHandler(store, KEY).handle(res)
    assert store.output(job, 1).state == "queued"


def test_half_written_files_of_a_killed_sink_are_removed_at_start(tmp_path: Path,
                                                                   store_url: str) -> None:
    store = Store(tmp_path, store_url)  # files: an S3 put is whole, it leaves no half
    job = make_job(store)
    h = ResultHandler(store, KEY)
    assert h.handle(result(job, 0, payload=b"done")).state == "done"
    kept = store._blobs.output_path(job, 0, "png")
    orphan = kept.parent / ".tmp-abc123"
    orphan.write_bytes(b"half")
    os.utime(orphan, (time.time() - 120, time.time() - 120))  # its writer died 2 min ago
    young = kept.parent / ".tmp-def456"
    young.write_bytes(b"half")   # may be another sink's, writing now on a shared store
    assert store.remove_partial_outputs() == 1
    assert young.exists()
    assert not orphan.exists() and kept.read_bytes() == b"done"


def test_a_result_without_the_lease_of_its_dispatch_is_dropped(store: Store) -> None:
    job = make_job(store)
    h = ResultHandler(store, KEY)
    forged = [
        result(job, 0, worker="intruder"),   # the right token, then tampered with below
        result(job, 0, attempt=2),           # a token for attempt 2 sent as attempt 3
        result(job, 1),                      # task 0's token on task 1
    ]
    forged[0].lease = "0" * 32
    forged[1].attempt = 3
    forged[2].lease = lease.token(KEY, task_id(job, 0), 1)
    for res in forged:
        with pytest.raises(ProtocolError, match="no lease"):
            h.handle(res)
    assert h.counters.forged == 3
    assert [o.state for o in store.job(job).outputs] == ["queued", "queued"]
    assert output_bytes(store, job, 0) is None
    assert h.handle(result(job, 0)).state == "done"  # the real one still counts


def test_the_content_type_comes_from_the_format_not_the_header(store: Store) -> None:
    job = make_job(store)
    h = ResultHandler(store, KEY)
    res = result(job, 0)
    res.content_type = "text/html"
    assert h.handle(res).state == "done"
    assert store.output(job, 0).content_type == "image/png"
    odd = result(job, 1)
    odd.format = "html"
    with pytest.raises(ProtocolError, match="no output format"):
        h.handle(odd)
    assert store.output(job, 1).state == "queued"


def test_the_lease_key_is_made_once_and_shared(tmp_path: Path) -> None:
    key = lease.load_key(tmp_path)
    assert len(key) == 32 and lease.load_key(tmp_path) == key
    assert (tmp_path / lease.KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert lease.valid(key, "t", 1, lease.token(key, "t", 1))
    assert not lease.valid(key, "t", 2, lease.token(key, "t", 1))


def test_a_result_the_disk_cannot_take_goes_back_and_leaves_nothing_done(
        tmpfs: Any) -> None:
    """On a full disk the sink answers retry, leaves no file and no done row; once space
    returns the same result is stored."""
    disk = tmpfs("4m")
    store = Store(disk / "data")
    job = make_job(store, chains=1)
    filler = disk / "filler"
    fill_disk(filler)
    h = ResultHandler(store, KEY)
    big = result(job, 0, payload=os.urandom(256 * 1024))
    back = h.handle(big)
    assert back.state == "retry" and "could not store" in back.error
    assert store.output(job, 0).state == "queued"
    assert output_bytes(store, job, 0) is None
    assert list(store._blobs.output_path(job, 0, "png").parent.glob(".tmp-*")) == []
    filler.unlink()
    assert h.handle(big).state == "done"
    assert output_bytes(store, job, 0) == bytes(big.payload)



def test_the_gravity_note_of_a_result_is_stored_with_its_output(tmp_path: Path) -> None:
    store = Store(tmp_path)
    job = make_job(store, chains=3)
    h = ResultHandler(store, KEY)
    for n, gravity in enumerate(("smart", "center", None)):
        res = result(job, n)
        res.gravity = gravity  # type: ignore[assignment]
        assert h.handle(res).state == "done"
    assert [o.gravity for o in store.job(job).outputs] == ["smart", "center", None]
