"""Leases as proof: a result is accepted only for a dispatch the ventilator made.

Each dispatch of a task carries a token, ``HMAC(key, task_id:attempt)``, that the
worker returns with its result. The sink recomputes it: a result whose token does not
match was not sent by a worker that received that attempt of that task, so it is
dropped and counted, whatever its header claims. A token is per attempt, so a late
result of an earlier attempt still proves itself and keeps the "first completion
wins" rule.

The key is 32 random bytes in ``<data dir>/lease.key`` (mode 0600), made by whichever
of the ventilator and the sink starts first; both share the data dir (they share the
job store already). Nothing else needs it: workers only echo tokens.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_FILE = "lease.key"
_KEY_BYTES = 32


def load_key(data_dir: Path) -> bytes:
    """The data dir's lease key, made (atomically, 0600) if it does not exist yet."""
    path = data_dir / KEY_FILE
    with contextlib.suppress(FileNotFoundError):
        return _read(path)
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = data_dir / f".{KEY_FILE}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, secrets.token_bytes(_KEY_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if the other process made it first: use theirs
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return _read(path)


def token(key: bytes, task_id: str, attempt: int) -> str:
    """The lease token of dispatch ``attempt`` of ``task_id``."""
    mac = hmac.new(key, f"{task_id}:{attempt}".encode(), hashlib.sha256)
    return mac.hexdigest()[:32]


def valid(key: bytes, task_id: str, attempt: int, claimed: str) -> bool:
    return hmac.compare_digest(token(key, task_id, attempt), claimed)


def _read(path: Path) -> bytes:
    key = path.read_bytes()
    if len(key) != _KEY_BYTES:
        raise ValueError(f"{path} holds {len(key)} bytes, not a {_KEY_BYTES}-byte lease key: "
                         f"remove it and restart the ventilator and the sink together")
    return key
