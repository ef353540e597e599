"""``imgpipe filters``, ``imgpipe config`` and ``imgpipe keys``: what the service accepts,
how it is set, and the keys that seal its ZeroMQ plane."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from imgpipe.core import keys
from imgpipe.core.config import Settings, add_settings_args, settings_from_args
from imgpipe.core.errors import ConfigError


def main_filters(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="imgpipe filters", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the JSON of /api/filters")
    ns = parser.parse_args(argv)
    from imgpipe.filters import describe_filters, format_filters_text

    print(json.dumps(describe_filters(), indent=2) if ns.json else format_filters_text())
    return 0


def main_config(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="imgpipe config", description=__doc__)
    parser.add_argument("--json", action="store_true")
    ns = parser.parse_args(argv)
    rows = Settings.from_env().describe()
    if ns.json:
        print(json.dumps(rows, indent=2))
    else:
        width = max(len(r["variable"]) for r in rows)
        for r in rows:
            print(f"{r['variable']:<{width}}  {r['value']:<24}  {r['doc']}")
    return 0


def main_keys(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="imgpipe keys", description="Write CURVE server and client key pairs (0600) and "
        "an authorised-keys folder into DATA/keys. With keys there, every component using "
        "that data dir seals its ZeroMQ sockets.")
    add_settings_args(parser, "data_dir")
    parser.add_argument("--force", action="store_true", help="replace existing keys")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the key files into this folder instead of DATA/keys "
                        "(compose mounts one at /keys)")
    ns = parser.parse_args(argv)
    settings = settings_from_args(ns)
    try:
        folder = keys.write(settings.data_dir, force=ns.force, folder=ns.out)
    except ConfigError as exc:
        print(f"imgpipe keys: {exc}", file=sys.stderr)
        return 1
    print(f"imgpipe keys: wrote {folder}/ (server and client pairs, authorized/)\n"
          f"  stable nodes and local peers use it through --data {settings.data_dir}; a worker "
          f"on another host needs\n  server.key and a client pair: IMGPIPE_CURVE_SERVER_PUBLIC_FILE,"
          f" IMGPIPE_CURVE_CLIENT_SECRET_FILE\n  (and its public key in {folder}/authorized/)")
    return 0
