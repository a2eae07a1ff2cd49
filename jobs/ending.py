"""How an item ends: one way, for every caller (a worker's item path, `cancel JOB`, the expiry sweep).

    1. its durable record, items/{id}.json, before the live state says it ended (reconcile trusts it)
    2. its move: one atomic transition in the store, checked against jobs.lifecycle; whoever moved the item
       first wins, and a caller that lost the race changes nothing more
    3. its webhook event, published, then noted as sent (a crash in between gives a duplicate with the same
       webhook-id, never a lost event)
    4. a finalize message, when it was the last of its job's items to end

The caller sets what only it knows (the weights revision, the item's timings) and hands in how to publish
(Celery messages on a worker and in the control plane, plain calls in local mode).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from jobs import records
from jobs.errors import Failure
from jobs.lifecycle import ItemStatus
from jobs.models import PROGRESS_EVERY, Event, ItemRecord, JobRecord, item_event_id, progress_event_id
from jobs.storage import ObjectStore
from jobs.store import Store, Transition
from jobs.submit import now_iso

Publish = Callable[[list[Event]], None]
AT_ONCE = 16  # items of one call ended side by side (each one's record write, then its move)


def end_items(
    store: Store,
    objects: ObjectStore,
    job: JobRecord,
    items: Iterable[ItemRecord],
    status: ItemStatus,
    *,
    publish: Publish,
    finalize: Callable[[str], None],
    failure: Failure | None = None,
    reason: str | None = None,
    alongside: Callable[[], object] | None = None,
    written: Callable[[], object] | None = None,
) -> list[str]:
    """End each of `items` (of `job`, whose record lives in `objects`) as `status`, with `failure` (why it has
    no output) or `reason` (why it was cancelled). `alongside` (one item only): writes done side by side with
    its record, before its move (a completed item's images); `written`: called once they are all stored,
    before the move (what fails after it is not the writes'). Returns the ids of those this call ended."""
    at = now_iso()

    def end(item: ItemRecord) -> Transition:
        item.status, item.reason, item.updated_at = status, reason, at
        item.error, item.error_kind = (failure.message, failure.kind) if failure else (None, None)
        # 1. the durable record (and what goes beside it), then 2. the move
        records.write_item_result(objects, item, alongside)
        if written is not None:
            written()
        return store.transition(item, status)

    items = list(items)
    if alongside is not None and len(items) != 1:
        raise ValueError("writes alongside an item's record are for one item")
    if len(items) > 1:  # several items (a cancel): their records are written side by side, each before its move
        with ThreadPoolExecutor(min(AT_ONCE, len(items)), thread_name_prefix="end-items") as pool:
            moves = list(pool.map(end, items))
    else:
        moves = [end(item) for item in items]
    ended = [item for item, move in zip(items, moves, strict=True) if move.applied]
    # a move refused because another end came first (a cancel and a completion, a duplicate attempt): this
    # call's record overwrote that end's, which is put back from the live item
    for item, move in zip(items, moves, strict=True):
        if not move.applied and move.previous and ItemStatus(move.previous).terminal:
            if (live := store.get_item(item.job_id, item.item_id)) is not None and live.status.terminal:
                records.write_item_result(objects, live)
    # 3. the events of the items this call ended, together
    if job.wants("item") and ended:  # (vendor formats: their one envelope goes with the job's event)
        announce(
            store,
            publish,
            [(job.job_id, i.item_id, item_event_id(job.job_id, i.item_id, status, i.round)) for i in ended],
        )
    # 4. the finalize, once; or, for a webhook that asked for "progress", a job.progress event now and then
    if any(move.job_done for move in moves):
        finalize(job.job_id)
    elif ended and job.wants("progress") and store.progress_due(job.job_id, PROGRESS_EVERY):
        done = max(move.done for move in moves)
        announce(store, publish, [(job.job_id, None, progress_event_id(job.job_id, done, job.round))])
    return [i.item_id for i in ended]


def end_item(
    store: Store,
    objects: ObjectStore,
    job: JobRecord,
    item: ItemRecord,
    status: ItemStatus,
    *,
    publish: Publish,
    finalize: Callable[[str], None],
    failure: Failure | None = None,
    reason: str | None = None,
    alongside: Callable[[], object] | None = None,
    written: Callable[[], object] | None = None,
) -> bool:
    """`end_items` for one item: whether this call ended it."""
    return bool(
        end_items(
            store,
            objects,
            job,
            [item],
            status,
            publish=publish,
            finalize=finalize,
            failure=failure,
            reason=reason,
            alongside=alongside,
            written=written,
        )
    )


def announce(store: Store, publish: Publish, events: list[Event]) -> None:
    """Publish webhook messages, then note them as sent: a process that later finds an ended item or job
    (a redelivered message) sends only an event nobody sent."""
    publish(events)
    by_job: dict[str, list[str]] = {}
    for job_id, _item_id, event_id in events:
        by_job.setdefault(job_id, []).append(event_id)
    for job_id, event_ids in by_job.items():
        store.mark_sent(job_id, *event_ids)
