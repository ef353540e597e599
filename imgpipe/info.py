"""``imgpipe filters`` and ``imgpipe config``: what the service accepts and how it is set."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from imgpipe.core.config import Settings


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
