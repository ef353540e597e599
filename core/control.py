"""Asking the ventilator: registry and stats over its control ROUTER socket.

The ventilator is the registry (service discovery): it hears every heartbeat and
metric on the bus. Anyone else (gateway, dashboard, health probes, the supervisor)
asks it with :func:`ask`, which sends one :class:`Request` and waits for the
:class:`Reply` with a deadline. Ops the ventilator answers:

``ping``     ``{"role": "ventilator", "pid", "uptime_s"}``
``workers``  list of ``{"id", "host", "pid", "state" (idle|busy|lost), "serves", "slots",
             "free", "inflight", "done", "failed", "cpu", "rss", "shm_bytes", "note",
             "last_beat_age_s", "started"}``
``stats``    ``{"queue_depth", "queued": {"light", "heavy"}, "inflight", "dispatched",
             "retries", "lost_tasks", "failed_tasks", "bad_messages", "heartbeats_refused",
             "workers_lost",
             "workers": {"alive", "busy",
             "idle", "lost"}, "components": {role: seconds since last seen},
             "uptime_s"}``
``events``   the ventilator's last events (oldest first), each ``{"ts", "source", "what",
             "detail", "worker", "task_id"}``: workers joined and lost, retries, failures
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import zmq

from imgpipe.core.config import Settings
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

    Raises Unavailable after ``timeout`` seconds without an answer.
    """
    sock = make_socket(ctx, zmq.REQ, settings, connect=endpoint or settings.control_endpoint,
                       max_bytes=REPLY_MESSAGE_BYTES)
    try:
        sock.send_multipart(encode(Request(op=op, args=args or {})))
        if not sock.poll(int(timeout * 1000), zmq.POLLIN):
            raise Unavailable(f"{endpoint or 'the ventilator'} did not answer {op!r}"
                              f" within {timeout} s")
        reply = decode(sock.recv_multipart(), expect=Reply)
        if not reply.ok:
            raise ImgpipeError(f"ventilator refused {op!r}: {reply.error}")
        return reply.data
    finally:
        sock.close(linger=0)


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
