"""`dreambatch beat`: Celery beat firing the schedules file's cron entries, one beat at a time.

Each tick, a beat process takes (or renews) the Redis lock `keys.BEAT_LOCK`; only its holder fires,
so two beats started together never both fire, and a standby takes over when the holder's lock expires.
Firing a slot is also claimed once in Redis (`keys.SCHEDULE_SLOT`), so even two holders in a row cannot
fire the same slot twice. A schedule fires for its latest slot only: after a beat outage that spanned
several slots (beat down at 02:00 for three nights) it fires once, not once per missed slot.

Firing sends `dreambatch.run_schedule(name, slot)` to the io queue; an io worker scans and submits.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from celery.beat import Scheduler

from jobs import keys
from jobs.catalog.schedules import Schedule, load_schedules
from jobs.errors import DreambatchError
from jobs.services import Services
from jobs.store import ScheduleState

log = logging.getLogger("dreambatch.beat")
SLOT_CLAIM_TTL = 8 * 24 * 3600  # s a fired slot stays claimed (longer than any sane catch-up window)


def fire_due(schedule: Schedule, state: ScheduleState, send: Callable[[str, str], None], now: datetime) -> str | None:
    """Fire `schedule` for its latest slot if that slot has not fired yet; returns the slot fired, or None.
    A schedule seen for the first time starts from now: it fires at its next slot."""
    slot = schedule.latest_slot(now)
    if slot is None:
        return None
    slot_iso = slot.isoformat()
    last = state.last_fired(schedule.name)
    if last is None:
        state.set_last_fired(schedule.name, slot_iso)
        return None
    if datetime.fromisoformat(last) >= slot:
        return None
    claim = keys.SCHEDULE_SLOT.format(name=schedule.name, slot=slot_iso)
    fired = None
    if state.claim(claim, SLOT_CLAIM_TTL):
        try:
            send(schedule.name, slot_iso)
        except Exception:
            state.unclaim(claim)  # not sent: the next tick tries again
            raise
        fired = slot_iso
        log.info("fired %s for %s (last fired %s)", schedule.name, slot_iso, last)
    state.set_last_fired(schedule.name, slot_iso)
    return fired


class CatalogScheduler(Scheduler):
    """A Celery beat scheduler whose entries are the schedules file, guarded by the beat lock."""

    def __init__(self, *args, services: Services, **kwargs):
        self.settings = services.settings
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.state = services.schedule_state
        self.holding: bool | None = None  # unknown until the first tick, so either state is logged once
        self.schedules: dict[str, Schedule] = {}
        self._mtime: float | None = None
        super().__init__(*args, **kwargs)

    def setup_schedule(self) -> None:
        self._reload()

    def _reload(self) -> None:
        """Read the schedules file again when it changed; a broken file keeps the last good schedules."""
        path = Path(self.settings.catalog.schedules_file).expanduser()
        try:
            mtime = path.stat().st_mtime
        except OSError:
            mtime = None
        if mtime == self._mtime and self.schedules:
            return
        try:
            self.schedules = load_schedules(self.settings)
            self._mtime = mtime
            log.info(
                "schedules: %s",
                ", ".join(f"{s.name} ({s.cron} {s.timezone})" for s in self.schedules.values() if s.cron)
                or "none with a cron",
            )
        except DreambatchError as exc:
            log.error("schedules file not loaded, keeping the previous one: %s", exc)
            self._mtime = mtime

    def _send(self, name: str, slot: str) -> None:
        self.app.send_task(keys.TASK_RUN_SCHEDULE, args=[name, slot], queue=keys.IO_QUEUE)

    def tick(self, *args, **kwargs) -> float:
        cfg = self.settings.catalog
        try:
            holding = self.state.hold_lock(keys.BEAT_LOCK, self.owner, cfg.beat_lock_ttl)
        except Exception as exc:  # Redis away: neither fire nor die; try again next tick
            log.warning("beat lock not reachable: %s", exc)
            return cfg.beat_interval
        if holding != self.holding:
            log.info("%s the beat lock (%s)", "holding" if holding else "standby: another beat holds", self.owner)
            self.holding = holding
        if not holding:
            return cfg.beat_interval
        self._reload()
        now = datetime.now(UTC)
        wait = cfg.beat_interval
        for schedule in self.schedules.values():
            try:
                fire_due(schedule, self.state, self._send, now)
            except Exception:
                log.exception("schedule %s: not fired this tick", schedule.name)
            upcoming = schedule.next_fire(now)
            if upcoming is not None:
                wait = min(wait, max((upcoming - now).total_seconds(), 0.05))
        return wait

    def close(self) -> None:
        if self.holding:
            try:
                self.state.release_lock(keys.BEAT_LOCK, self.owner)
            except Exception as exc:
                log.warning("beat lock not released (it expires by itself): %s", exc)
            self.holding = False
        super().close()
