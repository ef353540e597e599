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

import errno
import fcntl
import logging
import os
import socket
import weakref
from typing import Any

import zmq

from imgpipe.core.config import Settings, endpoints
from imgpipe.core.errors import ConfigError
from imgpipe.core.keys import check_bind, resolve

log = logging.getLogger(__name__)

# Kernel buffer (SO_SNDBUF at the ventilator, SO_RCVBUF at a worker) of the tcp://
# task sockets. Left to autotuning, the kernel parks megabytes of tasks at a worker
# too busy to read them while its peers idle (ZeroMQ's high-water marks count only
# ZeroMQ's own queues). 64 KiB still holds less than one 4K task, and moves one in
# 1 ms of CPU where 8 KiB took 6 ms (docs/pipeline.md has both measurements).
TASK_BUFFER_BYTES = 64 * 1024
# Poll bits as plain ints: ``zmq.POLLIN`` is an IntFlag, and ``events & zmq.POLLIN``
# runs enum.Flag's Python-level operator and constructor on every test of a hot loop.
POLLIN = int(zmq.POLLIN)
POLLOUT = int(zmq.POLLOUT)

# ZMQ_MAXMSGSIZE of sockets that carry no image (bus, intake, control, subscriptions):
# their messages are a few hundred bytes, so a peer cannot make one buffer megabytes.
# Sockets that carry images (a worker's tasks, the sink's results) pass the image
# limit (``settings.max_message_bytes``); a control client's replies may list a fleet.
SMALL_MESSAGE_BYTES = 64 * 1024
REPLY_MESSAGE_BYTES = 1024 * 1024
PUB_RECONNECT_MAX_MS = 1000


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

    ``bind`` may list several endpoints (one per peer of a kind: two ventilators, several
    sinks): the socket binds the first one no other process holds (:func:`bind_free`).
    ``connect`` may be a list setting or a tuple: the socket connects to every entry.
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
            bind_free(sock, settings, bind)
        if connect is not None and kind == zmq.PUB:
            # A publisher to a peer that is not there (no dashboard, a standby down)
            # retries every 100 ms by default, for ever; back off to once a second.
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, PUB_RECONNECT_MAX_MS)
        if connect is not None:
            _curve_client(sock, settings)
            for endpoint in endpoints(connect) if isinstance(connect, str) else connect:
                sock.connect(endpoint)
    except BaseException:
        sock.close(0)
        raise
    return sock


# ipc:// entries a process holds, with the open lock file that says so; closed (and so
# released) with the socket, or by the kernel when the process dies.
_HELD: weakref.WeakKeyDictionary[zmq.Socket[Any], weakref.finalize[Any, Any]] = \
    weakref.WeakKeyDictionary()


def bind_free(sock: zmq.Socket[Any], settings: Settings, setting: str) -> str:
    """Bind ``sock`` on the first entry of the endpoint setting no other process holds;
    the URL bound.

    One entry binds as it always did, except that an ipc:// path another process listens
    on is refused with EADDRINUSE, as a tcp:// port in use is. Of several (two ventilators or sinks run from one
    configuration on one host), a tcp:// entry is taken when its port binds (the kernel
    refuses a port in use); an ipc:// entry when an exclusive ``flock`` on ``PATH.lock``
    succeeds (libzmq would silently take over a socket file in use), held as long as the
    socket. A ConfigError names the setting when every entry is taken.
    """
    entries = endpoints(setting)
    if len(entries) == 1:
        url = settings.bind_url(entries[0])
        _curve_server(sock, settings, url)
        if url.startswith("ipc://") and _ipc_listening(url[len("ipc://"):]):
            # As the kernel refuses a tcp:// port in use (libzmq would take the file over).
            raise zmq.ZMQError(errno.EADDRINUSE, _in_use(url))
        sock.bind(url)
        return url
    for entry in entries:
        url = settings.bind_url(entry)
        lock = _lock_ipc(url) if url.startswith("ipc://") else None
        if lock == -1:
            continue
        try:
            _curve_server(sock, settings, url)
            sock.bind(url)
        except zmq.ZMQError as exc:
            if lock is not None:
                os.close(lock)
            if exc.errno == errno.EADDRINUSE:
                continue
            raise
        if lock is not None:
            _HELD[sock] = weakref.finalize(sock, os.close, lock)
        return url
    raise ConfigError(f"every endpoint of {setting!r} is bound by another process: add one "
                      f"for this one", field="endpoint")


def _in_use(url: str) -> str:
    return (f"{url} is bound by another process (another ventilator or sink?): to run "
            f"several, list one endpoint for each, comma-separated (docs/deploy.md)")


def _ipc_listening(path: str) -> bool:
    """Whether a process accepts connections on the unix socket ``path`` (binding it
    again would silently take it over)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _lock_ipc(url: str) -> int:
    """An fd holding ``PATH.lock`` exclusively for the ipc:// ``url``, or -1 when another
    process holds it."""
    fd = os.open(url[len("ipc://"):] + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return -1
    return fd


def release(sock: zmq.Socket[Any]) -> None:
    """Close ``sock`` and give up the ipc:// entry it holds (if any) at once."""
    sock.close(linger=0)
    unlock = _HELD.pop(sock, None)
    if unlock is not None:
        unlock()


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
