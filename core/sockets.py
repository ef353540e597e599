"""Sockets made one way: size limits, linger, keepalive, and CURVE when configured.

Every component opens its sockets here, so the hygiene rules hold everywhere:

* receiving sockets set ``ZMQ_MAXMSGSIZE`` (a peer cannot make us allocate 4 GB);
* ``linger=0``, so closing never blocks on unsent messages;
* TCP keepalive and ZMTP heartbeats on every connection, so a peer that vanished
  without a FIN (a pulled cable, a killed VM) is noticed instead of holding a pipe;
* stable nodes bind on ``settings.bind_url(...)`` and act as CURVE servers, dynamic
  nodes connect and act as CURVE clients, when the key files are set.
"""

from __future__ import annotations

import logging
from typing import Any

import zmq

from imgpipe.core.config import Settings
from imgpipe.core.errors import ConfigError
from imgpipe.core.keys import check_bind, resolve

log = logging.getLogger(__name__)

# Kernel buffer (SO_SNDBUF at the ventilator, SO_RCVBUF at a worker) of the tcp://
# task sockets. Left to autotuning, the kernel parks megabytes of tasks at a worker
# too busy to read them while its peers idle (ZeroMQ's high-water marks count only
# ZeroMQ's own queues). 64 KiB still holds less than one 4K task, and moves one in
# 1 ms of CPU where 8 KiB took 6 ms (docs/pipeline.md has both measurements).
TASK_BUFFER_BYTES = 64 * 1024

# ZMQ_MAXMSGSIZE of sockets that carry no image (bus, intake, control, subscriptions):
# their messages are a few hundred bytes, so a peer cannot make one buffer megabytes.
# Sockets that carry images (a worker's tasks, the sink's results) pass the image
# limit (``settings.max_message_bytes``); a control client's replies may list a fleet.
SMALL_MESSAGE_BYTES = 64 * 1024
REPLY_MESSAGE_BYTES = 1024 * 1024


def make_socket(ctx: zmq.Context[Any], kind: int, settings: Settings, *,
                bind: str | None = None, connect: str | tuple[str, ...] | None = None,
                sndhwm: int | None = None, rcvhwm: int | None = None,
                subscribe: tuple[bytes, ...] = (),
                options: dict[int, int] | None = None,
                max_bytes: int = SMALL_MESSAGE_BYTES) -> zmq.Socket[Any]:
    """A configured socket that binds ``bind`` (on bind_host) or connects to ``connect``.

    ``max_bytes`` is the largest message it accepts; a peer that sends more is
    disconnected. Every kind gets one: PUB and XPUB read subscriptions too.

    ``options`` are extra integer socket options set before binding or connecting
    (``{zmq.IMMEDIATE: 1}``: some only act on connections made after they are set).
    """
    sock = ctx.socket(kind)
    try:
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
        if sndhwm is not None:
            sock.sndhwm = sndhwm
        if rcvhwm is not None:
            sock.rcvhwm = rcvhwm
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 30)
        sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 10)
        sock.setsockopt(zmq.HEARTBEAT_IVL, 5000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 15000)
        for option, value in (options or {}).items():
            sock.setsockopt(option, value)
        for topic in subscribe:
            sock.setsockopt(zmq.SUBSCRIBE, topic)
        if bind is not None:
            url = settings.bind_url(bind)
            _curve_server(sock, settings, url)
            sock.bind(url)
        if connect is not None:
            _curve_client(sock, settings)
            for endpoint in (connect,) if isinstance(connect, str) else connect:
                sock.connect(endpoint)
    except BaseException:
        sock.close(0)
        raise
    return sock


def bound_endpoint(sock: zmq.Socket[Any]) -> str:
    """The URL a bound socket really listens on (resolves ``tcp://...:0`` / wildcard ports)."""
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def _curve_server(sock: zmq.Socket[Any], settings: Settings, url: str) -> None:
    check_bind(settings, url)
    keys = resolve(settings)
    if keys is None:
        return
    import zmq.auth

    if keys.server_secret is None:
        raise ConfigError("CURVE is on but this process binds a socket without the server's "
                          "secret key: set IMGPIPE_CURVE_SERVER_SECRET_FILE on stable nodes",
                          field="curve_server_secret_file")
    public, secret = zmq.auth.load_certificate(keys.server_secret)
    if secret is None:
        raise ValueError(f"{keys.server_secret} holds no secret key")
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True


def _curve_client(sock: zmq.Socket[Any], settings: Settings) -> None:
    keys = resolve(settings)
    if keys is None:
        return
    import zmq.auth

    server_public, _ = zmq.auth.load_certificate(keys.server_public)
    client_file = keys.client_secret or keys.server_secret
    if client_file is None:
        raise ConfigError("CURVE is on but this peer has no secret key to connect with: set "
                          "IMGPIPE_CURVE_CLIENT_SECRET_FILE", field="curve_client_secret_file")
    public, secret = zmq.auth.load_certificate(client_file)
    if secret is None:
        raise ValueError(f"{client_file} holds no secret key")
    sock.curve_serverkey = server_public
    sock.curve_publickey = public
    sock.curve_secretkey = secret


def start_authenticator(ctx: zmq.Context[Any], settings: Settings) -> Any:
    """In a binding process with CURVE on: a ZAP thread that admits the authorised keys.

    Without ``curve_authorized_dir`` any client that knows the server key is admitted
    (encryption only). Returns the authenticator (call ``.stop()``) or None.
    """
    keys = resolve(settings)
    if keys is None:
        return None
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx)
    auth.start()
    if keys.authorized is not None:
        auth.configure_curve(domain="*", location=str(keys.authorized))
    else:
        auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
    return auth
