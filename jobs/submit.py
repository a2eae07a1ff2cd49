"""Fan-out: a manifest becomes a job record, item records and one queued task per valid row.

`create_job(spec, manifest, services)` is the one way a job is made (the CLI's `submit`, the HTTP API, a
schedule's run, local mode): the `JobSpec` says how, the process's services (jobs.services) hold the
store, the output location's object store and where the work goes. One streaming pass over the file
validates every row and collects every issue (nothing is created if any row is bad, unless `skip_invalid`),
keeping each checked row in a temporary file; a second pass over that file writes items in batches and hands
each batch of ids to `services.publish` (Celery messages, or local mode's queue). Rows rejected at submit get
their webhooks once the job is real.
"""

from __future__ import annotations

import json
import logging
import secrets
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import redis.exceptions
from kombu.exceptions import KombuError

from jobs import inputs, lifecycle, loras, netguard, records
from jobs.errors import DreambatchError, ErrorKind, InputError, ManifestInvalid, TransientError
from jobs.inputs import ImageChecks, InputPolicy
from jobs.lifecycle import ItemStatus
from jobs.manifest import CheckedRow, CheckReport, input_policy, kept_rows, validate_manifest
from jobs.models import MAX_SEED, MODELS, ItemRecord, JobRecord, JobSpec, item_event_id
from jobs.services import Services
from jobs.storage import ObjectStore
from jobs.store import Store

log = logging.getLogger("dreambatch.submit")

# a broker or store connection that failed: worth retrying (a batch that was half-sent is resent whole)
CONNECTION_ERRORS = (
    ConnectionError,
    TimeoutError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    KombuError,
)


class SubmitFailed(TransientError):
    """The submission could not complete (broker or store unreachable); nothing of it will run."""


@dataclass
class Submission:
    job: JobRecord
    queued: int
    rejected: int
    report: CheckReport
    job_done: bool  # every row was rejected: the job was finalized at once


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def new_job_id() -> str:
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}"


def resolve_seed(seed: int) -> int:
    """-1 means random: pick it now, so every retry of the item renders the same image."""
    return secrets.randbelow(MAX_SEED + 1) if seed < 0 else seed


def _item(
    job_id: str, row: CheckedRow, at: str, objects: ObjectStore, max_bytes: int, checks: ImageChecks | None = None
) -> ItemRecord:
    if row.ok and row.params is not None:  # (a valid row has its params)
        params = {**row.params, "seed": resolve_seed(row.params["seed"])}
        fetched = checks.result(params["image"]) if checks and "image" in params else None
        if fetched and fetched.copy:  # a URL fetched by the submit-time check: the worker reads this copy
            params["image"] = inputs.stage_copy(fetched.copy, objects, job_id, row.item_id)
        elif "image" in params:  # local files and data URIs move next to the job, for any worker to read
            params["image"] = inputs.stage(params["image"], objects, job_id, row.item_id, max_bytes)
        if params.get("lora"):  # a local LoRA file: staged once by content, for every row and job naming it
            params["lora_source"] = params["lora"]
            params["lora"], params["lora_sha256"] = loras.stage(params["lora"], objects)
        return ItemRecord(
            job_id=job_id,
            item_id=row.item_id,
            line=row.line,
            params=params,
            metadata=row.metadata,
            seed=params["seed"],
            created_at=at,
            updated_at=at,
            enqueued_at=time.time(),
        )
    error = "; ".join(str(i) for i in row.issues)
    return ItemRecord(
        job_id=job_id,
        item_id=row.item_id,
        line=row.line,
        status=ItemStatus.FAILED,
        metadata=row.metadata,
        error=f"invalid row: {error}",
        error_kind=ErrorKind.INPUT,
        created_at=at,
        updated_at=at,
    )


# items stored in Redis together while a batch is built: records that live this briefly die young, so the garbage
# collector never walks the whole heap for them (a batch of 500 held until it is published made it do so
# every few thousand rows)
STORE_CHUNK = 50


def _fan_out(
    kept: IO[bytes],
    job: JobRecord,
    policy: InputPolicy,
    store: Store,
    objects: ObjectStore,
    dispatch: Callable[[list[str]], None],
    batch: int,
    retry_window: float,
    rejected_items: list[ItemRecord],
    checks: ImageChecks | None = None,
) -> tuple[int, int]:
    """3. Second pass, over the rows step 1 checked and kept: items in batches, each batch stored before its
    tasks are published; returns the queued and rejected counts. A publish that fails (broker unreachable) is
    retried for `retry_window` seconds: a batch published twice is harmless (items are added once; a second
    delivery of an item is skipped or waits for the first)."""
    queued = rejected = 0
    pending: list[ItemRecord] = []  # built, not yet stored
    stored: list[str] = []  # ids of this batch's queued items, stored, not yet published
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as rows_fh:
        rows_path = Path(rows_fh.name)

        def store_pending() -> None:
            nonlocal rejected
            if not pending:
                return
            store.add_items(pending)
            failed = [item for item in pending if item.status == ItemStatus.FAILED]
            for item in failed:
                records.write_item_result(objects, item)
            rejected_items.extend(failed)
            rejected += len(failed)
            stored.extend(i.item_id for i in pending if i.status == ItemStatus.QUEUED)
            pending.clear()

        def publish_stored() -> None:
            nonlocal queued
            ids = stored.copy()
            if ids:
                _retrying(lambda: dispatch(ids), retry_window, f"publishing {len(ids)} task(s)")
            queued += len(ids)
            stored.clear()

        try:
            for n, row in enumerate(kept_rows(kept), start=1):
                item = _item(job.job_id, row, job.created_at, objects, policy.max_bytes, checks)
                rows_fh.write(
                    json.dumps(
                        {
                            "id": item.item_id,
                            "line": item.line,
                            "params": item.params,
                            "metadata": item.metadata,
                            "error": item.error,
                        }
                    )
                    + "\n"
                )
                pending.append(item)
                if len(pending) >= STORE_CHUNK or n % batch == 0:
                    store_pending()
                if n % batch == 0:
                    publish_stored()
            store_pending()
            publish_stored()
            rows_fh.close()
            records.write_rows(objects, job.job_id, rows_path)
        finally:
            rows_path.unlink(missing_ok=True)
    return queued, rejected


def _retrying(call: Callable[[], None], window: float, what: str) -> None:
    """Run `call`, retrying connection failures with backoff until `window` seconds have passed."""
    deadline = time.monotonic() + window
    delay = 0.2
    while True:
        try:
            return call()
        except CONNECTION_ERRORS as exc:
            if time.monotonic() + delay > deadline:
                raise TransientError(f"{what}: broker unreachable for {window:.0f}s: {exc}") from exc
            log.warning("%s failed (%s); retrying in %.1fs", what, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _abort(store: Store, objects: ObjectStore, job_id: str) -> None:
    """Best effort: mark the submission aborted so workers drop its items at once. If Redis cannot be
    reached, workers still drop them once the job is older than the submit grace period."""
    try:
        store.abort_submission(job_id)
    except Exception as exc:
        log.warning(
            "could not mark job %s aborted (%s); workers will drop its items after the grace period", job_id, exc
        )
    try:
        records.mark_ended(objects, job_id)
    except Exception:
        pass


def create_job(
    spec: JobSpec, manifest: Path, services: Services, *, policy: InputPolicy | None = None, job_id: str | None = None
) -> Submission:
    """Validate `manifest` and make it a job as `spec` says. `policy`: where the rows' local input paths may
    point (default: the manifest's folder and the configured roots)."""
    settings, store = services.settings, services.store
    # 0. the spec: a known model, a webhook that may be called, somewhere to write
    if spec.model not in MODELS:
        raise InputError(f"model: unknown model {spec.model!r}; choose one of {', '.join(MODELS)}")
    if spec.webhook:
        netguard.check_url(spec.webhook, settings.netpolicy())
    output = services.output(spec.output)
    objects = services.objects(output)

    # 1. validate every row and its input image, keeping each checked row for step 3 (in a file: memory stays
    # flat however long the manifest); nothing is created when a row is bad (unless skip_invalid)
    with tempfile.TemporaryFile() as kept:
        policy = policy or input_policy(manifest, settings)
        checks = ImageChecks(settings, services.objects, remote=spec.check_remote)  # its copies go when it does
        report = validate_manifest(manifest, spec.model, spec.defaults, policy, checks, keep=kept)
        file_issues = [i for i in report.issues if i.line <= 0]
        if file_issues or (report.issues and not spec.skip_invalid):
            shown = [str(i) for i in report.issues]
            raise ManifestInvalid(f"{manifest}: {len(shown)} problem(s); nothing was queued", shown)
        if report.rows == 0:
            raise ManifestInvalid(f"{manifest}: no rows; nothing was queued")

        # 2. the job record, live only: workers hold its items back until the submission commits
        at = now_iso()
        job = JobRecord(
            job_id=job_id or new_job_id(),
            model=spec.model,
            defaults=spec.defaults,
            output=output,
            webhook=spec.webhook,
            manifest=str(manifest),
            total=report.rows,
            created_at=at,
            updated_at=at,
            priority=spec.priority,
            max_concurrency=spec.max_concurrency,
            expires_at=time.time() + spec.expires_after if spec.expires_after else None,
            webhook_format=spec.webhook_format,
            webhook_events=spec.webhook_events,
            submitting=True,
            review_sheet=spec.review_sheet,
            schedule=spec.schedule,
            api=spec.api,
            tenant=spec.tenant,
            catalog=spec.catalog,
        )
        store.create_job(job)
        rejected_items: list[ItemRecord] = []
        with ThreadPoolExecutor(1, thread_name_prefix="job-record") as pool:
            # the durable record (job.json, still submitting) is written while the rows fan out
            spec_written = pool.submit(records.write_job_spec, objects, job.model_copy(deep=True))
            try:
                queued, rejected = _fan_out(
                    kept,
                    job,
                    policy,
                    store,
                    objects,
                    lambda ids: services.publish(job, ids),
                    settings.celery.publish_batch,
                    settings.redis_retry_s,
                    rejected_items,
                    checks,
                )
                # 4. commit: the durable record first, then the live flag that lets workers start
                spec_written.result()
                store.commit_job(job.job_id)
            except BaseException as exc:
                _abort(store, objects, job.job_id)
                if isinstance(exc, Exception) and not isinstance(exc, (InputError, KeyboardInterrupt)):
                    raise SubmitFailed(
                        f"job {job.job_id}: {type(exc).__name__}: {exc}; nothing was queued "
                        f"(anything already published is discarded by the workers)"
                    ) from exc
                raise
    job.submitting = False
    try:
        records.open_job(objects, job)
    except DreambatchError as exc:  # the job runs; only reconcile-after-Redis-loss is off for it
        log.warning("job %s is queued, but its durable record could not be completed: %s", job.job_id, exc)
    if rejected_items and job.wants("item"):  # their terminal-state webhooks, once the job is real
        services.notify([(i.job_id, i.item_id, item_event_id(i.job_id, i.item_id, i.status)) for i in rejected_items])

    # 5. rejected rows count as ended: if they were the last to end, the job is finalized now
    live = store.get_job(job.job_id)
    ended = lifecycle.ended(live.counts) if live else 0
    job_done = rejected > 0 and ended >= job.total
    if job_done:
        services.finalize(job.job_id)
    return Submission(job, queued, rejected, report, job_done=job_done)
