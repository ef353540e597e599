"""Presets: named chains from ``IMGPIPE_PRESETS``, used as ``ops=preset:NAME``.

The file has one ``name=chain`` a line; blank lines and ``#`` comments are skipped,
e.g. ``thumb=resize:w=320,h=320,fit=cover,gravity=smart|encode:format=auto``. Every
chain is parsed when the gateway starts, so a bad file stops it with a message naming
the line. A ``preset:NAME`` spec is replaced by its chain before parsing; the job
records the expanded (canonical) chain. The file is read once per process.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from imgpipe.core.errors import ConfigError, FilterError
from imgpipe.filters import parse_chain

PREFIX = "preset:"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@cache
def load_presets(path: str) -> dict[str, str]:
    """``{name: chain}`` from the file at ``path`` (empty path: none); ConfigError if bad."""
    if not path:
        return {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"IMGPIPE_PRESETS={path!r}: cannot read it ({exc})",
                          field="presets") from None
    presets: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, chain = (part.strip() for part in line.partition("="))
        where = f"IMGPIPE_PRESETS {path}:{lineno}"
        if not sep or not _NAME_RE.fullmatch(name):
            raise ConfigError(f"{where}: write name=chain (name: letters, digits, _ . -)",
                              field="presets")
        if name in presets:
            raise ConfigError(f"{where}: preset {name!r} is defined twice", field="presets")
        try:
            parse_chain(chain)
        except FilterError as exc:
            raise ConfigError(f"{where}: preset {name!r}: {exc.detail}",
                              field="presets") from None
        presets[name] = chain
    return presets


def expand(spec: str, presets: dict[str, str]) -> str:
    """``spec`` with a ``preset:NAME`` replaced by its chain; FilterError naming an unknown one."""
    text = spec.strip()
    if not text.startswith(PREFIX):
        return spec
    name = text[len(PREFIX):].strip()
    if name in presets:
        return presets[name]
    known = ", ".join(sorted(presets)) or "none are defined (IMGPIPE_PRESETS)"
    raise FilterError(f"unknown preset {name[:64]!r}; known: {known}", field="ops")
