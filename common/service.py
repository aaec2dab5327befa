"""Running one service process: event loop, logging, signals, ordered shutdown.

``run_service(serve(config))`` runs the coroutine until it returns or a signal
arrives.  The first SIGTERM/SIGINT cancels the serve task, whose own
``finally`` blocks do the ordered shutdown (stop accepting, finish or abort
in-flight work within its timeout, deregister, close sockets); a second signal
exits at once with status 1.  Signals are handled once, here, for every service.
An expected start-up failure (``ConfigError``, ``StartupError``) ends the process with
status 2 and its one-line message; anything else is logged with its traceback, status 1.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import signal
import sys
from typing import Coroutine

from common.config import ConfigError
from common.errors import StartupError

log = logging.getLogger(__name__)


def setup_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s [%(process)d]: %(message)s",
        stream=sys.stderr,
    )


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child process, before exec (``Popen(preexec_fn=...)``): get SIGTERM when the parent dies (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def tune_gc(threshold: int) -> None:
    """Process-wide: keep the heap built so far (modules, app, server) out of garbage collections
    (``gc.freeze``) and collect the young generation every ``threshold`` net allocations instead of
    Python's 700.  A request allocates hundreds of containers that reference counting frees; with
    many requests in flight the default threshold collects several times per request, each time
    walking the live requests' objects, a measurable share of a busy process's CPU (the gateway's,
    the fake engines')."""
    gc.freeze()
    gc.set_threshold(threshold, *gc.get_threshold()[1:])


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where installed, else the default asyncio loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_service(main: Coroutine) -> int:
    """Run ``main`` until it finishes or a signal stops it; returns the exit status."""
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    task = loop.create_task(main)
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info("received %s: shutting down", signal.Signals(signum).name)
            task.cancel()
        else:
            log.warning("second signal: exiting now")
            os._exit(1)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        loop.run_until_complete(task)
        return 0
    except asyncio.CancelledError:
        return 0 if signals_seen else 1
    except (ConfigError, StartupError) as e:  # found at start: a bad flag, a model that cannot be loaded...
        log.error("%s", e)
        return 2
    except Exception:
        log.exception("service failed")
        return 1
    finally:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in pending:
            t.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
