"""Periodic reconciliation, run by I/O workers: every `celery.reconcile_interval` seconds one of them
(whoever claims the Redis lock) looks for jobs that were committed in the configured output
locations, have not ended, and are unknown to Redis — Redis lost its data — and rebuilds them from
their durable record (jobs.reconcile), re-queueing exactly the items with no result and sending again the
webhook events of ended items (and of ended jobs still inside their events' retry window). The same sweep
purges the live state of jobs that ended more than DREAMBATCH_RETENTION s ago (jobs.retention)."""

from __future__ import annotations

import logging
import threading

from jobs import keys, records
from jobs.reconcile import sweep
from jobs.retention import expire_ended
from jobs.services import Services
from jobs.settings import Settings
from jobs.storage import location_under
from worker import periodic

log = logging.getLogger("dreambatch.sweeper")


def locations(settings: Settings) -> list[str]:
    extra = [x.strip() for x in settings.reconcile_locations.split(",") if x.strip()]
    return list(dict.fromkeys([*([settings.output] if settings.output else []), *extra]))


def tenant_locations(services: Services) -> list[str]:
    """Where the API keys with an output prefix put their jobs (jobs.api.tenancy), from the keys' durable records."""
    output = services.settings.output
    if not output:
        return []
    found = records.read_api_keys(services.objects(output))
    return list(dict.fromkeys(location_under(output, k.prefix) for k in found if k.prefix))


def sweep_once(services: Services) -> int:
    """One sweep over every location (and every tenant's prefix of them); returns how many jobs were reconciled."""
    count, settings = 0, services.settings
    for location in dict.fromkeys([*locations(settings), *tenant_locations(services)]):
        objects = services.objects(location)
        reports = sweep(
            objects,
            services.store,
            services.publish,
            services.finalize,
            settings.celery.publish_batch,
            services.notify,
        )
        for r in reports:
            log.warning(
                "reconciled job %s from %s: %d item(s), %d ended, %d re-queued, %d webhook event(s) sent again",
                r.job_id,
                location,
                r.total,
                r.ended,
                r.requeued,
                r.resent,
            )
        count += len(reports)
    for p in expire_ended(services):
        log.info(
            "job %s ended more than %ss ago: its live state was purged (%d keys)",
            p.job_id,
            settings.retention,
            p.keys_deleted,
            extra={"job_id": p.job_id},
        )
    return count


def start(services: Services) -> threading.Thread | None:
    """Start the sweeping thread of this process, if periodic reconciliation is on and has somewhere to look."""
    interval = services.settings.celery.reconcile_interval
    if interval <= 0 or not (locations(services.settings) or services.settings.retention > 0):
        return None

    return periodic.start(
        services,
        interval=interval,
        lock=keys.RECONCILE_LOCK,
        what="reconcile sweep",
        run=lambda: sweep_once(services),
        name="reconcile-sweeper",
    )
