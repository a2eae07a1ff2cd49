"""How long an ended job's live state stays in Redis, and how a person drops it sooner. The durable record
(jobs.records) is what stays.

    expire_ended(services)          the periodic duty of an I/O worker's sweep (worker.sweeper): purge the live
                                    state of every job that ended more than `retention` s ago (a job with a
                                    webhook: not before its events' retry window has closed too)
    purge(services, job_id, …)      `dreambatch purge JOB [--outputs] [--force]`: now, and with `outputs` its
                                    images and the whole job folder (record included) as well
    purged_job(services, job_id)    what a read of a purged job gets: the job as its durable record says, or a
                                    JobNotFound that says it was purged (when, why, where its record is)

A purge removes the job's `_open` and `_outbox` markers too, so the reconcile sweep never rebuilds it; an
explicit `dreambatch reconcile JOB` still can (without sending its events again).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from jobs import records
from jobs.errors import JobNotFound, JobStateError
from jobs.models import MAX_DURATION_S, JobRecord

if TYPE_CHECKING:
    from jobs.services import Services

NOTE_TTL = MAX_DURATION_S  # s a purged job's note stays in Redis (what `status` says of it meanwhile)


@dataclass
class PurgeReport:
    job_id: str
    output: str  # the job's output location
    keys_deleted: int  # live Redis keys removed
    objects_deleted: int  # with --outputs: images and files of the job folder removed
    why: str  # "purge" (a person) or "retention"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def purge(
    services: Services,
    job_id: str,
    *,
    output: str | None = None,
    outputs: bool = False,
    force: bool = False,
    why: str = "purge",
) -> PurgeReport:
    """Remove job `job_id`'s live state (and, with `outputs`, its outputs and durable record). A job that has not
    ended is refused unless `force` (its cancel flag is raised first, so running items stop at their next step)."""
    store = services.store
    live, earlier = store.get_job(job_id), store.purged(job_id)
    location = live.output if live else (earlier or {}).get("output") or services.output(output)
    objects = services.objects(location)
    known = live or records.read_job(objects, job_id)  # after an earlier purge or a Redis loss: its record
    if known is None and earlier is None:
        raise JobNotFound(f"no job {job_id!r} in Redis or under {location}")
    running = known is not None and not (known.finished_at or known.status.terminal)
    if running and not force:
        c = known.counts if known else {}
        raise JobStateError(
            f"job {job_id} has not ended ({c.get('queued', 0)} queued, {c.get('running', 0)} running); "
            f"cancel it first (dreambatch cancel {job_id}) or purge it anyway with --force"
        )
    if running and live is not None:  # running items stop at their next step
        store.request_cancel(job_id, _iso(time.time()))
    note = {
        "job_id": job_id,
        "output": location,
        "status": known.status.value if known else (earlier or {}).get("status"),
        "finished_at": known.finished_at if known else (earlier or {}).get("finished_at"),
        "results_uri": known.results_uri if known else (earlier or {}).get("results_uri"),
        "purged_at": _iso(time.time()),
        "why": why,
        "outputs_deleted": outputs or bool((earlier or {}).get("outputs_deleted")),
    }
    deleted = store.purge_job(job_id, note, NOTE_TTL)
    records.mark_ended(objects, job_id)  # the reconcile sweep does not bring it back
    records.clear_outbox(objects, job_id)
    removed = records.delete_job(objects, location, job_id) if outputs else 0
    return PurgeReport(job_id, location, deleted, removed, why)


def expire_ended(services: Services, now: float | None = None, page: int = 1000) -> list[PurgeReport]:
    """Purge the live state of each job that ended more than `settings.retention` s ago (one with a webhook:
    not before `webhooks.retry_window` s either, so no pending event is dropped). Nothing when retention is 0."""
    settings = services.settings
    retention = settings.retention
    if retention <= 0:
        return []
    now = time.time() if now is None else now
    store, reports, start = services.store, [], 0
    candidates: list[str] = []
    while ids := store.jobs_created_before(now - retention, start, page):
        candidates += ids
        start += len(ids)
    for at in range(0, len(candidates), page):
        reports += _expire(services, store.get_jobs(candidates[at : at + page]), now)
    return reports


def _expire(services: Services, jobs: list[JobRecord], now: float) -> list[PurgeReport]:
    settings, reports = services.settings, []
    retention = settings.retention
    for job in jobs:
        if not job.finished_at:
            continue
        keep = max(retention, settings.webhooks.retry_window) if job.webhook else retention
        if _epoch(job.finished_at) + keep <= now:
            reports.append(purge(services, job.job_id, why="retention"))
    return reports


def purged_message(services: Services, job_id: str) -> str | None:
    """One line on a purged job (when, why, what stays), or None when it was not purged (or the note expired)."""
    note = services.store.purged(job_id) if hasattr(services.store, "purged") else None  # (local mode: none)
    if note is None:
        return None
    if note.get("outputs_deleted"):
        stays = "its outputs and durable record were deleted with it"
    else:
        stays = f"its durable record stays under {note['output']} (results: {note.get('results_uri') or '-'})"
    return f"job {job_id}'s live state was purged at {note['purged_at']} ({note['why']}); {stays}"


def purged_job(services: Services, job_id: str) -> JobRecord:
    """The job as its durable record says, for a read of a job whose live state was purged; a JobNotFound that
    says what happened when its record is gone too, or when Redis has no note of it."""
    said = purged_message(services, job_id)
    note = services.store.purged(job_id)
    if said is None or note is None:
        raise JobNotFound(f"no job {job_id!r} in {services.settings.redis_url}")
    job = None if note.get("outputs_deleted") else records.read_job(services.objects(note["output"]), job_id)
    if job is None:
        raise JobNotFound(said)
    return job
