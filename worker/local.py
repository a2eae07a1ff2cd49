"""Local embedded mode: one process, no Redis, the same item code path as a worker.

Items run one after another through `worker.process`; the store is in memory, outputs and the durable
record go to the `--out` location (a local folder, or s3://bucket/prefix), webhooks are delivered inline
with the same retry rules.

The model is loaded before the job is created, so bad weights or a bad device stop the run with their
message before any item fails. A run can be stopped (`stop`, set by the CLI on Ctrl-C): the running item
stops at its next denoising step and is left unended, `results.jsonl` lists the items that ended, and
`job.json` says when it was interrupted; `resume=True` finds that job in the same location (its durable
record, as `dreambatch reconcile` reads it) and runs the items that have no result.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from jobs import netguard, records
from jobs.errors import InputError, JobNotFound
from jobs.manifest import CheckReport, input_policy, validate_manifest
from jobs.models import ItemRecord, JobRecord, JobSpec
from jobs.reconcile import reconcile
from jobs.services import Services
from jobs.settings import Settings
from jobs.storage import check_location
from jobs.store import MemoryStore, Store
from jobs.submit import Submission, create_job, now_iso
from worker import process, webhooks
from worker.runtime import Runtime

log = logging.getLogger("dreambatch.local")


class Observer:
    """What a local run reports as it goes (the CLI draws its progress bar from it); each method may be left
    as it is here, doing nothing."""

    def loading(self) -> None:
        """The model is about to load (it may take a while)."""

    def begin(self, job: JobRecord, pending: int) -> None:
        """The job exists (or was found, resuming) and the model is loaded; `pending` items will run."""

    def started(self, item_id: str) -> None:
        """An item starts."""

    def step(self, item_id: str, step: int, steps: int) -> None:
        """The running item finished denoising step `step` of `steps`."""

    def ended(self, item: ItemRecord) -> None:
        """An item ended (its status, error and output are in `item`)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, delivered at a denoising step (or between items): the running item is left unended."""


def run_local(
    manifest: Path,
    spec: JobSpec,
    *,
    settings: Settings,
    weights: str | None = None,
    device: str = "cpu",
    on_item: Callable[[str, str], None] | None = None,
    observer: Observer | None = None,
    stop: threading.Event | None = None,
    resume: bool = False,
) -> Submission:
    """Run `manifest` as `spec` says, here; `spec.output` (a folder, or s3://bucket/prefix; default `out`) is
    where images and the durable record go. Returns the submission, its `job` as it ended (or, when `stop` was
    set, as it was left: `interrupted_at` set)."""
    watch = observer or Observer()
    stop = stop or threading.Event()

    def on_step(job_id: str, item_id: str, step: int, steps: int) -> None:
        watch.step(item_id, step, steps)
        if stop.is_set():
            raise Interrupted

    out, model = spec.output or "out", spec.model
    check_location(out, settings)
    queue: deque[str] = deque()
    finals: list[str] = []
    events: list[tuple[str, str | None, str]] = []
    services = Services(
        settings,
        store=MemoryStore(on_step=on_step),
        publish=lambda _job, ids: queue.extend(ids),
        notify=events.extend,
        finalize=finals.append,
    )
    store = services.store  # (the MemoryStore above)
    objects = services.objects(out)
    runtime = Runtime(services, model=model, weights=weights, device=device)
    ctx = process.Context(
        settings=settings,
        store=store,
        runner=runtime.runner,
        objects=lambda _loc: objects,
        notify=services.notify,
        finalize=services.finalize,
        revision=lambda: runtime.model_revision,
        safety=runtime.safety,
    )

    # 1. the job: found again (resume), or validated, then the model loaded, then created; ids go to a local queue
    if resume:
        job_id = _interrupted_job(objects, manifest, model)
        watch.loading()
        runtime.runner()
        record = records.read_job(objects, job_id)
        if record is None:
            raise JobNotFound(f"job {job_id}: its job.json is gone from {objects.location}; run without --resume")
        records.write_job_spec(objects, record.model_copy(update={"interrupted_at": None}))
        reconcile(job_id, objects, store, queue.extend, finals.append, batch=settings.celery.publish_batch)
        sub = Submission(services.job(job_id), len(queue), 0, CheckReport(), job_done=bool(finals))
    else:
        if spec.webhook:
            netguard.check_url(spec.webhook, settings.netpolicy())
        policy = input_policy(manifest, settings)
        report = validate_manifest(manifest, model, spec.defaults, policy)
        if report.valid and (spec.skip_invalid or not report.issues):  # else create_job says what is wrong
            watch.loading()
            runtime.runner()
        sub = create_job(spec.model_copy(update={"output": objects.location}), manifest, services, policy=policy)
        job_id = sub.job.job_id
    watch.begin(services.job(job_id), len(queue))

    # 2. run every item, retrying transient failures after their backoff; Ctrl-C stops at the next step
    try:
        while queue:
            if stop.is_set():
                raise Interrupted
            item_id = queue.popleft()
            watch.started(item_id)
            outcome = process.process_item(ctx, job_id, item_id)
            if outcome.retry_in is not None:
                time.sleep(outcome.retry_in)
                queue.appendleft(item_id)
                continue
            item = store.get_item(job_id, item_id)
            if item is not None and item.status.terminal:
                watch.ended(item)
            if on_item:
                on_item(item_id, str(outcome))
            _flush_events(ctx, events)
    except KeyboardInterrupt:
        sub.job = _interrupt(ctx, store, objects, job_id, events)
        return sub

    # 3. finalize (results.jsonl) and send the job's event
    for job in dict.fromkeys(finals):
        process.finalize_job(ctx, job)
    _flush_events(ctx, events)
    sub.job = services.job(job_id)
    return sub


def _interrupted_job(objects, manifest: Path, model: str) -> str:
    """The newest unfinished job of `manifest` and `model` in this location (its `_open` marker is there)."""
    found = []
    for job_id in records.open_jobs(objects):
        job = records.read_job(objects, job_id)
        if job is None:
            continue
        same = job.manifest and (job.manifest == str(manifest) or Path(job.manifest).resolve() == manifest.resolve())
        if same and job.model == model and not job.submitting:
            found.append(job)
    if not found:
        raise InputError(
            f"nothing to resume in {objects.location}: no unfinished run of {manifest} with model "
            f"{model}; run it without --resume"
        )
    return max(found, key=lambda j: j.created_at).job_id


def _interrupt(
    ctx: process.Context, store: Store, objects, job_id: str, events: list[tuple[str, str | None, str]]
) -> JobRecord:
    """Leave a stopped run resumable: results.jsonl lists the items that ended (their records are written
    already), job.json says when it stopped; the unended items run with `--resume`."""
    ended = [item for item in store.items(job_id) if item.status.terminal]
    job = store.get_job(job_id)
    assert job is not None  # (this run's own job)
    uri, _ = records.write_results(objects, job_id, ended, job.model)
    job = job.model_copy(update={"interrupted_at": now_iso(), "results_uri": uri})
    records.write_job_spec(objects, job)
    _flush_events(ctx, events, tries=1)  # the ended items' webhooks: one quick try each, the person is waiting
    log.info("job %s interrupted: %d of %d item(s) ended", job_id, len(ended), job.total)
    return job


LOCAL_WEBHOOK_ATTEMPTS = 5  # local mode ends with the command: a few quick tries, not the worker's day-long window


def _flush_events(
    ctx: process.Context, events: list[tuple[str, str | None, str]], tries: int = LOCAL_WEBHOOK_ATTEMPTS
) -> None:
    cfg = ctx.settings.webhooks
    tries = min(cfg.max_attempts or tries, tries)
    while events:
        job_id, item_id, event_id = events.pop(0)
        for n in range(1, tries + 1):
            attempt = process.webhook_attempt(ctx, job_id, item_id, event_id)
            if attempt is None or attempt.delivered or not attempt.retryable:
                break
            if n < tries:
                time.sleep(webhooks.backoff(n, cfg.backoff_base, min(cfg.backoff_max, 30.0), attempt.retry_after))
            else:
                log.warning("webhook %s not delivered after %d attempts: %s", event_id, n, attempt.error)
