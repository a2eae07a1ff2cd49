"""The run lock: one run of a schedule at a time, a short-TTL Redis lock renewed while the run goes."""

from __future__ import annotations

import logging
import threading
import time

from jobs import keys
from jobs.errors import TransientError
from jobs.store import ScheduleState

log = logging.getLogger("dreambatch.catalog")


class RunInProgress(TransientError):
    """Another run of this schedule holds its run lock; try again once it has ended."""


class RunLock:
    """One run of a schedule at a time: `keys.SCHEDULE_RUNNING` with a short TTL, renewed every third of it by
    a thread while the run goes and released at the end, so a holder that crashed blocks the schedule for one
    TTL at most. `check()` raises once the lock could not be kept (renewals failing for a TTL, or another
    run took it): the run stops before it queues anything."""

    def __init__(self, state: ScheduleState, name: str, owner: str, ttl: float):
        self.state, self.name, self.owner, self.ttl = state, name, owner, ttl
        self.key = keys.SCHEDULE_RUNNING.format(name=name)
        self.lost: str | None = None
        self._renewed = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RunLock:
        if not self.state.hold_lock(self.key, self.owner, self.ttl):
            raise RunInProgress(f"schedule {self.name}: another run is in progress")
        self._renewed = time.monotonic()
        self._thread = threading.Thread(target=self._keep, name=f"run-lock-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _keep(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self.state.hold_lock(self.key, self.owner, self.ttl):
                    self.lost = "another run holds it now"
                    return
                self._renewed = time.monotonic()
            except Exception as exc:  # Redis away for a moment: keep trying until the TTL has run out
                log.warning("schedule %s: run lock not renewed: %s", self.name, exc)
                if time.monotonic() - self._renewed > self.ttl:
                    self.lost = f"not renewed for {self.ttl:.0f}s ({exc})"

    def check(self) -> None:
        if self.lost is None and time.monotonic() - self._renewed > self.ttl:
            self.lost = f"not renewed for {self.ttl:.0f}s"
        if self.lost is not None:
            raise TransientError(
                f"schedule {self.name}: lost its run lock ({self.lost}); stopped before queueing anything"
            )

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.ttl)  # a renewal stuck on an unreachable Redis ends on its own (daemon)
        try:
            self.state.release_lock(self.key, self.owner)
        except Exception as exc:  # it expires by itself within one TTL
            log.warning("schedule %s: run lock not released (it expires in %.0fs): %s", self.name, self.ttl, exc)
