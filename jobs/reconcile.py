"""Rebuild a job's live state from its durable record, after Redis lost its data.

The record under the job's output location (jobs.records) is enough: job.json is the spec (and
its cancel flag), rows.jsonl holds every row's normalized params, and items/{item}.json is written
*before* the live state says an item ended, whoever ends it (jobs.ending: a worker, `cancel JOB`,
the expiry sweep). So an item with a result record ended (its recorded status, output, seed, error,
error kind, reason, attempts, timings and weights revision are restored), unless it says completed,
results.jsonl does not list it completed, and its outputs are not there (a worker writes a completed
item's record and its images side by side and stopped between them: the item runs again; an image
deleted after its job ended is not made again); a row rejected at submit
is a failed item; every other item is queued and its task is published again. Nothing that ended is
run twice. A job whose items have all ended is finalized, or put back in its terminal state if its
results.jsonl exists.

When Redis still has the job, nothing is recreated: missing items are added, items whose result
record exists but whose live status is not terminal are moved to the recorded status, and items
with no result record that are not terminal are re-queued (a duplicate message for an item that
is still queued or running is harmless: a worker skips an item that already ended).

Webhook events are derived from the record too: an ended item's event id is its id, status and round
(jobs.models.item_event_id), the job's its status and round. A recreated job has every event with no
delivered attempt in the delivery log sent again, under that same id (a receiver that already got one
drops the duplicate); a job that had ended only while its `_outbox` marker says its events may still be
pending (their retry window). Repaired in place, only the events of items it moved to their recorded end
are sent (nobody had sent them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from jobs import records
from jobs.ending import announce
from jobs.errors import ErrorKind, JobNotFound
from jobs.lifecycle import ItemStatus, JobStatus, job_outcome
from jobs.models import Event, ItemOutput, ItemRecord, JobRecord, Timings, item_event_id, job_event_id
from jobs.storage import ObjectStore
from jobs.store import Store

log = logging.getLogger("dreambatch.reconcile")


@dataclass
class ReconcileReport:
    job_id: str
    total: int  # rows in the durable record
    ended: int  # items that ended (result record, or rejected at submit)
    requeued: int  # tasks published again
    recreated: bool  # False: Redis still had the job; it was repaired in place
    finalized: bool  # finalize was requested (every item has ended, no results yet)
    restored_terminal: bool = False  # the job had already ended: its terminal state was restored
    resent: int = 0  # webhook events published again (none of them known to be delivered)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _item(job: JobRecord, row: dict[str, Any], result: dict[str, Any] | None) -> ItemRecord:
    """The item as its record says it ended (every field it has: status, output, error and its kind, reason,
    attempts, timings, weights revision, round…), or as submitted when it has no record."""
    item_id = str(row["id"])
    params = row.get("params") or {}
    base: dict[str, Any] = dict(
        job_id=job.job_id,
        item_id=item_id,
        line=int(row["line"]),
        params=params,
        metadata=row.get("metadata") or {},
        created_at=job.created_at,
        updated_at=job.updated_at,
    )
    if result is not None and ItemStatus(result["status"]).terminal:
        recorded = {k: v for k, v in result.items() if k in ItemRecord.model_fields and v is not None}
        recorded.pop("params", None)
        output = result.get("output")
        recorded["output"] = ItemOutput.model_validate(output) if output and output.get("images") else None
        recorded["timings"] = Timings.model_validate(result.get("timings") or {})
        return ItemRecord.model_validate({**base, **recorded, "item_id": item_id})
    if row.get("error") and not params:  # rejected at submit (--skip-invalid)
        return ItemRecord(**base, status=ItemStatus.FAILED, error=row["error"], error_kind=ErrorKind.INPUT)
    return ItemRecord(**base, seed=params.get("seed"), enqueued_at=time.time())  # queued again now


def _item_events(job: JobRecord, items: list[ItemRecord]) -> list[Event]:
    """The terminal event of each ended item, under the id it was first sent with (a vendor's format has
    none: its one envelope is the job's)."""
    if job.webhook_format != "dreambatch":
        return []
    return [(job.job_id, i.item_id, item_event_id(job.job_id, i.item_id, i.status, i.round)) for i in items]


def _undelivered(store: Store, job_id: str, events: list[Event]) -> list[Event]:
    """The events with no delivered attempt in the delivery log (after a Redis loss: all of them)."""
    log = store.events(job_id)
    return [e for e in events if not any(_delivered(a) for a in log.get(e[2], []))]


def _delivered(attempt: dict[str, Any]) -> bool:
    code = attempt.get("status_code")
    return code is not None and 200 <= int(code) < 300


def reconcile(
    job_id: str,
    objects: ObjectStore,
    store: Store,
    dispatch: Callable[[list[str]], None],
    finalize: Callable[[str], None],
    batch: int = 500,
    notify: Callable[[list[Event]], None] | None = None,
) -> ReconcileReport:
    """Rebuild job `job_id` in `store` from its record in `objects` (its output location) and re-queue
    exactly the items that have no result. `dispatch` publishes a batch of item ids; `notify` publishes
    webhook messages (the events that may not have reached the job's webhook)."""
    job = records.read_job(objects, job_id)
    if job is None:
        raise JobNotFound(f"no job.json for job {job_id!r} under {getattr(objects, 'location', '?')}")
    if job.submitting:
        raise JobNotFound(
            f"job {job_id!r} never finished its submission (nothing of it was queued); submit the manifest again"
        )
    rows = records.read_rows(objects, job_id)
    if rows is None:
        raise JobNotFound(f"no rows.jsonl for job {job_id!r} under {getattr(objects, 'location', '?')}")
    results = records.read_item_results(objects, job_id)
    lines = records.read_results(objects, job_id)
    has_results = lines is not None
    # a completion results.jsonl lists had its images stored before it moved; any other may not have
    sealed = {str(line["id"]) for line in lines or [] if line.get("status") == ItemStatus.COMPLETED}
    unsealed = {item_id: rec for item_id, rec in results.items() if item_id not in sealed}
    for item_id in records.outputs_missing(objects, job.output, job_id, unsealed):
        # its record landed, its images did not (the worker stopped between them): it runs again
        log.warning("job %s: item %s is recorded completed without its outputs; it runs again", job_id, item_id)
        del results[item_id]
    items = [_item(job, row, results.get(str(row["id"]))) for row in rows]

    live = store.get_job(job_id)
    recreated = live is None
    finalize_now, owed = False, False
    unsent: list[Event] = []
    if recreated:
        fresh = job.model_copy(
            update={
                "total": len(items),
                "counts": {},
                "status": JobStatus.QUEUED,
                "finished_at": None,
                "results_uri": None,
            }
        )
        store.create_job(fresh)
        if job.webhook_disabled:  # the endpoint answered 410 Gone: it still gets no more events
            store.disable_webhook(job_id)
        if job.cancel_requested:  # `cancel JOB` was asked before Redis lost it: workers still stop its items
            store.request_cancel(job_id, job.updated_at)
        for start in range(0, len(items), batch):
            store.add_items(items[start : start + batch])
        to_queue = [i.item_id for i in items if i.status == ItemStatus.QUEUED]
        # an ended job's events are owed until its outbox marker goes (retry window over, or purged)
        owed = not (has_results and job.status.terminal) or records.has_outbox(objects, job_id)
        unsent = _undelivered(store, job_id, _item_events(job, [i for i in items if i.status.terminal])) if owed else []
    else:
        to_queue = []
        moved: list[ItemRecord] = []
        missing: list[ItemRecord] = []
        for item in items:
            current = store.get_item(job_id, item.item_id)
            if current is None:
                missing.append(item)
                if item.status == ItemStatus.QUEUED:
                    to_queue.append(item.item_id)
            elif not current.status.terminal:
                if item.status.terminal:  # ended in S3, the live state never heard of it
                    if current.status == ItemStatus.QUEUED and item.status == ItemStatus.COMPLETED:
                        store.transition(current, ItemStatus.RUNNING)
                    move = store.transition(item, item.status)
                    finalize_now = finalize_now or move.job_done
                    moved.append(item)
                else:
                    to_queue.append(item.item_id)
        if missing:
            store.add_items(missing)
        ended_now = moved + [i for i in missing if i.status.terminal]  # nobody sent these events
        unsent = [e for e in _item_events(job, ended_now) if not store.was_sent(job_id, e[2])]

    for start in range(0, len(to_queue), batch):
        dispatch(to_queue[start : start + batch])

    ended = sum(1 for i in items if i.status.terminal)
    restored = False
    now = store.get_job(job_id)
    if not to_queue and now is not None and not now.finished_at and now.total and ended >= now.total:
        if has_results and recreated:  # the job had ended: put its terminal state back, do not rewrite results
            status = job.status if job.status.terminal else job_outcome(now.counts)
            uri = job.results_uri or records.results_key(job_id)
            restored = store.finish_job(job_id, status, uri, job.finished_at or job.updated_at)
            if restored and owed:
                unsent += _undelivered(store, job_id, [(job_id, None, job_event_id(job_id, status, job.round))])
        else:
            finalize_now = True
    if notify is not None and job.webhook and now is not None and not now.webhook_disabled:
        for start in range(0, len(unsent), batch):  # same webhook-id: a receiver that got one deduplicates it
            announce(store, notify, unsent[start : start + batch])
    else:
        unsent = []
    if finalize_now:
        finalize(job_id)
    return ReconcileReport(
        job_id=job_id,
        total=len(items),
        ended=ended,
        requeued=len(to_queue),
        recreated=recreated,
        finalized=finalize_now,
        restored_terminal=restored,
        resent=len(unsent),
    )


def sweep(
    objects: ObjectStore,
    store: Store,
    publish: Callable[[JobRecord, list[str]], None],
    finalize: Callable[[str], None],
    batch: int = 500,
    notify: Callable[[list[Event]], None] | None = None,
) -> list[ReconcileReport]:
    """Reconcile every job of this location that the live store no longer knows (Redis lost it): each job
    committed and not ended (an `_open` marker), and each ended job whose webhook events may still be on
    their way (an `_outbox` marker: its events are sent again through `notify`). `publish(job, ids)` queues
    a batch of the job's items (at its priority). A marker left by a job that has ended is removed, an
    outbox marker once its retry window has closed. A job purged since its marker was read stays purged."""
    reports = []
    outbox = records.outbox_jobs(objects)
    now = time.time()
    for job_id, until in outbox.items():
        if until < now:
            records.clear_outbox(objects, job_id)
    opened = records.open_jobs(objects)
    for job_id in [*opened, *(j for j, until in outbox.items() if until >= now and j not in opened)]:
        live = store.get_job(job_id)
        if live is not None:
            if live.finished_at and job_id in opened:
                records.mark_ended(objects, job_id)
            continue
        if store.purged(job_id):  # purged after its marker was listed: gone on purpose (the note and the
            continue  # deletion are one transaction, so a job not live here is either purged or lost)
        spec = records.read_job(objects, job_id)
        if spec is None or spec.submitting:
            continue

        def dispatch(ids: list[str], job: JobRecord = spec) -> None:
            publish(job, ids)

        report = reconcile(job_id, objects, store, dispatch, finalize, batch, notify)
        if report.restored_terminal and job_id in opened:
            records.mark_ended(objects, job_id)
        reports.append(report)
    return reports
