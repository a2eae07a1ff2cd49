"""One item, start to end, and one job's finalization. The Celery tasks and the local `run` mode
both call these functions, so an item takes the same path everywhere.

Collaborators come in through `Context`: the store, the runner, object storage and the two ways of
handing work on (notify a webhook, finalize a job), which are Celery messages on a worker and
plain calls in local mode.
"""

from __future__ import annotations

import base64
import functools
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

from jobs import inputs, keys, lifecycle, logs, records, vendors
from jobs.ending import Publish, announce, end_item
from jobs.errors import (
    ConfigError,
    DreambatchError,
    ErrorKind,
    Failure,
    InputError,
    ItemCancelled,
    ModelError,
    StorageUnavailable,
    TransientError,
)
from jobs.lifecycle import ItemStatus, job_outcome
from jobs.models import (
    EXTENSIONS,
    MODELS,
    ItemOutput,
    ItemRecord,
    JobRecord,
    OutputImage,
    Timings,
    WebhookEvent,
    item_event_id,
    job_event_id,
)
from jobs.settings import Settings
from jobs.storage import ObjectStore, key_of
from jobs.store import MemoryStore, Store
from jobs.submit import now_iso
from worker import geometry, imaging, loras, safety, webhooks
from worker.leases import Leases
from worker.metrics import WorkerMetrics
from worker.runners.base import EditRequest, GenerateRequest, Runner, step_index
from worker.runners.lora import LoraChoice

if TYPE_CHECKING:
    from worker.finisher import Finisher

log = logging.getLogger("dreambatch.worker")
T = TypeVar("T")


@dataclass
class Context:
    settings: Settings
    store: Store
    runner: Callable[[], Runner]  # the loaded model of this process
    objects: Callable[[str], ObjectStore]  # output location → store
    notify: Publish  # publish webhook messages: [(job_id, item_id or None, event_id)]
    finalize: Callable[[str], None]  # (job_id)
    gpu_lock: AbstractContextManager[Any] = field(default_factory=threading.Lock)
    leases: Leases | None = None  # None in local mode, where one consumer runs items one at a time
    metrics: WorkerMetrics | None = None  # this process's Prometheus metrics, when it exports them
    revision: Callable[[], str | None] = lambda: None  # the revision of this process's weights
    safety: Callable[[], safety.SafetyChecker | None] = lambda: None  # this process's safety checker, if any
    outage_since: float | None = None  # epoch s this item's message first found object storage away (its retries)
    finisher: Finisher | None = None  # a GPU worker's finishing processes (worker/finisher.py); None: ends here


@dataclass(frozen=True)
class Outcome:
    """What one call did with an item: ended it (`ended`), or left it be, and why (`note`)."""

    ended: ItemStatus | None = None  # the status this call ended the item with
    note: str = ""  # when it did not end it: what happened instead, in words
    retry_in: float | None = None  # set: run this item again after so many seconds
    outage_since: float | None = None  # set: the retry waits for object storage, away since then (epoch s)

    def __str__(self) -> str:
        return self.ended.value if self.ended else self.note


class AfterTheWrites(Exception):
    """A completed item's end failed once its images and record were stored (in its move, its messages or
    the job's finalize: Redis or the broker away), so not as the item's failure: its message comes back, and
    finds it ended (`_announce_again`) or runs it again. Carries the error as words (it may come back from a
    finishing process)."""


def process_item(ctx: Context, job_id: str, item_id: str) -> Outcome:
    with logs.context(job_id=job_id, item_id=item_id):
        try:
            return _process_item(ctx, job_id, item_id)
        except StorageUnavailable as exc:  # S3 is away for longer than an item waits in its thread: hand it back
            log.warning("item %s/%s waits for object storage: %s", job_id, item_id, exc)
            wait = random.uniform(0.5, 1.0) * min(30.0, max(1.0, ctx.settings.s3.outage_wait))
            since = ctx.outage_since or time.time()
            return Outcome(note=f"waiting for object storage: {exc}", retry_in=wait, outage_since=since)


def _outage_too_long(ctx: Context) -> bool:
    """Whether object storage has failed this item for longer than `s3.outage_limit`: from then on its
    errors count as attempts, and an item S3 keeps refusing ends failed after `celery.max_attempts`."""
    return ctx.outage_since is not None and time.time() - ctx.outage_since > ctx.settings.s3.outage_limit


def _patiently(ctx: Context, what: Callable[[], T]) -> T:
    """`what()`, tried again with backoff while object storage fails, for up to `s3.outage_wait` s; then the
    StorageUnavailable goes up, to `process_item`, which hands the message back without spending an attempt."""
    deadline, n = time.monotonic() + ctx.settings.s3.outage_wait, 0
    while True:
        try:
            return what()
        except StorageUnavailable as exc:
            n += 1
            wait = webhooks.backoff(n, 0.5, 10.0)
            if time.monotonic() + wait > deadline:
                raise
            log.warning("object storage failed (%s); trying again in %.1fs", exc, wait)
            time.sleep(wait)


def _process_item(ctx: Context, job_id: str, item_id: str) -> Outcome:
    # 1. load the item; an item that already ended is not run again
    item = ctx.store.get_item(job_id, item_id)
    job = ctx.store.get_job(job_id)
    if item is None or job is None:
        log.warning("item %s/%s not found; dropping its message", job_id, item_id)
        return Outcome(note="not found")
    if item.status.terminal:  # a redelivery: finish what a lost worker may have left undone
        return _announce_again(ctx, job, item)
    if job.submitting:  # its submission has not committed: hold the item back, or drop it if it never will
        job = _await_commit(ctx, job)
        age = time.time() - datetime.fromisoformat(job.created_at).timestamp()
        if job.submit_aborted or (job.submitting and age > ctx.settings.celery.submit_grace):
            return _end(
                ctx,
                job,
                item,
                ItemStatus.CANCELLED,
                Failure(ErrorKind.CANCELLED, "its submission did not complete, so nothing of it runs"),
            )
        if job.submitting:
            return Outcome(note="waiting for its submission", retry_in=1.0)
    # a cancelled job's items, and items not started before the job's deadline, end here, unrun
    if job.cancel_requested:
        return _end(ctx, job, item, ItemStatus.CANCELLED, reason="cancelled")
    if job.expires_at and time.time() >= job.expires_at and item.status == ItemStatus.QUEUED:
        return _end(ctx, job, item, ItemStatus.CANCELLED, reason="expired")

    # 2. take the item's execution lease: a second delivery of an item running elsewhere waits for it
    token = None
    if ctx.leases is not None:  # None in local mode: one consumer, nothing runs twice at once
        token, wait = ctx.leases.acquire(job_id, item_id)
        if token is None:
            log.info("item %s/%s is running elsewhere; trying again in %.1fs", job_id, item_id, wait)
            return Outcome(note="running elsewhere", retry_in=wait + 0.5)
    try:
        # a job with --max-concurrency runs this item only when it gets one of the job's slots
        if job.max_concurrency:
            lease = ctx.settings.celery.task_time_limit + 60
            if not ctx.store.acquire_slot(job_id, item_id, job.max_concurrency, lease):
                return Outcome(note="waiting for a concurrency slot", retry_in=ctx.settings.celery.slot_wait)
        try:
            return _attempt(ctx, job, item)
        finally:
            if job.max_concurrency:
                ctx.store.release_slot(job_id, item_id)
    finally:
        if token is not None and ctx.leases is not None:
            ctx.leases.release(job_id, item_id, token)


def _await_commit(ctx: Context, job: JobRecord, wait: float = 5.0) -> JobRecord:
    """A submission usually commits within moments of its first tasks: wait for it here, in order, rather
    than send the item to the back of the queue."""
    deadline = time.monotonic() + wait
    while job.submitting and not job.submit_aborted and time.monotonic() < deadline:
        time.sleep(0.01)  # (one HGETALL: the first item of a job starts within 10 ms of its commit)
        job = ctx.store.get_job(job.job_id) or job
    return job


def _attempt(ctx: Context, job: JobRecord, item: ItemRecord) -> Outcome:
    # 3. start an attempt; an item that keeps killing its worker ends failed instead of looping
    started = time.time()
    item.updated_at = now_iso()
    item.timings.started_at = round(started, 3)
    if item.enqueued_at and item.attempts == item.round_start_attempts:
        item.timings.queue_wait_s = round(started - item.enqueued_at, 4)
    move = ctx.store.transition(item, ItemStatus.RUNNING, count_attempt=True)
    if not move.applied:
        return Outcome(note="skipped")
    item.attempts = move.attempts
    this_round = move.attempts - item.round_start_attempts
    if this_round > ctx.settings.celery.max_attempts:
        return _end(
            ctx,
            job,
            item,
            ItemStatus.FAILED,
            Failure(
                ErrorKind.LOST,
                f"gave up after {this_round - 1} attempts that did not finish (worker lost or timed out)",
            ),
        )
    log.info("item %s/%s started (attempt %d)", item.job_id, item.item_id, move.attempts)
    _announce_start(ctx, job)
    try:
        return _run_attempt(ctx, job, item, this_round)
    except StorageUnavailable:  # object storage's outage, not the item's: the attempt does not count
        if not _outage_too_long(ctx):
            ctx.store.refund_attempt(item.job_id, item.item_id)
        raise


def _run_attempt(ctx: Context, job: JobRecord, item: ItemRecord, this_round: int) -> Outcome:
    try:
        # 4. fetch the input (edits) and 5. run the model: the only step that holds the GPU.
        # Between denoising steps the job's cancel flag is read; a cancel stops the item there.
        _stop_if_cancelled(ctx, item)
        if MODELS[job.model].kind == "edit":
            images, output = _run_edit(ctx, job, item)
        else:
            runner = ctx.runner()  # (loads the model on first use in local mode: not a wait for the GPU)
            lora = loras.choice(item, job, ctx.settings, ctx.objects)  # its file in the local cache, if any
            asked = time.time()
            with ctx.gpu_lock:
                _stop_if_cancelled(ctx, item)
                with _model_failures():
                    result = runner.generate(_request(item, lora), on_step=_step_check(ctx, item))
            _record_model_time(ctx, item, result, asked)
            images, output = result.images, ItemOutput(seed=item.seed, lora=loras.recorded(item, lora))

        # 5b. the exact size a caller asked for, then the safety checker on what it will get (worker/safety.py)
        images = imaging.requested_size(images, item.params)
        images, output.nsfw, output.safety = safety.screen(
            ctx.safety, item.params, images, ctx.gpu_lock, ctx.settings.safety.action
        )

        # 6. encode and store the images beside the item's record, then 7. move it, notify, and finalize the job
        # if this was its last item: outside the GPU lock (and the model's process), so the next item's
        # inference overlaps
        return _end(ctx, job, item, ItemStatus.COMPLETED, images=(images, output))
    except AfterTheWrites as exc:  # (not an error of the item's: what it made is stored)
        log.warning(
            "item %s/%s: its end stopped once its images were stored: %s; again in 1s", item.job_id, item.item_id, exc
        )
        return Outcome(note=f"stored; its end comes again: {exc}", retry_in=1.0)
    except ItemCancelled as exc:
        log.info("item %s/%s stopped: %s", item.job_id, item.item_id, exc)
        return _end(ctx, job, item, ItemStatus.CANCELLED, reason="cancelled")
    except (InputError, ModelError, ConfigError) as exc:
        return _end(ctx, job, item, ItemStatus.FAILED, Failure.of(exc))
    except TransientError as exc:
        storage = isinstance(exc, StorageUnavailable)
        if storage and not _outage_too_long(ctx):
            raise  # waited out by process_item, the attempt refunded by _attempt
        if this_round >= ctx.settings.celery.max_attempts:
            return _end(ctx, job, item, ItemStatus.FAILED, Failure.of(exc, f"{exc} (after {this_round} attempts)"))
        log.warning("item %s/%s attempt %d: %s; retrying", item.job_id, item.item_id, item.attempts, exc)
        since = ctx.outage_since if storage else None
        return Outcome(note=f"retrying: {exc}", retry_in=webhooks.backoff(this_round, 1.0, 30.0), outage_since=since)
    except Exception as exc:  # a bug must not take the worker down with it
        log.exception("item %s/%s failed", item.job_id, item.item_id)
        return _end(ctx, job, item, ItemStatus.FAILED, Failure.of(exc))


def _announce_start(ctx: Context, job: JobRecord) -> None:
    """A job whose webhook asked for "start" gets job.running when its first item starts (once per round; two
    items starting at once may both send it: the same webhook-id, which a receiver keeps once)."""
    if job.wants("start") and job.webhook_format not in vendors.WEBHOOKS:
        event_id = job_event_id(job.job_id, "running", job.round)
        if not ctx.store.was_sent(job.job_id, event_id):
            _notify(ctx, job.job_id, None, event_id)


def _stop_if_cancelled(ctx: Context, item: ItemRecord) -> None:
    if ctx.store.cancel_requested(item.job_id):
        raise ItemCancelled(f"job {item.job_id} was cancelled before this item's next step")


STEP_EVERY = 0.05  # s: the most often a running item records its step and reads its cancel flags


def _step_check(ctx: Context, item: ItemRecord) -> Callable[[int], None]:
    """Called by the runner after each denoising step (0-based): records progress and stops on cancel, at its
    first step and then at most every STEP_EVERY s (one Redis round trip each; a GPU's steps take longer than
    that, so there it is every step, and a cancel stops an item within STEP_EVERY s of the step it came in)."""
    steps = item.params.get("steps", 0)
    last = 0.0

    def check(step: int) -> None:
        nonlocal last
        now = time.monotonic()
        if step and now - last < STEP_EVERY:
            return
        last = now
        if ctx.store.record_step(item.job_id, item.item_id, step + 1, steps):
            raise ItemCancelled(f"job {item.job_id} was cancelled; stopped after step {step + 1}/{steps}")

    return check


def _request(item: ItemRecord, lora: LoraChoice | None = None) -> GenerateRequest:
    return GenerateRequest.of(item.params, seed=item.seed if item.seed is not None else item.params["seed"], lora=lora)


def _run_edit(ctx: Context, job: JobRecord, item: ItemRecord) -> tuple[list, ItemOutput]:
    """Fetch and decode the input, fit it to the model's canvas, edit, and bring it back to the output size.
    Returns the images and the item's output record with the sizes it worked at."""
    p = item.params
    fetching = time.perf_counter()
    data = _patiently(ctx, lambda: inputs.fetch(p["image"], job, ctx.settings, ctx.objects))
    source = imaging.decode_input(data, ctx.settings.inputs.max_pixels)
    try:
        target = geometry.output_size(source.size, p["size"], p.get("aspect_ratio"), p.get("resolution"))
    except ValueError as exc:
        raise InputError(str(exc)) from None
    shaped = geometry.to_shape(source, target, p["geometry"])
    runner = ctx.runner()
    with _model_failures():
        canvas_size = runner.canvas_size(*shaped.size)
    canvas, box = geometry.fit(shaped, canvas_size, p["geometry"])
    item.timings.fetch_s = round(time.perf_counter() - fetching, 4)
    lora = loras.choice(item, job, ctx.settings, ctx.objects)
    request = EditRequest(
        image=canvas,
        instruction=p["instruction"],
        target_description=p["target_description"],
        negative_prompt=p["negative_prompt"],
        width=canvas_size[0],
        height=canvas_size[1],
        seed=item.seed if item.seed is not None else p["seed"],
        steps=p["steps"],
        guidance_scale=p["guidance_scale"],
        image_guidance_scale=p["image_guidance_scale"],
        refine_strength=p["refine_strength"],
        clip_cfg_norm=bool(p["clip_cfg_norm"]),
        num_images=p["num_images"],
        lora=lora,
    )
    check = _step_check(ctx, item)
    asked = time.time()
    with ctx.gpu_lock:
        _stop_if_cancelled(ctx, item)
        with _model_failures():
            result = runner.edit(request, on_step=lambda info: check(step_index(info)))
    _record_model_time(ctx, item, result, asked)
    output = ItemOutput(
        seed=item.seed,
        processed_size=list(canvas_size),
        input_size=list(source.size),
        lora=loras.recorded(item, lora),
    )
    return [geometry.unfit(image, box, target) for image in result.images], output


@contextmanager
def _model_failures() -> Iterator[None]:
    """The runner's boundary: what a runner raises that is not one of ours (a ValueError for a request it
    refuses, a RuntimeError from torch) is the model failing on this item, a ModelError (the original chained
    and logged). A cancel from `on_step`, a ModelError or a ConfigError a runner raises pass through as they are."""
    try:
        yield
    except DreambatchError:
        raise
    except Exception as exc:
        log.exception("the model failed on this item")
        raise ModelError(f"{type(exc).__name__}: {exc}") from exc


def _record_model_time(ctx: Context, item: ItemRecord, result, asked: float) -> None:
    """The model's time for the item, by stage, when it started, and how long the item waited for it (`asked`:
    when the item was ready for the model: the GPU lock, or a micro-batch, kept it waiting from then). The job's
    GPU-seconds count every attempt's."""
    item.timings.inference_s = round(result.inference_s, 4)
    for stage, seconds in result.stages.items():
        if f"{stage}_s" in Timings.model_fields:
            setattr(item.timings, f"{stage}_s", round(seconds, 4))
    ctx.store.add_gpu_seconds(item.job_id, result.inference_s)
    if result.started_at is not None:
        item.timings.model_started_at = round(result.started_at, 4)
        item.timings.model_wait_s = round(max(0.0, result.started_at - asked), 4)


def _beside(ctx: Context, step: Callable[..., T], *args: Any) -> T:
    """`step(ctx, *args)`, in a finishing process when this worker has them (worker/finisher.py)."""
    return ctx.finisher.run(ctx, step, *args) if ctx.finisher else step(ctx, *args)


def _encoded(objects: ObjectStore, item: ItemRecord, images, out: ItemOutput) -> Callable[[], None]:
    """Encode each image into `out` (its URI, URL, size, type), and return the writes that store them: done
    beside the item's record, they time themselves into its timings (upload_s, total_s)."""
    fmt, quality = item.params["output_format"], item.params["output_quality"]
    item.timings.encode_s = 0.0
    writes = []
    for n, image in enumerate(images):
        encoding = time.perf_counter()
        data, content_type = imaging.encode(image, fmt, quality)
        item.timings.encode_s = round(item.timings.encode_s + time.perf_counter() - encoding, 4)
        suffix = "" if len(images) == 1 else f"_{n}"
        if item.params.get("output_key"):  # the row names its key (a mirrored catalog layout)
            stem, dot, ext = item.params["output_key"].rpartition(".")
            key = f"{stem}{suffix}{dot}{ext}"
        else:
            key = keys.S3_OUTPUT.format(
                prefix="", job_id=item.job_id, item_id=item.item_id, suffix=suffix, ext=EXTENSIONS[fmt]
            )
        metadata = {"seed": str(item.seed), "item": item.item_id, **_source(item)}
        writes.append(functools.partial(objects.put, key, data, content_type, metadata))
        b64 = base64.b64encode(data).decode() if item.params.get("response_format") == "b64_json" else None
        out.images.append(
            OutputImage(
                s3_uri=objects.uri(key),
                url=objects.url(key),
                width=image.width,
                height=image.height,
                content_type=content_type,
                b64_json=b64,
            )
        )

    if item.timings.started_at:  # (the record's, written beside the images: without their upload)
        item.timings.total_s = round(time.time() - item.timings.started_at, 4)

    def store() -> None:
        started = time.perf_counter()
        for write in writes:
            write()
        item.timings.upload_s = round(time.perf_counter() - started, 4)
        if item.timings.started_at:
            item.timings.total_s = round(time.time() - item.timings.started_at, 4)

    return store


def _source(item: ItemRecord) -> dict[str, str]:
    """The S3 metadata naming the object an edit was made from (a catalog row's source_key, source_etag and
    source_version), so an edited object says which upload it is."""
    names = ("source_key", "source_etag", "source_version")
    found = {n.replace("_", "-"): str(item.metadata[n]) for n in names if item.metadata.get(n)}
    return {k: v if v.isascii() else quote(v) for k, v in found.items()}  # S3 metadata is ASCII: a key URL-quoted


def _end(
    ctx: Context,
    job: JobRecord,
    item: ItemRecord,
    status: ItemStatus,
    failure: Failure | None = None,
    reason: str | None = None,
    images: tuple[list, ItemOutput] | None = None,
) -> Outcome:
    """End the item as every caller does (jobs.ending: record, move, notify, finalize), with what only this
    process knows: the weights it ran with, its attempt's time, and (`images`: a completed item's images and
    output so far) what it made, stored beside its record."""
    item.model_revision = ctx.revision() or item.model_revision  # (loaded by now)
    ended, item = _beside(ctx, _ended, job, item, status, failure, reason, images)
    if not ended:
        return Outcome(note="skipped")
    log.info(
        "item %s/%s %s%s",
        item.job_id,
        item.item_id,
        status.value,
        f" ({reason})" if reason else "",
        extra={"status": status.value, "error": item.error, "error_kind": item.error_kind},
    )
    if ctx.metrics:
        ctx.metrics.item_ended(job.model, status.value, item.timings)
    return Outcome(status)


def _ended(
    ctx: Context,
    job: JobRecord,
    item: ItemRecord,
    status: ItemStatus,
    failure: Failure | None,
    reason: str | None,
    images: tuple[list, ItemOutput] | None = None,
) -> tuple[bool, ItemRecord]:
    """`_end`'s part where it runs (jobs.ending.end_item): whether it ended the item, and the item as ended."""
    objects = ctx.objects(job.output)
    if images is not None:  # (a copy: an item whose images could not be stored ends again without them)
        item = item.model_copy(deep=True)
    stored = False

    def note_stored() -> None:
        nonlocal stored
        stored = True

    def end() -> bool:
        store = None
        if images is not None:
            item.output = images[1].model_copy(deep=True)
            store = _encoded(objects, item, images[0], item.output)
        return end_item(
            ctx.store,
            objects,
            job,
            item,
            status,
            publish=ctx.notify,
            finalize=ctx.finalize,
            failure=failure,
            reason=reason,
            alongside=store,
            written=note_stored if images is not None else None,
        )

    try:
        return _patiently(ctx, end), item
    except Exception as exc:
        if stored:
            raise AfterTheWrites(f"{type(exc).__name__}: {exc}") from exc
        raise


SEND_GRACE = 5.0  # s the process that ended an item or a job has to publish its event before another does
NUDGE_EVERY = 30.0  # s between finalize messages sent for a job on behalf of a lost worker


class SendLater(Exception):
    """Not yet: the process that ended this may still be publishing its event; look again in `seconds`."""

    def __init__(self, seconds: float):
        super().__init__(f"look again in {seconds:.1f}s")
        self.seconds = seconds


def _notify(ctx: Context, job_id: str, item_id: str | None, event_id: str) -> None:
    """Publish an event's webhook message, then note it went out (jobs.ending.announce)."""
    announce(ctx.store, ctx.notify, [(job_id, item_id, event_id)])


def _send_if_unsent(ctx: Context, job_id: str, item_id: str | None, event_id: str, ended_at: str) -> None:
    """Publish an event nobody published. Within SEND_GRACE of the end, the process that ended it may still
    be about to: raises SendLater rather than race it into a duplicate."""
    if ctx.store.was_sent(job_id, event_id):
        return
    age = time.time() - datetime.fromisoformat(ended_at).timestamp()
    if age < SEND_GRACE:
        raise SendLater(SEND_GRACE - age + 0.1)
    log.info("job %s: sending event %s, which the process that ended it did not send", job_id, event_id)
    _notify(ctx, job_id, item_id, event_id)


def _announce_again(ctx: Context, job: JobRecord, item: ItemRecord) -> Outcome:
    """An item's message comes back after it ended when its worker died between the item's last transition
    and the messages that follow it (or when `cancel` ended it while queued). Send its webhook if nobody
    did, and nudge the finalizer if every item has ended and the job has not (one nudge per NUDGE_EVERY s:
    a drained queue of a cancelled job does not flood the io queue)."""
    if job.wants("item"):
        try:
            _send_if_unsent(
                ctx,
                item.job_id,
                item.item_id,
                item_event_id(item.job_id, item.item_id, item.status, item.round),
                item.updated_at,
            )
        except SendLater as later:
            return Outcome(note="skipped", retry_in=later.seconds)
    if (
        not job.finished_at
        and job.total
        and lifecycle.ended(job.counts) >= job.total
        and ctx.store.nudge_finalize(item.job_id, NUDGE_EVERY)
    ):
        ctx.finalize(item.job_id)
    return Outcome(note="skipped")


def finalize_job(ctx: Context, job_id: str) -> str | None:
    """Write the job's durable end (results.jsonl, job.json) and mark it terminal, once. Returns the new
    status, or None."""
    # 1. a job that already ended is left alone, but for its webhook if the process that ended it died first
    job = ctx.store.get_job(job_id)
    if job is None:
        return None
    if job.finished_at:  # (SendLater: the finalizer that ended it may still be sending the event)
        if job.wants("job"):
            _send_if_unsent(ctx, job_id, None, job_event_id(job_id, job.status, job.round), job.finished_at)
        return None
    if job.counts.get(ItemStatus.QUEUED, 0) or job.counts.get(ItemStatus.RUNNING, 0):
        return None  # a late duplicate for a job that `retry` re-opened: its last item finalizes it
    # 2. its durable end: results.jsonl (one line per manifest row, in manifest order), the final job.json
    # and the outbox marker, side by side (records.close_job); 3. then terminal exactly once, then the webhook
    objects = ctx.objects(job.output)
    status = job_outcome(job.counts, cancelled=job.cancel_requested)
    results_uri, at = objects.uri(records.results_key(job_id)), now_iso()
    ended = job.model_copy(update={"status": status, "finished_at": at, "results_uri": results_uri})
    outbox = None
    if job.webhook and not isinstance(ctx.store, MemoryStore):  # (a local run has no Redis to lose)
        # its events may be retried for a while: a Redis loss meanwhile has reconcile send them again
        outbox = time.time() + ctx.settings.webhooks.retry_window
    records.close_job(objects, ended, ctx.store.items(job_id), outbox_until=outbox)
    if not ctx.store.finish_job(job_id, status, results_uri, at, round_=job.round):
        # another finalizer ended it first, or a `retry` re-opened it while the above was written (its new
        # round's items are queued): the live job's job.json, not this one's, is the record
        live = ctx.store.get_job(job_id)
        if live and live.finished_at != at:
            records.write_job_spec(objects, live)
        return None
    job = ended
    log.info("job %s %s", job_id, status.value, extra={"job_id": job_id, "status": status.value})
    # 4. the review contact sheet, when the job asked for one (before the webhook, so it is there to open)
    if job.review_sheet:
        _review_sheet(ctx, job)
    if job.wants("job"):
        _notify(ctx, job_id, None, job_event_id(job_id, status.value, job.round))
    # 5. its _open marker goes, off the webhook's path (one left behind, by a finalizer that died here, is
    # swept as ended)
    records.mark_ended(objects, job_id)
    return status.value


def _presigned(ctx: Context, job: JobRecord):
    """Image → a URL the webhook's receiver can fetch (presigned for api.url_expires s; else the URI)."""
    objects = ctx.objects(job.output)

    def url_for(image: OutputImage) -> str | None:
        key = key_of(job.output, image.s3_uri or "")
        return (objects.url(key, ctx.settings.api.url_expires) if key else None) or image.url or image.s3_uri

    return url_for


def _review_sheet(ctx: Context, job: JobRecord) -> None:
    """Best effort: a sheet that cannot be made is logged; the job has ended either way."""
    from worker.contact_sheet import make_sheet

    try:
        make_sheet(job.job_id, ctx.objects(job.output), ctx.settings, ctx.objects)
    except Exception:
        log.exception("job %s: review sheet not made (make it with: dreambatch sheet %s)", job.job_id, job.job_id)


def _sheet_url(ctx: Context, job: JobRecord) -> str | None:
    """The review sheet's first page as a URL the receiver can open (presigned when the store can), or None."""
    if not job.review_sheet:
        return None
    key = keys.S3_SHEET.format(prefix="", job_id=job.job_id, page="", ext="html")
    return ctx.objects(job.output).url(key, ctx.settings.api.url_expires) or (job.catalog or {}).get("sheet")


def _event_kind(job_id: str, item_id: str | None, event_id: str) -> WebhookEvent:
    """Which of a webhook's event kinds (jobs.models.WEBHOOK_EVENTS) an event is."""
    if item_id is not None:
        return "item"
    status = re.sub(r"\.r\d+$", "", event_id.removeprefix(f"evt_{job_id}_"))  # (a retry round's suffix)
    if status == "running":
        return "start"
    return "progress" if status.startswith("progress.") else "job"


def webhook_attempt(
    ctx: Context, job_id: str, item_id: str | None, event_id: str, client=None
) -> webhooks.Attempt | None:
    """One delivery attempt of one event, logged; None when there is nothing to send."""
    job = ctx.store.get_job(job_id)
    if job is None or not job.webhook or job.webhook_disabled:
        return None
    kind = _event_kind(job_id, item_id, event_id)
    if not job.wants(kind):  # (an event queued before it was filtered out)
        return None
    if job.webhook_format in vendors.WEBHOOKS:  # a vendor's envelope, once, when the request (a one-item job) ends
        if item_id is not None or kind != "job":
            return None
        payload = vendors.webhook_body(job, next(ctx.store.items(job_id), None), _presigned(ctx, job))
    elif kind == "progress":
        payload = webhooks.progress_payload(job, ctx.store.running_steps(job_id))
    elif item_id is None:
        payload = webhooks.job_payload(job, started=kind == "start")
        if job.catalog:  # a scheduled run's job: its schedule, what it found deleted or skipped, its sheet
            payload["catalog"] = {**job.catalog, "sheet_url": _sheet_url(ctx, job)}
    else:
        item = ctx.store.get_item(job_id, item_id)
        if item is None:
            return None
        payload = webhooks.item_payload(job, item)
    attempt = webhooks.deliver(
        job.webhook,
        event_id,
        payload,
        secrets=ctx.settings.signing_secrets(),
        timeout=ctx.settings.webhooks.timeout,
        policy=ctx.settings.netpolicy(),
        client=client,
    )
    ctx.store.log_event(job_id, event_id, attempt.as_dict())
    if ctx.metrics:
        ctx.metrics.webhook_attempt(attempt)
    if attempt.status_code == 410:  # Gone: the receiver asks for no more events of this job
        ctx.store.disable_webhook(job_id)
    return attempt
