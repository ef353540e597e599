"""CURVE keys of the ZeroMQ plane: where they are, and making them (``imgpipe keys``).

Past loopback the plane is sealed: every stable node (ventilator, sink, dashboard)
binds as a CURVE server and runs a ZAP authenticator that admits only the public keys
in an authorised folder; every connecting peer is a CURVE client. The keys come from
the ``IMGPIPE_CURVE_*`` settings when they are set, else from ``<data dir>/keys``::

    keys/                  0700
      server.key           the stable nodes' public key (every peer needs it)
      server.key_secret    its secret half: only on the host of the stable nodes
      client.key           a client pair for workers and gateways of this host
      client.key_secret
      authorized/          public keys allowed to connect (server.key, client.key, ...)

Every file is 0600. A socket that would bind beyond loopback without keys is refused
(:func:`check_bind`) with a message that says to run ``imgpipe keys``, unless the
operator says ``IMGPIPE_INSECURE=1``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from imgpipe.core.config import Settings
from imgpipe.core.errors import ConfigError

KEYS_DIR = "keys"
AUTHORIZED = "authorized"


@dataclass(frozen=True)
class CurveKeys:
    """The key files one process uses; ``None`` where it has none."""

    server_public: Path
    server_secret: Path | None
    client_secret: Path | None
    authorized: Path | None


def resolve(settings: Settings) -> CurveKeys | None:
    """The keys this process runs with: the settings', else the data dir's; None: plain."""
    if settings.curve_enabled:
        return CurveKeys(
            server_public=Path(settings.curve_server_public_file),
            server_secret=_path(settings.curve_server_secret_file),
            client_secret=_path(settings.curve_client_secret_file),
            authorized=_path(settings.curve_authorized_dir))
    folder = settings.data_dir / KEYS_DIR
    if not (folder / "server.key").is_file():
        return None
    return CurveKeys(
        server_public=folder / "server.key",
        server_secret=_existing(folder / "server.key_secret"),
        client_secret=_existing(folder / "client.key_secret"),
        authorized=_existing(folder / AUTHORIZED))


def write(data_dir: Path, *, force: bool = False, folder: Path | None = None) -> Path:
    """Make the server and client pairs and the authorised folder in ``folder`` (default
    ``data_dir/keys``)."""
    import zmq.auth

    folder = folder or data_dir / KEYS_DIR
    if (folder / "server.key").exists() and not force:
        raise ConfigError(f"{folder} already holds keys; pass --force to replace them "
                          f"(every peer then needs the new server.key)", field="data_dir")
    if force:
        for path in [*folder.glob("*.key*"), folder / AUTHORIZED]:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    old = os.umask(0o077)
    try:
        (folder / AUTHORIZED).mkdir(parents=True, exist_ok=True)
        for name in ("server", "client"):
            public, _ = zmq.auth.create_certificates(str(folder), name)
            shutil.copyfile(public, folder / AUTHORIZED / f"{name}.key")
    finally:
        os.umask(old)
    for path in [folder, folder / AUTHORIZED]:
        with contextlib.suppress(PermissionError):  # a folder someone else made for us
            path.chmod(0o700)
    for path in [*folder.glob("*.key*"), *(folder / AUTHORIZED).iterdir()]:
        path.chmod(0o600)
    return folder


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a bind or listen address) is reachable from this host only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a wildcard ("*", "0.0.0.0", "") or a name: beyond loopback


def check_bind(settings: Settings, url: str) -> None:
    """ConfigError when ``url`` binds beyond loopback and the plane is not sealed."""
    if not url.startswith("tcp://") or settings.insecure:
        return
    host = url[len("tcp://"):].rpartition(":")[0]
    if is_loopback(host):
        return
    keys = resolve(settings)
    if keys is None or keys.server_secret is None:
        raise ConfigError(
            f"refusing to bind {url} beyond loopback without CURVE keys: run "
            f"`imgpipe keys --data {settings.data_dir}` (or set IMGPIPE_CURVE_*), or set "
            f"IMGPIPE_INSECURE=1 on a network you trust", field="bind_host")


def _path(value: str) -> Path | None:
    return Path(value) if value else None


def _existing(path: Path) -> Path | None:
    return path if path.exists() else None
