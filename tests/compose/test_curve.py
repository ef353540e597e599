"""CURVE between hosts: real sockets from ``make_socket``, keys from ``zmq.auth``.

A stable node binds as the CURVE server with ``start_authenticator`` running; a peer
connects with the keys its settings name. The checks mirror docs/deploy.md: the right
keys deliver, a wrong server key, an unlisted client key or no CURVE at all deliver
nothing, and a remote worker needs only the server's *public* key plus its own pair.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth

from imgpipe.core.config import Settings
from imgpipe.core.sockets import make_socket, start_authenticator
from tests.support import free_port, make_settings, recv

QUIET_S = 1.0  # how long "nothing delivered" is watched for


@dataclass
class Keys:
    root: Path

    def public(self, name: str) -> str:
        return str(self.root / f"{name}.key")

    def secret(self, name: str) -> str:
        return str(self.root / f"{name}.key_secret")

    def client(self, folder: Path, name: str, *, trusts: str = "server") -> Settings:
        """A remote client's settings: its own pair, and the public key of ``trusts``
        as the server's (docs/deploy.md: no server secret on a worker host)."""
        return make_settings(folder, curve_server_public_file=self.public(trusts),
                             curve_server_secret_file=self.secret(name),
                             curve_client_secret_file=self.secret(name))

    def authorize(self, *names: str) -> str:
        folder = self.root / "authorized"
        folder.mkdir(exist_ok=True)
        for name in names:
            (folder / f"{name}.key").write_bytes(Path(self.public(name)).read_bytes())
        return str(folder)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    root = tmp_path / "keys"
    root.mkdir()
    for name in ("server", "worker", "intruder", "impostor"):
        zmq.auth.create_certificates(root, name)
    return Keys(root)


@pytest.fixture
def endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


@pytest.fixture
def server(zctx: zmq.Context[Any], keys: Keys, endpoint: str,
           tmp_path: Path) -> Iterator[zmq.Socket[Any]]:
    """A PULL socket bound like the sink's, admitting only the listed public keys."""
    settings = make_settings(tmp_path / "server",
                             curve_server_public_file=keys.public("server"),
                             curve_server_secret_file=keys.secret("server"),
                             curve_authorized_dir=keys.authorize("server", "worker"))
    auth = start_authenticator(zctx, settings)
    assert auth is not None
    sock = make_socket(zctx, zmq.PULL, settings, bind=endpoint)
    try:
        yield sock
    finally:
        sock.close(linger=0)
        auth.stop()


def push(zctx: zmq.Context[Any], settings: Settings, endpoint: str) -> zmq.Socket[Any]:
    """A PUSH that has sent one message, as soon as it could (up to 5 s: a refused peer
    may never get a pipe to send on, which delivers nothing either)."""
    sock = make_socket(zctx, zmq.PUSH, settings, connect=endpoint)
    try:
        if sock.poll(5000, zmq.POLLOUT):
            sock.send_multipart([b"header", b"payload"], flags=zmq.NOBLOCK)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


def nothing_arrives(sock: zmq.Socket[Any]) -> bool:
    return not sock.poll(int(QUIET_S * 1000), zmq.POLLIN)


def test_stable_peer_with_the_server_pair_is_admitted(zctx: zmq.Context[Any], keys: Keys,
                                                      server: zmq.Socket[Any], endpoint: str,
                                                      tmp_path: Path) -> None:
    """Same-host peers (gateway, ventilator as a client) may share the server pair."""
    settings = make_settings(tmp_path / "peer",
                             curve_server_public_file=keys.public("server"),
                             curve_server_secret_file=keys.secret("server"))
    client = push(zctx, settings, endpoint)
    try:
        assert recv(server, 5.0) == [b"header", b"payload"]
    finally:
        client.close(linger=0)


def test_remote_worker_needs_only_the_server_public_key(zctx: zmq.Context[Any], keys: Keys,
                                                        server: zmq.Socket[Any],
                                                        endpoint: str, tmp_path: Path) -> None:
    """The worker host's settings as docs/deploy.md gives them: no server secret there."""
    settings = keys.client(tmp_path / "worker", "worker")
    client = push(zctx, settings, endpoint)
    try:
        assert recv(server, 5.0) == [b"header", b"payload"]
    finally:
        client.close(linger=0)


def test_wrong_server_key_delivers_nothing(zctx: zmq.Context[Any], keys: Keys,
                                           server: zmq.Socket[Any], endpoint: str,
                                           tmp_path: Path) -> None:
    """A client that trusts another server key (a man in the middle's) never talks."""
    settings = keys.client(tmp_path / "worker", "worker", trusts="impostor")
    client = push(zctx, settings, endpoint)
    try:
        assert nothing_arrives(server)
    finally:
        client.close(linger=0)


def test_unlisted_client_key_delivers_nothing(zctx: zmq.Context[Any], keys: Keys,
                                              server: zmq.Socket[Any], endpoint: str,
                                              tmp_path: Path) -> None:
    """Knowing the server key is not enough when an authorised-keys folder is set."""
    settings = keys.client(tmp_path / "intruder", "intruder")
    client = push(zctx, settings, endpoint)
    try:
        assert nothing_arrives(server)
        # The listed worker still gets through on the same socket afterwards.
        worker = keys.client(tmp_path / "worker", "worker")
        ok = push(zctx, worker, endpoint)
        try:
            assert recv(server, 5.0) == [b"header", b"payload"]
        finally:
            ok.close(linger=0)
    finally:
        client.close(linger=0)


def test_plain_client_delivers_nothing(zctx: zmq.Context[Any], server: zmq.Socket[Any],
                                       endpoint: str, tmp_path: Path) -> None:
    client = push(zctx, make_settings(tmp_path / "plain"), endpoint)
    try:
        assert nothing_arrives(server)
    finally:
        client.close(linger=0)


def test_without_authorized_dir_any_client_with_the_server_key_is_admitted(
        zctx: zmq.Context[Any], keys: Keys, endpoint: str, tmp_path: Path) -> None:
    """Encryption only: the documented default when IMGPIPE_CURVE_AUTHORIZED_DIR is empty."""
    settings = make_settings(tmp_path / "server",
                             curve_server_public_file=keys.public("server"),
                             curve_server_secret_file=keys.secret("server"))
    auth = start_authenticator(zctx, settings)
    sock = make_socket(zctx, zmq.PULL, settings, bind=endpoint)
    intruder = keys.client(tmp_path / "any", "intruder")
    client = push(zctx, intruder, endpoint)
    try:
        assert recv(sock, 5.0) == [b"header", b"payload"]
    finally:
        client.close(linger=0)
        sock.close(linger=0)
        auth.stop()


def test_curve_off_starts_no_authenticator(zctx: zmq.Context[Any], settings: Settings) -> None:
    assert not settings.curve_enabled
    assert start_authenticator(zctx, settings) is None
