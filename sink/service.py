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

Several sinks may run against one job store (``result_endpoint`` and ``event_endpoint``
lists; each sink binds the first free entry, workers push to all of them, gateways and
ventilators hear all of them): the store's first completion wins, so a result is
finished once whichever sink takes it. The retention pass (expiry, eviction, the
leftover walk) runs only in the sink holding the store's ``sink-retention`` lease, so
two sinks never drop the same jobs or count them twice.
"""

from __future__ import annotations

import argparse
import contextlib
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
from imgpipe.core.sockets import (
    POLLIN,
    bound_endpoint,
    make_socket,
    release,
    start_authenticator,
)
from imgpipe.core.store import Store
from imgpipe.sink.results import ResultHandler

log = logging.getLogger(__name__)

RESULT_HWM = 8      # results queued in this process before workers' sockets hold them
POLL_MS = 100
RETENTION_LEASE = "sink-retention"


def retention_turn(store: Store, holder: str, settings: Settings, now: float) -> bool:
    """Whether this sink runs the retention pass now: it holds (takes or renews) the
    store's ``sink-retention`` lease, for three sweep intervals."""
    try:
        token = store.acquire_lease(RETENTION_LEASE, holder, 3 * settings.sweep_interval_s,
                                    now=now)
    except Exception:
        log.exception("could not reach the job store for the retention lease")
        return False
    return token is not None


def run(settings: Settings, ctx: zmq.Context[Any], *, stop: threading.Event | None = None) -> None:
    stop = stop or threading.Event()
    auth = start_authenticator(ctx, settings)
    try:
        store = Store.from_settings(settings)
    except BaseException:
        # Else the authenticator's sockets keep ctx.term() waiting: a hang, not an exit.
        if auth is not None:
            auth.stop()
        raise
    # Half-written outputs name their writer: a dead process's of this host go at once,
    # another host's (a sink that may be writing now) only once old.
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
        log.info("sink up: results on %s, events on %s", bound_endpoint(results),
                 bound_endpoint(events))
        seq = 0
        next_metric = next_sweep = next_walk = 0.0
        while not stop.is_set():
            now = time.time()
            if now >= next_sweep:
                next_sweep = now + settings.sweep_interval_s
                if retention_turn(store, source, settings, now):
                    walk = now >= next_walk
                    if walk:
                        next_walk = now + retention.LEFTOVER_EVERY_S
                    try:
                        swept = retention.sweep(store, settings, now, leftovers=walk)
                        handler.counters.expired += swept.expired + swept.evicted
                    except Exception:
                        log.exception("retention pass failed; next in %s s",
                                      settings.sweep_interval_s)
                else:
                    next_walk = 0.0  # another sink leads; should this one take over, it walks
            if now >= next_metric:
                seq += 1
                metric = Metric(source=source, role="sink", seq=seq, ts=now,
                                values=handler.counters.snapshot())
                bus.send_multipart(encode_topic(metric), zmq.NOBLOCK)
                next_metric = now + settings.metrics_interval_s
            if not results.poll(POLL_MS, zmq.POLLIN):
                continue
            for _ in range(RESULT_HWM * 4):
                # Asked first: a zmq.Again ending every batch cost more than a message.
                if not int(results.getsockopt(zmq.EVENTS)) & POLLIN:
                    break
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
            release(s)
        with contextlib.suppress(Exception):
            store.release_lease(RETENTION_LEASE, source)
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
