"""``imgpipe sink``: receives results, finishes outputs exactly once, announces them.

Sockets (stable node)::

    results  PULL  bind  result_endpoint   Result from workers, rcvhwm=RESULT_HWM
    events   PUB   bind  event_endpoint    Done (topic "done") for gateways and ventilator
    bus      PUB   conn  bus_endpoints     our Metric (role "sink")

A small receive high-water mark bounds memory (a result may be a 25 MB PNG) and
bounds what a crash of this process can drop: results still queued in a worker's
PUSH socket survive a sink restart (ZeroMQ reconnects and delivers them); the few
read but not committed are re-dispatched by the ventilator once it sees they never
arrived. See sink/results.py for the exactly-once rule.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

import zmq

from imgpipe.core import lease, retention
from imgpipe.core.config import Settings, add_settings_args, settings_from_args
from imgpipe.core.errors import ProtocolError
from imgpipe.core.protocol import Metric, Result, decode, encode_topic
from imgpipe.core.runtime import serve
from imgpipe.core.sockets import make_socket, start_authenticator
from imgpipe.core.store import Store
from imgpipe.sink.results import ResultHandler

log = logging.getLogger(__name__)

RESULT_HWM = 8      # results queued in this process before workers' sockets hold them
POLL_MS = 100


def run(settings: Settings, ctx: zmq.Context[Any], *, stop: threading.Event | None = None) -> None:
    stop = stop or threading.Event()
    auth = start_authenticator(ctx, settings)
    store = Store.from_settings(settings)
    removed = store.remove_partial_outputs()
    if removed:
        log.info("removed %d half-written output file(s) of a previous run", removed)
    handler = ResultHandler(store, lease.load_key(settings.data_dir))
    source = f"sink@{socket.gethostname()}:{os.getpid()}"
    socks: list[zmq.Socket[Any]] = []
    try:
        results = make_socket(ctx, zmq.PULL, settings, bind=settings.result_endpoint,
                              rcvhwm=RESULT_HWM, max_bytes=settings.max_message_bytes)
        socks.append(results)
        events = make_socket(ctx, zmq.PUB, settings, bind=settings.event_endpoint)
        socks.append(events)
        bus = make_socket(ctx, zmq.PUB, settings, connect=settings.bus_endpoints)
        socks.append(bus)
        log.info("sink up: results on %s, events on %s", settings.result_endpoint,
                 settings.event_endpoint)
        seq = 0
        next_metric = next_sweep = next_walk = 0.0
        while not stop.is_set():
            now = time.time()
            if now >= next_sweep:
                next_sweep = now + settings.sweep_interval_s
                walk = now >= next_walk
                if walk:
                    next_walk = now + retention.LEFTOVER_EVERY_S
                try:
                    swept = retention.sweep(store, settings, now, leftovers=walk)
                    handler.counters.expired += swept.expired + swept.evicted
                except Exception:
                    log.exception("retention pass failed; next in %s s",
                                  settings.sweep_interval_s)
            if now >= next_metric:
                seq += 1
                metric = Metric(source=source, role="sink", seq=seq, ts=now,
                                values=handler.counters.snapshot())
                bus.send_multipart(encode_topic(metric), zmq.NOBLOCK)
                next_metric = now + settings.metrics_interval_s
            if not results.poll(POLL_MS, zmq.POLLIN):
                continue
            for _ in range(RESULT_HWM * 4):
                try:
                    frames = results.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                try:
                    res = decode(frames, expect=Result)
                    done = handler.handle(res)
                except ProtocolError as exc:
                    log.warning("dropped a bad result: %s", exc)
                    continue
                except Exception:
                    handler.counters.errors += 1
                    log.exception("error handling a result")
                    continue
                events.send_multipart(encode_topic(done), zmq.NOBLOCK)
    finally:
        for s in socks:
            s.close(linger=0)
        store.close()
        if auth is not None:
            auth.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imgpipe sink", description=__doc__.split("\n")[0])
    add_settings_args(parser, "data_dir", "store_url", "bind_host", "result_endpoint",
                      "event_endpoint", "bus_endpoint", "dashboard_bus_endpoint",
                      "metrics_interval_s", "log_level")
    settings = settings_from_args(parser.parse_args(list(argv or [])))
    return serve(run, settings, "sink")
