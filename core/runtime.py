"""How every component process starts and stops: logging, signals, one zmq.Context.

``serve(run, settings)`` builds the one ``zmq.Context`` of the process, turns SIGTERM
and SIGINT into a ``threading.Event`` that ``run`` polls, and terminates the context
when ``run`` returns, so a container's ``docker stop`` and a supervisor's terminate
both end in a clean close (``linger=0`` everywhere).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

import zmq

from imgpipe.core.config import Settings

RunFn = Callable[..., Any]


def configure_logging(settings: Settings, name: str) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s {name}[%(process)d] %(name)s: %(message)s",
    )


def serve(run: RunFn, settings: Settings, name: str) -> int:
    """Run ``run(settings, ctx, stop=event)`` until it returns or a signal arrives."""
    configure_logging(settings, name)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        logging.getLogger(name).info("signal %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    ctx = zmq.Context()
    try:
        run(settings, ctx, stop=stop)
    finally:
        ctx.term()
    return 0


def die_with_parent() -> None:  # pragma: no cover - runs in a child before exec
    """``preexec_fn`` for children that must not outlive their parent (Linux only).

    ``PR_SET_PDEATHSIG`` sends the child SIGTERM when the parent dies, even by SIGKILL,
    so a killed supervisor or bench leaves no orphan stack behind.
    """
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
