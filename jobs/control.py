"""Job control: cancel, retry, resume, expiry. Plain functions over a process's services (jobs.services), called by
the CLI (`dreambatch cancel|retry|resume JOB`), the HTTP API and the I/O worker (expiry sweep).

- cancel: the job's cancel flag goes up; every queued item ends `cancelled` (reason "cancelled") at once,
  the way a worker ends an item (jobs.ending: its record first, then the move, its webhook, the finalize);
  a running item stops at its next denoising step (the worker reads the flag there) or, if it is past
  the model already, finishes. Outputs already written stay and are listed in results. The job ends
  `cancelled` (with its webhook) when its last running item ends.
- retry: only `failed` items that ran (not rows rejected at submit) go back to `queued` in the same job,
  same item ids and manifest lines, in a new round: attempts keep counting, the attempt cap counts per
  round, webhook event ids get the round (`….r1`). The job is re-opened and is finalized once more.
- one item: `cancel_item` ends one queued item as cancel does (a running one stops at its next step: the item's
  own stop, read with the job's flag), `retry_item` re-queues one failed item as retry does (both the same code
  as for the whole job, narrowed to that item).
- resume: items with no result (queued or running in Redis, no item record in S3) are published again,
  for when their messages were lost (broker outage, purged queue); nothing that ended runs twice.
- expiry: items of a job past its `expires_at` that never started end `cancelled` with reason "expired";
  workers do it when they pick such an item up, and `expire_due` (run by each I/O worker) does it for
  items that no worker reached in time.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from itertools import islice

from jobs import records
from jobs.ending import end_items
from jobs.errors import JobNotFound, JobStateError
from jobs.lifecycle import ItemStatus, JobStatus
from jobs.models import ItemRecord, JobRecord, Timings
from jobs.reconcile import reconcile
from jobs.services import Services
from jobs.storage import ObjectStore
from jobs.store import RedisStore
from jobs.submit import now_iso

HOLD_S = 30.0  # s cancel or expiry holds a queued item's execution lease while it ends the item
HOLD_BATCH = 100  # items held at a time


@contextmanager
def _held(store: RedisStore, job_id: str, items: list[ItemRecord]) -> Iterator[list[ItemRecord]]:
    """The items among `items` still queued once their execution leases (worker.leases) are held here, as
    they are now; an item whose lease a worker holds is that worker's to end. Released on the way out."""
    token = f"control-{uuid.uuid4().hex}"
    held = [i for i in items if not store.acquire_lease(job_id, i.item_id, token, HOLD_S)]
    try:
        now = (store.get_item(job_id, i.item_id) for i in held)
        yield [item for item in now if item is not None and item.status == ItemStatus.QUEUED]
    finally:
        for item in held:
            store.release_lease(job_id, item.item_id, token)


def _end_queued(
    services: Services, objects: ObjectStore, job: JobRecord, reason: str, items: Iterable[ItemRecord]
) -> list[str]:
    """End as cancelled the queued ones among `items`, as a worker ends an item (jobs.ending: record, move,
    webhook, finalize), each under its execution lease: a worker that starts one first wins, and that item
    is left to it. Returns the ids of the items ended here."""
    ended: list[str] = []
    queued = (item for item in items if item.status == ItemStatus.QUEUED)
    while batch := list(islice(queued, HOLD_BATCH)):
        with _held(services.store, job.job_id, batch) as still_queued:
            ended += end_items(
                services.store,
                objects,
                job,
                still_queued,
                ItemStatus.CANCELLED,
                reason=reason,
                publish=services.notify,
                finalize=services.finalize,
            )
    return ended


def cancel_job(services: Services, job_id: str) -> JobRecord:
    """Cancel a job: queued items end now, running ones at their next step. Returns the job as it is after.

    Cancelling a job that is already cancelled (or being cancelled) is a no-op; one that ended otherwise
    raises JobStateError."""
    store, job = services.store, services.job(job_id)
    if job.finished_at:
        if job.status == JobStatus.CANCELLED:
            return job
        raise JobStateError(f"job {job_id} already ended {job.status}; nothing to cancel")
    objects = services.objects(job.output)
    # 1. the flag first: a worker that starts an item from now on, or reaches its next step, sees it
    if store.request_cancel(job_id, now_iso()):
        job.cancel_requested = True
        # the durable record says so too, so a rebuild after Redis loss does not run these items again
        records.write_job_spec(objects, job)
    # 2. every queued item ends cancelled at once
    _end_queued(services, objects, job, "cancelled", store.items(job_id))
    return store.get_job(job_id) or job


def retry_job(services: Services, job_id: str, only: set[str] | None = None) -> list[str]:
    """Re-queue the job's failed items (those that ran; rows rejected at submit stay failed) in a new round;
    with `only`, just those of them whose ids it holds. Returns their ids, in manifest order; [] when none failed."""
    store, job, batch = services.store, services.job(job_id), services.settings.celery.publish_batch
    round_ = job.round + 1
    at, now = now_iso(), time.time()
    ids: list[str] = []
    # 1. failed → queued while the job still reads as ended, so no finalize can slip in between
    for item in store.items(job_id):
        if item.status != ItemStatus.FAILED or not item.params or (only is not None and item.item_id not in only):
            continue
        again = item.model_copy(
            update={
                "status": ItemStatus.QUEUED,
                "error": None,
                "error_kind": None,
                "reason": None,
                "output": None,
                "round": round_,
                "round_start_attempts": item.attempts,
                "enqueued_at": now,
                "updated_at": at,
                "timings": Timings(),
            }
        )
        if store.transition(again, ItemStatus.QUEUED).applied:
            ids.append(item.item_id)
    if not ids:
        return []
    # 2. re-open the job (a new round of finalize; no item keeps an earlier stop), then 3. publish
    store.clear_item_stop(job_id, ids)
    store.reopen_job(job_id, round_)
    for start in range(0, len(ids), batch):
        services.publish(job, ids[start : start + batch])
    return ids


def _item(services: Services, job_id: str, item_id: str) -> ItemRecord:
    item = services.store.get_item(job_id, item_id)
    if item is None:
        raise JobNotFound(f"job {job_id} has no item {item_id!r}")
    return item


def cancel_item(services: Services, job_id: str, item_id: str) -> ItemRecord:
    """Cancel one item of a job, as `cancel_job` cancels each of its items: queued, it ends `cancelled` (reason
    "cancelled") at once; running, it stops at its next denoising step (its worker reads the item's stop there,
    beside the job's flag) or, past the model already, finishes. The rest of the job runs on. Returns the item
    as it is after.

    Cancelling a cancelled item is a no-op; one that ended otherwise raises JobStateError."""
    job = services.job(job_id)
    item = _item(services, job_id, item_id)
    if item.status == ItemStatus.QUEUED:
        _end_queued(services, services.objects(job.output), job, "cancelled", [item])
        item = _item(services, job_id, item_id)
    if item.status == ItemStatus.RUNNING:
        services.store.request_item_stop(job_id, item_id)
        return item
    if item.status == ItemStatus.CANCELLED:
        return item
    raise JobStateError(f"item {item_id} of job {job_id} already ended {item.status}; nothing to cancel")


def retry_item(services: Services, job_id: str, item_id: str) -> ItemRecord:
    """Re-queue one failed item, as `retry_job` re-queues a job's failed items (a new round, attempts counted,
    the job re-opened if it had ended). Returns the item as it is after; JobStateError when it is not a failed
    item that ran, or while its job is being cancelled (a retry re-opens the job, which would undo the cancel)."""
    job = services.job(job_id)
    if job.cancel_requested and not job.finished_at:
        raise JobStateError(f"job {job_id} is being cancelled; retry item {item_id} once the job has ended")
    item = _item(services, job_id, item_id)
    if item.status != ItemStatus.FAILED or not item.params:
        rejected = item.status == ItemStatus.FAILED
        why = "it was rejected at submit: fix the row and submit it again" if rejected else f"it is {item.status}"
        raise JobStateError(f"item {item_id} of job {job_id} is not a failed item that ran ({why}); nothing to retry")
    retry_job(services, job_id, only={item_id})
    return _item(services, job_id, item_id)


def resume_job(services: Services, job_id: str, *, output: str | None = None) -> list[str]:
    """Publish again every item that has no result (after an outage lost their messages); returns their ids.

    When Redis lost the job too, give its `output` location: the job is rebuilt from its S3 record."""
    store = services.store
    live = store.get_job(job_id)
    where = output or (live.output if live is not None else None)
    if where is None:
        raise JobNotFound(f"no job {job_id!r} in Redis; give its output location to rebuild it from S3")
    if live is not None and live.finished_at:
        return []
    objects = services.objects(where)
    queued: list[str] = []

    def dispatch(ids: list[str]) -> None:
        services.publish(live or services.job(job_id), ids)  # (rebuilt by reconcile before it dispatches)
        queued.extend(ids)

    batch = services.settings.celery.publish_batch
    reconcile(job_id, objects, store, dispatch, services.finalize, batch=batch, notify=services.notify)
    return queued


def expire_due(
    services: Services,
    *,
    now: float | None = None,
    scan: int = 1000,
    on_expired: Callable[[str, list[str]], None] | None = None,
) -> dict[str, list[str]]:
    """End, as cancelled with reason "expired", the never-started items of every recent unfinished job past
    its deadline. Returns {job_id: item ids}. Safe to run from several processes at once."""
    store = services.store
    now = time.time() if now is None else now
    expired: dict[str, list[str]] = {}
    for job in store.get_jobs(store.job_ids(scan)):
        if job.finished_at or not job.expires_at or job.expires_at > now or not job.counts.get(ItemStatus.QUEUED):
            continue
        ids = _end_queued(services, services.objects(job.output), job, "expired", store.items(job.job_id))
        if ids:
            expired[job.job_id] = ids
            if on_expired:
                on_expired(job.job_id, ids)
    return expired
