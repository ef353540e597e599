"""The ``imgpipe`` command: one entry point, one subcommand per module's ``main(argv)``.

Subcommands are looked up lazily, so ``imgpipe --help`` and a worker's start do not
import Streamlit or gunicorn they never use.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# name -> (module, function, one line of help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "up": ("imgpipe.supervisor", "main_up", "run the whole stack as local processes"),
    "scale": ("imgpipe.supervisor", "main_scale", "set the running local stack to N workers"),
    "gateway": ("imgpipe.gateway.service", "main", "run the HTTP gateway (gunicorn)"),
    "ventilator": ("imgpipe.ventilator.service", "main", "run the dispatcher"),
    "worker": ("imgpipe.workers.service", "main", "run one worker"),
    "sink": ("imgpipe.sink.service", "main", "run the result sink"),
    "dashboard": ("imgpipe.dashboard.launch", "main", "run the Streamlit dashboard"),
    "submit": ("imgpipe.client", "main", "submit images over HTTP and fetch the results"),
    "metrics": ("imgpipe.monitor", "main_metrics", "print the fleet once"),
    "monitor": ("imgpipe.monitor", "main_monitor", "watch the fleet live in the terminal"),
    "bench": ("imgpipe.bench.bench", "main", "compare sequential, threads, processes and the pipeline"),
    "stress": ("imgpipe.bench.stress", "main", "bounded load against a running gateway (burst, "
               "continuous, chaos)"),
    "health": ("imgpipe.health", "main", "probe one component (container health checks)"),
    "filters": ("imgpipe.info", "main_filters", "list every filter with its parameters"),
    "config": ("imgpipe.info", "main_config", "list every setting with its variable and value"),
    "keys": ("imgpipe.info", "main_keys", "write CURVE key pairs for the ZeroMQ plane into the "
             "data dir"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: imgpipe COMMAND [options]   (imgpipe COMMAND --help for its options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, _, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"imgpipe: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    entry = getattr(importlib.import_module(module), func)
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
