"""Asking the ventilator: registry and stats over its control ROUTER socket.

The ventilator is the registry (service discovery): it hears every heartbeat and
metric on the bus. Anyone else (gateway, dashboard, health probes, the supervisor)
asks it with :func:`ask`, which sends one :class:`Request` and waits for the
:class:`Reply` with a deadline. Ops the ventilator answers:

``ping``     ``{"role": "ventilator", "pid", "state" (active|standby), "uptime_s"}``
``workers``  list of ``{"id", "host", "pid", "state" (idle|busy|lost), "serves", "slots",
             "free", "inflight", "done", "failed", "cpu", "rss", "shm_bytes", "note",
             "last_beat_age_s", "started"}``
``stats``    ``{"queue_depth", "queued": {"light", "heavy"}, "inflight", "dispatched",
             "retries", "lost_tasks", "failed_tasks", "bad_messages", "heartbeats_refused",
             "workers_lost",
             "workers": {"alive", "busy",
             "idle", "lost"}, "components": {role: seconds since last seen},
             "uptime_s", "lease": {"role", "lease_token", "active_since", "last_dispatch_at",
             "takeover", "tenures", "takeovers", "leases_lost", "fenced"}}``
``events``   the ventilator's last events (oldest first), each ``{"ts", "source", "what",
             "detail", "worker", "task_id"}``: workers joined and lost, retries, failures
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import zmq

from imgpipe.core.config import Settings, endpoints
from imgpipe.core.errors import ImgpipeError
from imgpipe.core.protocol import Reply, Request, decode, encode
from imgpipe.core.sockets import REPLY_MESSAGE_BYTES, make_socket


class Unavailable(ImgpipeError):
    """The ventilator did not answer in time (it is down or restarting)."""

    status = 503
    error = "unavailable"


def ask(ctx: zmq.Context[Any], settings: Settings, op: str, args: dict[str, Any] | None = None,
        *, timeout: float = 2.0, endpoint: str | None = None) -> Any:
    """The answer to ``op`` from the ventilator (or the ROUTER at ``endpoint``).

    With several ventilators (``control_endpoint`` a list), every one is asked at once
    and the active one's answer wins; a standby's is used when no active one answers
    within ``timeout`` (its registry hears the same fleet). Raises Unavailable after
    ``timeout`` seconds without any answer.
    """
    targets = endpoints(endpoint or settings.control_endpoint)
    socks = [make_socket(ctx, zmq.REQ, settings, connect=t, max_bytes=REPLY_MESSAGE_BYTES)
             for t in targets]
    try:
        poller = zmq.Poller()
        for sock in socks:
            sock.send_multipart(encode(Request(op=op, args=args or {})))
            poller.register(sock, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        fallback: Reply | None = None
        pending = len(socks)
        while pending and (left := deadline - time.monotonic()) > 0:
            for sock, _ in poller.poll(int(left * 1000) + 1):
                poller.unregister(sock)
                pending -= 1
                reply = decode(sock.recv_multipart(), expect=Reply)
                if reply.role != "standby":
                    return _data(op, reply)
                fallback = fallback or reply
        if fallback is not None:
            return _data(op, fallback)
        raise Unavailable(f"{endpoint or 'the ventilator'} did not answer {op!r}"
                          f" within {timeout} s")
    finally:
        for sock in socks:
            sock.close(linger=0)


def _data(op: str, reply: Reply) -> Any:
    if not reply.ok:
        raise ImgpipeError(f"ventilator refused {op!r}: {reply.error}")
    return reply.data


SUPERVISOR_FILE = "supervisor.json"


def supervisor_endpoint(data_dir: Path) -> str | None:
    """The control endpoint of the local stack running on ``data_dir``, if one runs.

    ``imgpipe up`` writes ``{"control": url, "pid": n}`` to ``data_dir/supervisor.json``
    and answers ``Request(op="scale", args={"workers": n})`` and ``op="status"`` there.
    """
    try:
        info = json.loads((Path(data_dir) / SUPERVISOR_FILE).read_text())
    except (OSError, ValueError):
        return None
    endpoint = info.get("control") if isinstance(info, dict) else None
    return endpoint if isinstance(endpoint, str) else None
