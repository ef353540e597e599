"""Synthetic but real bus traffic for dashboard tests: encoded frames on a real PUB socket."""

from __future__ import annotations

import time
from typing import Any

import zmq

from imgpipe.core.protocol import Event, Heartbeat, Metric, encode_topic


def heartbeat(worker: str, seq: int, *, state: str = "idle", done: int = 0, pid: int = 4242,
              inflight: list[str] | None = None, ts: float | None = None) -> Heartbeat:
    return Heartbeat(worker=worker, host="testhost", pid=pid, seq=seq,
                     ts=time.time() if ts is None else ts, state=state, slots=2,
                     free=2 - len(inflight or []), inflight=list(inflight or []), done=done,
                     cpu=12.5, rss=150 * 2**20, started=time.time() - 60)


def metric(source: str, role: str, seq: int, **values: Any) -> Metric:
    return Metric(source=source, role=role, seq=seq, ts=time.time(), values=values)


def event(what: str, worker: str = "", detail: str = "") -> Event:
    return Event(source="ventilator", what=what, ts=time.time(), worker=worker, detail=detail)


def publish(pub: zmq.Socket[Any], *msgs: Any) -> None:
    for msg in msgs:
        pub.send_multipart(encode_topic(msg))
