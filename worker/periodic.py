"""Fleet-wide chores on a timer: a thread per worker process that runs one every `interval` s, on one worker
of the fleet at a time (a short Redis claim), and rides out a Redis outage or its own failure, saying so.
The reconcile sweep (sweeper.py) and dead-worker recovery (recovery.py) run this way."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from jobs.services import Services
from jobs.store import redis_errors, unreachable

log = logging.getLogger("dreambatch.worker")


def start(
    services: Services,
    *,
    interval: float,
    lock: str,
    what: str,
    run: Callable[[], object],
    name: str,
    first: Callable[[], None] | None = None,
) -> threading.Thread:
    """Start thread `name` running `run` every `interval` s while this process holds `lock` (`what` names the
    chore in its log lines); `first` runs once in the thread before the first wait."""

    def loop() -> None:
        if first is not None:
            first()
        stop = threading.Event()
        while not stop.wait(interval):
            try:
                if services.store.claim(lock, interval * 0.9):
                    run()
            except redis_errors() as exc:
                log.warning(
                    "%s skipped (%s); trying again in %ss",
                    what,
                    unreachable(services.settings.redis_url, exc),
                    interval,
                )
            except Exception:
                log.exception("%s failed; trying again in %ss", what, interval)

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    return thread
