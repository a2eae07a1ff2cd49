"""One item, start to end, and one job's finalization. The Celery tasks and the local `run` mode
both call these functions, so an item takes the same path everywhere.

Collaborators come in through `Context`: the store, the runner, object storage and the two ways of
handing work on (notify a webhook, finalize a job), which are Celery messages on a worker and
plain calls in local mode.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from jobs import keys, records
from jobs.errors import ConfigError, InputError, ModelError, TransientError
from jobs.lifecycle import ItemStatus, job_outcome
from jobs.models import EXTENSIONS, ItemOutput, ItemRecord, OutputImage
from jobs.settings import Settings
from jobs.storage import ObjectStore
from jobs.store import Store
from jobs.submit import now_iso
from worker import imaging, webhooks
from worker.runners.base import GenerateRequest, Runner

log = logging.getLogger("dreambatch.worker")


@dataclass
class Context:
    settings: Settings
    store: Store
    runner: Callable[[], Runner]  # the loaded model of this process
    objects: Callable[[str], ObjectStore]  # output location → store
    notify: Callable[[str, str | None, str], None]  # (job_id, item_id or None, event_id)
    finalize: Callable[[str], None]  # (job_id)
    gpu_lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class Outcome:
    status: str  # the item's status after this call, or "skipped"
    retry_in: float | None = None  # set: run this item again after so many seconds


def process_item(ctx: Context, job_id: str, item_id: str) -> Outcome:
    # 1. load the item; an item that already ended is not run again
    item = ctx.store.get_item(job_id, item_id)
    job = ctx.store.get_job(job_id)
    if item is None or job is None:
        log.warning("item %s/%s not found; dropping its message", job_id, item_id)
        return Outcome("skipped")
    if ItemStatus(item.status).terminal:
        return Outcome("skipped")

    # 2. start an attempt; an item that keeps killing its worker ends failed instead of looping
    started = time.time()
    item.updated_at = now_iso()
    if item.enqueued_at and item.attempts == 0:
        item.timings.queue_wait_s = round(started - item.enqueued_at, 4)
    move = ctx.store.transition(item, ItemStatus.RUNNING, count_attempt=True)
    if not move.applied:
        return Outcome("skipped")
    item.attempts = move.attempts
    if move.attempts > ctx.settings.celery.max_attempts:
        return _end(ctx, item, ItemStatus.FAILED,
                    f"gave up after {move.attempts - 1} attempts that did not finish (worker lost or timed out)")

    try:
        # 3. run the model (the only step that holds the GPU)
        request = _request(item)
        with ctx.gpu_lock:
            result = ctx.runner().generate(request)
        item.timings.inference_s = round(result.inference_s, 4)

        # 4. encode and 5. upload, outside the GPU lock so the next item's inference overlaps
        t0 = time.perf_counter()
        item.output = _upload(ctx.objects(job.output), item, result.images)
        item.timings.upload_s = round(time.perf_counter() - t0, 4)
    except (InputError, ModelError, ConfigError) as exc:
        return _end(ctx, item, ItemStatus.FAILED, f"{type(exc).__name__}: {exc}")
    except TransientError as exc:
        if item.attempts >= ctx.settings.celery.max_attempts:
            return _end(ctx, item, ItemStatus.FAILED, f"{exc} (after {item.attempts} attempts)")
        log.warning("item %s/%s attempt %d: %s; retrying", job_id, item_id, item.attempts, exc)
        return Outcome("running", retry_in=webhooks.backoff(item.attempts, 1.0, 30.0))
    except Exception as exc:  # a model bug must not take the worker down with it
        log.exception("item %s/%s failed", job_id, item_id)
        return _end(ctx, item, ItemStatus.FAILED, f"{type(exc).__name__}: {exc}")

    # 6. record the result, notify, and finalize the job if this was its last item
    return _end(ctx, item, ItemStatus.COMPLETED, None)


def _request(item: ItemRecord) -> GenerateRequest:
    p = item.params
    return GenerateRequest(
        prompt=p["prompt"], negative_prompt=p.get("negative_prompt", ""), width=p["width"], height=p["height"],
        seed=item.seed if item.seed is not None else p["seed"], steps=p["steps"],
        guidance_scale=p["guidance_scale"], shift=p["shift"], scheduler=p["scheduler"], num_images=p["num_images"],
    )


def _upload(objects: ObjectStore, item: ItemRecord, images) -> ItemOutput:
    fmt, quality = item.params["output_format"], item.params["output_quality"]
    out = ItemOutput(seed=item.seed)
    for n, image in enumerate(images):
        data, content_type = imaging.encode(image, fmt, quality)
        suffix = "" if len(images) == 1 else f"_{n}"
        key = keys.S3_OUTPUT.format(prefix="", job_id=item.job_id, item_id=item.item_id, suffix=suffix,
                                    ext=EXTENSIONS[fmt])
        uri = objects.put(key, data, content_type, {"seed": str(item.seed), "item": item.item_id})
        out.images.append(OutputImage(s3_uri=uri, url=objects.url(key), width=image.width,
                                      height=image.height, content_type=content_type))
    return out


def _end(ctx: Context, item: ItemRecord, status: ItemStatus, error: str | None) -> Outcome:
    item.error = error
    item.updated_at = now_iso()
    item.status = status.value
    job = ctx.store.get_job(item.job_id)
    records.write_item_result(ctx.objects(job.output), item)  # durable before the live state says so
    move = ctx.store.transition(item, status)
    if not move.applied:
        return Outcome("skipped")
    if job.webhook:
        ctx.notify(item.job_id, item.item_id, webhooks.item_event_id(item.job_id, item.item_id, status.value))
    if move.job_done:
        ctx.finalize(item.job_id)
    return Outcome(status.value)


def finalize_job(ctx: Context, job_id: str) -> str | None:
    """Write results.jsonl and mark the job terminal, once. Returns the new status, or None."""
    # 1. a job that already ended is left alone
    job = ctx.store.get_job(job_id)
    if job is None or job.finished_at:
        return None
    # 2. results: one line per manifest row, in manifest order
    uri, _ = records.write_results(ctx.objects(job.output), job_id, ctx.store.items(job_id))
    # 3. terminal exactly once, then tell the webhook
    status = job_outcome(job.counts)
    if not ctx.store.finish_job(job_id, status, uri, now_iso()):
        return None
    job = ctx.store.get_job(job_id)
    records.write_job_spec(ctx.objects(job.output), job)
    if job.webhook:
        ctx.notify(job_id, None, webhooks.job_event_id(job_id, status.value))
    return status.value


def webhook_attempt(ctx: Context, job_id: str, item_id: str | None, event_id: str,
                    client=None) -> webhooks.Attempt | None:
    """One delivery attempt of one event, logged; None when there is nothing to send."""
    job = ctx.store.get_job(job_id)
    if job is None or not job.webhook:
        return None
    if item_id is None:
        payload = webhooks.job_payload(job)
    else:
        item = ctx.store.get_item(job_id, item_id)
        if item is None:
            return None
        payload = webhooks.item_payload(job, item)
    attempt = webhooks.deliver(job.webhook, event_id, payload, secret=ctx.settings.webhook_secret,
                               timeout=ctx.settings.webhooks.timeout, client=client)
    ctx.store.log_event(job_id, event_id, attempt.as_dict())
    return attempt
