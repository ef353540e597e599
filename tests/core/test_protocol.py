from __future__ import annotations

import json
from typing import Any

import pytest
import zmq

from imgpipe.core.errors import ProtocolError
from imgpipe.core.protocol import (
    TOPIC_HEARTBEAT,
    VERSION,
    Claim,
    Done,
    Event,
    Heartbeat,
    Metric,
    Notice,
    Reply,
    Request,
    Result,
    Task,
    decode,
    decode_topic,
    encode,
    encode_topic,
)
from tests.support import recv

SAMPLES = [
    Notice(job_id="j", outputs=3),
    Task(task_id="j:0", job_id="j", n=0, ops="blur:radius=2", attempt=2, cost="heavy",
         queued_at=1.5, dispatched_at=2.0, deadline=9.0, payload=b"\xff\xd8 jpeg bytes"),
    Result(task_id="j:0", job_id="j", n=0, attempt=1, worker="w", ok=True, width=4, height=3,
           content_type="image/png", format="png", timings={"decode": 1.25}, payload=b"PNG"),
    Result(task_id="j:1", job_id="j", n=1, attempt=3, worker="w", ok=False, error="boom",
           retry=True),
    Heartbeat(worker="w", host="h", pid=7, seq=3, ts=1.0, inflight=["j:0"], cpu=12.5, rss=10),
    Claim(worker="w", task_id="j:0", attempt=1, ts=2.0),
    Metric(source="w", role="worker", seq=1, ts=3.0, values={"done": 4, "decode_ms": 1.5}),
    Event(source="v", what="worker_lost", ts=4.0, worker="w"),
    Done(task_id="j:0", job_id="j", n=0, state="done", job_state="running"),
    Request(op="workers"),
    Reply(ok=True, data=[{"id": "w"}]),
    Result(task_id="j:2", job_id="j", n=2, attempt=1, worker="w", ok=True, format="jpeg",
           gravity="center", payload=b"JPEG"),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.kind)
def test_round_trip_over_inproc(zctx: Any, msg: Any) -> None:
    a, b = zctx.socket(zmq.PAIR), zctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://proto")
        b.connect("inproc://proto")
        a.send_multipart(encode(msg), copy=False)
        got = decode(recv(b, copy=False))
        assert type(got) is type(msg)
        if msg.has_payload:
            assert bytes(got.payload) == bytes(msg.payload)
            got.payload = msg.payload
        assert got == msg
    finally:
        a.close(0)
        b.close(0)


def test_payload_arrives_zero_copy(zctx: Any) -> None:
    a, b = zctx.socket(zmq.PAIR), zctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://zc")
        b.connect("inproc://zc")
        a.send_multipart(encode(SAMPLES[1]), copy=False)
        got = decode(recv(b, copy=False))
        assert isinstance(got.payload, memoryview)
    finally:
        a.close(0)
        b.close(0)


def test_bus_frames_round_trip_and_check_topic() -> None:
    hb = SAMPLES[4]
    frames = encode_topic(hb)
    assert frames[0] == TOPIC_HEARTBEAT
    assert decode_topic(frames) == hb
    with pytest.raises(ProtocolError, match="wrong topic"):
        decode_topic([b"metric", frames[1]])
    with pytest.raises(ProtocolError):
        encode_topic(SAMPLES[0])


def _header(**fields: Any) -> bytes:
    return json.dumps({"v": VERSION, **fields}).encode()


@pytest.mark.parametrize("frames, needle", [
    ([], "empty"),
    ([b"\xff\xfe"], "not JSON"),
    ([b"[1, 2]"], "not a JSON object"),
    ([json.dumps({"v": 99, "kind": "notice", "job_id": "j"}).encode()], "version"),
    ([json.dumps({"kind": "notice", "job_id": "j"}).encode()], "version"),
    ([_header(kind="pickle")], "unknown message kind"),
    ([_header(kind="notice")], "missing field 'job_id'"),
    ([_header(kind="notice", job_id=5)], "must be str"),
    ([_header(kind="claim", worker="w", task_id="t", attempt=True, ts=1)], "must be int"),
    ([_header(kind="claim", worker="w", task_id="t", attempt=1.5, ts=1)], "must be int"),
    ([_header(kind="task", task_id="t", job_id="j", n=0, ops="x")], "expected 2 frame"),
    ([_header(kind="notice", job_id="j"), b"extra"], "expected 1 frame"),
    ([_header(kind="heartbeat", worker="w", host="h", pid=1, seq=1, ts=1, inflight="x")],
     "must be list"),
    ([_header(kind="result", task_id="t", job_id="j", n=0, attempt=1, worker="w", ok=True,
              gravity="north"), b""], "'gravity' must be one of 'smart', 'center' or null"),
])
def test_malformed_frames_are_rejected(frames: list[bytes], needle: str) -> None:
    with pytest.raises(ProtocolError, match=needle):
        decode(frames)


def test_unknown_fields_are_ignored_and_new_fields_default() -> None:
    msg = decode([_header(kind="notice", job_id="j", future_field=[1, 2])])
    assert msg == Notice(job_id="j", outputs=0)


def test_expect_refuses_other_kinds() -> None:
    with pytest.raises(ProtocolError, match="expected a task"):
        decode(encode(Notice(job_id="j")), expect=Task)


def test_int_is_accepted_for_float_fields() -> None:
    msg = decode([_header(kind="claim", worker="w", task_id="t", attempt=1, ts=5)])
    assert isinstance(msg, Claim) and isinstance(msg.ts, float)


RESULT = {"kind": "result", "task_id": "t", "job_id": "j", "n": 0, "attempt": 1,
          "worker": "w", "ok": True}


@pytest.mark.parametrize("value", [
    "north", "SMART", "smart ", "", "s" * 100_000, 1, 0, True, False, 1.5, [], ["smart"],
    {"smart": True}, {"v": "center"},
])
def test_a_result_with_an_unknown_gravity_note_is_refused(value: Any) -> None:
    with pytest.raises(ProtocolError, match="'gravity' must be one of") as caught:
        decode([_header(**RESULT, gravity=value), b"bytes"], expect=Result)
    assert len(str(caught.value)) < 200  # the peer's value is not echoed back


@pytest.mark.parametrize(("fields", "gravity"), [
    ({"gravity": "smart"}, "smart"), ({"gravity": "center"}, "center"),
    ({"gravity": None}, None), ({}, None),  # null, or an older worker that never says
])
def test_a_result_carries_a_known_gravity_note_or_none(fields: dict[str, Any],
                                                       gravity: str | None) -> None:
    assert decode([_header(**RESULT, **fields), b"bytes"], expect=Result).gravity == gravity
