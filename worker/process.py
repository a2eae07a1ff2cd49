"""One item, start to end, and one job's finalization. The Celery tasks and the local `run` mode
both call these functions, so an item takes the same path everywhere.

Collaborators come in through `Context`: the store, the runner, object storage and the two ways of
handing work on (notify a webhook, finalize a job), which are Celery messages on a worker and
plain calls in local mode.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from jobs import keys, records
from jobs.errors import ConfigError, InputError, ModelError, TransientError
from jobs.lifecycle import ItemStatus, job_outcome
from jobs.models import EXTENSIONS, ItemOutput, ItemRecord, JobRecord, OutputImage, item_event_id, job_event_id
from jobs.settings import Settings
from jobs.storage import ObjectStore
from jobs.store import Store
from jobs.submit import now_iso
from worker import geometry, imaging, inputs, webhooks
from worker.runners.base import EditRequest, GenerateRequest, Runner

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
        # 3. fetch the input (edits) and 4. run the model: the only step that holds the GPU
        if "image" in item.params:
            images, output = _run_edit(ctx, job, item)
        else:
            with ctx.gpu_lock:
                result = ctx.runner().generate(_request(item))
            item.timings.inference_s = round(result.inference_s, 4)
            images, output = result.images, ItemOutput(seed=item.seed)

        # 5. encode and upload, outside the GPU lock so the next item's inference overlaps
        t0 = time.perf_counter()
        item.output = _upload(ctx.objects(job.output), item, images, output)
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


def _run_edit(ctx: Context, job: JobRecord, item: ItemRecord) -> tuple[list, ItemOutput]:
    """Fetch and decode the input, fit it to the model's canvas, edit, and bring it back to the output size.
    Returns the images and the item's output record with the sizes it worked at."""
    p = item.params
    data = inputs.fetch(p["image"], job, ctx.settings, ctx.objects)
    source = imaging.decode_input(data, ctx.settings.inputs.max_pixels)
    try:
        target = geometry.output_size(source.size, p["size"], p.get("aspect_ratio"), p.get("resolution"))
    except ValueError as exc:
        raise InputError(str(exc)) from None
    shaped = geometry.to_shape(source, target, p["geometry"])
    runner = ctx.runner()
    canvas_size = runner.canvas_size(*shaped.size)
    canvas, box = geometry.fit(shaped, canvas_size, p["geometry"])
    request = EditRequest(
        image=canvas, instruction=p["instruction"], target_description=p["target_description"],
        negative_prompt=p["negative_prompt"], width=canvas_size[0], height=canvas_size[1], seed=item.seed,
        steps=p["steps"], guidance_scale=p["guidance_scale"], image_guidance_scale=p["image_guidance_scale"],
        refine_strength=p["refine_strength"], clip_cfg_norm=bool(p["clip_cfg_norm"]), num_images=p["num_images"],
    )
    with ctx.gpu_lock:
        result = runner.edit(request)
    item.timings.inference_s = round(result.inference_s, 4)
    output = ItemOutput(seed=item.seed, processed_size=list(canvas_size), input_size=list(source.size))
    return [geometry.unfit(image, box, target) for image in result.images], output


def _upload(objects: ObjectStore, item: ItemRecord, images, out: ItemOutput) -> ItemOutput:
    """Encode and store each image; their URIs and sizes are added to `out`."""
    fmt, quality = item.params["output_format"], item.params["output_quality"]
    for n, image in enumerate(images):
        data, content_type = imaging.encode(image, fmt, quality)
        suffix = "" if len(images) == 1 else f"_{n}"
        if item.params.get("output_key"):  # the row names its key (a mirrored catalog layout)
            stem, dot, ext = item.params["output_key"].rpartition(".")
            key = f"{stem}{suffix}{dot}{ext}"
        else:
            key = keys.S3_OUTPUT.format(prefix="", job_id=item.job_id, item_id=item.item_id, suffix=suffix,
                                        ext=EXTENSIONS[fmt])
        uri = objects.put(key, data, content_type, {"seed": str(item.seed), "item": item.item_id})
        b64 = base64.b64encode(data).decode() if item.params.get("response_format") == "b64_json" else None
        out.images.append(OutputImage(s3_uri=uri, url=objects.url(key), width=image.width,
                                      height=image.height, content_type=content_type, b64_json=b64))
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
        ctx.notify(item.job_id, item.item_id, item_event_id(item.job_id, item.item_id, status.value))
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
    # 4. the review contact sheet, when the job asked for one (before the webhook, so it is there to open)
    if job.review_sheet:
        _review_sheet(ctx, job)
    if job.webhook:
        ctx.notify(job_id, None, job_event_id(job_id, status.value))
    return status.value


def _review_sheet(ctx: Context, job: JobRecord) -> None:
    """Best effort: a sheet that cannot be made is logged; the job has ended either way."""
    from worker.contact_sheet import make_sheet

    try:
        make_sheet(job.job_id, ctx.objects(job.output), ctx.settings, ctx.objects)
    except Exception:
        log.exception("job %s: review sheet not made (make it with: dreambatch sheet %s)", job.job_id, job.job_id)


def webhook_attempt(ctx: Context, job_id: str, item_id: str | None, event_id: str,
                    client=None) -> webhooks.Attempt | None:
    """One delivery attempt of one event, logged; None when there is nothing to send."""
    job = ctx.store.get_job(job_id)
    if job is None or not job.webhook or job.webhook_disabled:
        return None
    if item_id is None:
        payload = webhooks.job_payload(job)
    else:
        item = ctx.store.get_item(job_id, item_id)
        if item is None:
            return None
        payload = webhooks.item_payload(job, item)
    attempt = webhooks.deliver(job.webhook, event_id, payload, secret=ctx.settings.webhook_secret,
                               timeout=ctx.settings.webhooks.timeout, policy=ctx.settings.netpolicy(), client=client)
    ctx.store.log_event(job_id, event_id, attempt.as_dict())
    if attempt.status_code == 410:  # Gone: the receiver asks for no more events of this job
        ctx.store.disable_webhook(job_id)
    return attempt
