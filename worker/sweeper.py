"""Periodic reconciliation, run by I/O workers: every `celery.reconcile_interval` seconds one of them
(whoever claims the Redis lock) looks for jobs that were committed in the configured output
locations, have not ended, and are unknown to Redis — Redis lost its data — and rebuilds them from
their durable record (jobs.reconcile), re-queueing exactly the items with no result."""

from __future__ import annotations

import logging
import threading

from celery import Celery

from jobs import broker, keys
from jobs.reconcile import sweep
from jobs.settings import Settings
from jobs.storage import open_store
from jobs.store import RedisStore, redis_errors, unreachable

log = logging.getLogger("dreambatch.sweeper")


def locations(settings: Settings) -> list[str]:
    extra = [x.strip() for x in settings.reconcile_locations.split(",") if x.strip()]
    return list(dict.fromkeys([*([settings.output] if settings.output else []), *extra]))


def sweep_once(settings: Settings, store: RedisStore, celery: Celery) -> int:
    """One sweep over every location; returns how many jobs were reconciled."""
    count = 0
    for location in locations(settings):
        objects = open_store(location, settings)
        reports = sweep(objects, store, lambda model, job_id, ids: broker.publish_items(celery, model, job_id, ids),
                        lambda job_id: broker.send_finalize(celery, job_id), settings.celery.publish_batch)
        for r in reports:
            log.warning("reconciled job %s from %s: %d item(s), %d ended, %d re-queued", r.job_id, location,
                        r.total, r.ended, r.requeued)
        count += len(reports)
    return count


def start(settings: Settings, celery: Celery) -> threading.Thread | None:
    """Start the sweeping thread of this process, if periodic reconciliation is on and has somewhere to look."""
    interval = settings.celery.reconcile_interval
    if interval <= 0 or not locations(settings):
        return None
    store = RedisStore.from_url(settings.redis_url, settings.redis_retry_s)

    def loop() -> None:
        stop = threading.Event()
        while not stop.wait(interval):
            try:
                if store.claim(keys.RECONCILE_LOCK, interval * 0.9):
                    sweep_once(settings, store, celery)
            except redis_errors() as exc:
                log.warning("reconcile sweep skipped (%s); trying again in %ss",
                            unreachable(settings.redis_url, exc), interval)
            except Exception:
                log.exception("reconcile sweep failed; trying again in %ss", interval)

    thread = threading.Thread(target=loop, name="reconcile-sweeper", daemon=True)
    thread.start()
    return thread
