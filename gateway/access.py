"""Who is calling: API keys (``IMGPIPE_API_KEYS``) and the owner a job is recorded under.

With keys set, every ``/api/*`` request needs ``Authorization: Bearer KEY`` (401 and
``WWW-Authenticate: Bearer`` otherwise); ``/healthz``, ``/metrics`` and
``/openapi.json`` stay open (probes and scrapers, which hold no key). A key is never
stored or logged: the gateway keeps ``sha256(key)`` and looks the hash up in a dict,
so no comparison depends on how much of a key was right. The hash is the job's
``owner``; another key asking for that job gets the same 404 as an unknown id.

Without keys every job is visible to every client; the owner recorded is then the hash
of the client's address, used only to count that client's jobs in flight
(:mod:`imgpipe.gateway.limits`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import falcon

from imgpipe.core.config import PREFIX, Settings, is_loopback
from imgpipe.core.errors import ConfigError, ImgpipeError

OPEN_PATHS = ("/healthz", "/metrics", "/openapi.json")


class Unauthorized(ImgpipeError):
    """No API key, or one the gateway does not know (HTTP 401)."""

    status = 401
    error = "unauthorized"
    headers = {"WWW-Authenticate": 'Bearer realm="imgpipe"'}


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_keys(spec: str) -> frozenset[str]:
    """The keys of ``IMGPIPE_API_KEYS``: ``KEY,KEY…`` or ``@FILE`` (one a line; blank lines
    and ``#`` comments ignored). ConfigError for a file that cannot be read."""
    spec = spec.strip()
    if spec.startswith("@"):
        path = Path(spec[1:]).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{PREFIX}API_KEYS=@{path}: cannot read the key file ({exc})",
                              field="api_keys") from None
        items = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    else:
        items = [k.strip() for k in spec.split(",")]
    return frozenset(k for k in items if k)


def check_exposure(settings: Settings) -> None:
    """Refuse a gateway bound beyond loopback without keys, unless told ``--insecure``;
    a key file that cannot be read is refused here too, before any worker starts."""
    keys = load_keys(settings.api_keys) if settings.api_keys else frozenset()
    if keys or is_loopback(settings.gateway_host) or settings.insecure:
        return
    raise ConfigError(
        f"the gateway would listen on {settings.gateway_host!r}, beyond loopback, with no API "
        f"keys: set {PREFIX}API_KEYS (KEY,KEY or @FILE), or pass --insecure "
        f"({PREFIX}INSECURE=1) to serve anyone who can reach it", field="api_keys")


class Access:
    """Middleware: checks the bearer key of ``/api/*`` requests and names the caller.

    Sets ``req.context.owner`` (the sha256 hex of the key, or of the client address
    without keys) and ``req.context.keyed`` (whether jobs are private to their owner).
    """

    def __init__(self, settings: Settings) -> None:
        self.hashes = frozenset(digest(k) for k in load_keys(settings.api_keys))

    @property
    def keyed(self) -> bool:
        return bool(self.hashes)

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.keyed = self.keyed
        req.context.owner = digest("addr:" + (req.remote_addr or "?"))
        if not self.keyed or not req.path.startswith("/api/"):
            return
        scheme, _, key = (req.get_header("Authorization") or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise self._refuse("send Authorization: Bearer KEY (this gateway needs an API key)")
        owner = digest(key.strip())
        if owner not in self.hashes:
            raise self._refuse("the API key is not known to this gateway")
        req.context.owner = owner

    @staticmethod
    def _refuse(detail: str) -> Unauthorized:
        return Unauthorized(detail, field="Authorization")


def owner_of(req: falcon.Request) -> str | None:
    """The owner a job is checked against: the key's hash, or None without keys."""
    ctx: Any = req.context
    return str(ctx.owner) if ctx.get("keyed") else None
