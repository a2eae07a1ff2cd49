"""Items of a dead worker run again within a couple of minutes, not after the broker's visibility timeout.

A GPU worker that is SIGKILLed, OOM-killed or stopped past its warm-shutdown grace leaves its items'
messages unacknowledged in Redis, where they come back only after `celery.visibility_timeout` (70 minutes
by default, and it must stay long: a long item must never be delivered twice while it runs). So each task
notes, as it starts, which worker holds its message (keys.EXECUTIONS; `tasks.run_item`), and every
`celery.recovery_interval` seconds one worker (whoever claims keys.RECOVERY_LOCK) looks at the entries:

    1. an item that ended, or is gone, has its entry dropped
    2. an item whose execution lease is held, or whose worker's heartbeat is alive, is left alone
    3. an item whose lease has expired and whose worker has sent no heartbeat for `settle` seconds (three
       heartbeat periods: a worker that was only cut off from Redis beats again within one) is published
       again, and its entry says the broker holds it ("")

Nothing runs twice at once: the re-published message runs only once it takes the item's lease, and the
old message, when Redis restores it an hour later, finds the item ended and only finishes what was left
undone. With the defaults (60 s lease, 5 s heartbeats, 15 s scans) a dead worker's items are queued again
60–90 s after it died.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from jobs import keys
from jobs.models import JobRecord
from jobs.services import Services
from jobs.store import RedisStore, redis_errors
from worker import periodic

log = logging.getLogger("dreambatch.recovery")

Publish = Callable[[JobRecord, list[str]], None]


class Recovery:
    """The scan, with what it remembers between scans: since when each entry's worker has looked dead."""

    def __init__(self, store: RedisStore, publish: Publish, settle: float):
        self.store, self.publish, self.settle = store, publish, settle
        self._suspect: dict[tuple[str, str], float] = {}

    def scan(self, now: float | None = None) -> list[tuple[str, str]]:
        """One look at every entry; returns the (job_id, item_id) published again."""
        now = time.monotonic() if now is None else now
        store, requeued = self.store, []
        entries = store.executions()
        for gone in set(self._suspect) - set(entries):
            del self._suspect[gone]
        for (job_id, item_id), worker in entries.items():
            # 1. ended or gone: nothing to recover
            item = store.get_item(job_id, item_id)
            if item is None or item.status.terminal:
                store.pass_execution(job_id, item_id, worker, None)
                self._suspect.pop((job_id, item_id), None)
                continue
            if not worker:  # the broker holds a message for it (queued, or waiting out a retry's countdown)
                self._suspect.pop((job_id, item_id), None)
                continue
            # 2. a live execution, or a live worker that holds the message
            if store.lease_held(job_id, item_id) or store.worker_alive(worker):
                self._suspect.pop((job_id, item_id), None)
                continue
            # 3. dead for `settle` seconds: publish it again
            since = self._suspect.setdefault((job_id, item_id), now)
            if now - since < self.settle:
                continue
            job = store.get_job(job_id)
            if job is None:
                store.pass_execution(job_id, item_id, worker, None)
                continue
            self.publish(job, [item_id])
            store.pass_execution(job_id, item_id, worker, "")
            del self._suspect[(job_id, item_id)]
            requeued.append((job_id, item_id))
            log.warning(
                "item %s/%s was %s on worker %s, which is gone (no lease, no heartbeat); queued it again",
                job_id,
                item_id,
                item.status.value,
                worker,
                extra={"job_id": job_id, "item_id": item_id},
            )
        return requeued


def start(services: Services, name: str = "") -> threading.Thread | None:
    """Start this process's recovery thread (every worker runs one; one of them scans at a time). Entries that
    name this worker (`name`) are from a previous life of its process (worker.cli restarts it in place, with
    the same name): they are renamed, so the scan sees their worker gone."""
    cfg = services.settings.celery
    interval = cfg.recovery_interval
    if interval <= 0:
        return None
    recovery = Recovery(services.store, services.publish, settle=3 * cfg.heartbeat)

    def forget_previous_life() -> None:  # (in the thread: a worker starting while Redis is away does not wait)
        if not name:
            return
        try:
            for (job_id, item_id), worker in services.store.executions().items():
                if worker == name:
                    services.store.pass_execution(job_id, item_id, worker, f"{name} (before a restart)")
        except redis_errors() as exc:
            log.warning("could not look for items of this worker's previous run: %s", exc)

    return periodic.start(
        services,
        interval=interval,
        lock=keys.RECOVERY_LOCK,
        what="recovery scan",
        run=recovery.scan,
        name="dead-worker-recovery",
        first=forget_previous_life,
    )


class Holding:
    """A task's entry in the executions registry, while it holds an item's message."""

    def __init__(self, store: RedisStore | None, job_id: str, item_id: str, worker: str):
        self.store, self.job_id, self.item_id, self.worker = store, job_id, item_id, worker

    def _pass(self, to: str | None) -> None:
        if self.store is None:
            return
        try:
            self.store.pass_execution(self.job_id, self.item_id, self.worker, to)
        except redis_errors() as exc:  # the scan drops it once the item has ended
            log.warning("could not update the execution entry of %s/%s: %s", self.job_id, self.item_id, exc)

    def passed_to_broker(self) -> None:
        """The task asked for a retry: the broker holds the item's next message."""
        self._pass("")

    def done(self) -> None:
        """The message is acknowledged: nothing of it is left to recover."""
        self._pass(None)


def holding(runtime, job_id: str, item_id: str) -> Holding:
    """Note that this worker (`runtime.name`) holds the message of job_id/item_id; a runtime without a name
    (tests driving tasks in-process) notes nothing."""
    if not runtime.name:
        return Holding(None, job_id, item_id, "")
    store = runtime.store
    try:
        store.note_execution(job_id, item_id, runtime.name)
    except redis_errors() as exc:  # the item's own path meets the same outage and says what to do
        log.warning("could not note the execution of %s/%s: %s", job_id, item_id, exc)
        return Holding(None, job_id, item_id, "")
    return Holding(store, job_id, item_id, runtime.name)
