"""fal's shapes, shared by the API's fal routes (jobs.api.fal_routes) and the workers' webhooks: model ids,
`image_size` presets, fal's own defaults for its models, a request's result, its status and fal's webhook envelope.

A fal request is a one-item job (request id = job id); its output is that item's images. The webhook is one POST
when the request ends: `{"request_id", "gateway_request_id", "status": "OK" | "ERROR", "payload", "error"}` (fal's
"Webhooks" page), instead of dreambatch's per-item and per-job events.
"""

from __future__ import annotations

import math
import time
from typing import Any

from jobs.errors import InputError
from jobs.models import MODELS, ItemRecord, JobRecord
from jobs.vendors import common
from jobs.vendors.common import UrlFor

NAMESPACES = ("fal-ai", "dreambatch")  # fal-ai/hidream-e1-full, dreambatch/e1-full
IMAGE_SIZES = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}

# fal's defaults for its models, applied to fal-shaped requests only (manifests keep jobs.models.MODELS' defaults,
# which are HiDream's published ones). Source: the fal.ai page for fal-ai/hidream-e1-full, "Input" (../shared/seeds/
# 003): num_inference_steps 50, guidance_scale 3.5, image_guidance_scale 2, negative_prompt "low resolution, blur",
# output_format jpeg, enable_safety_checker true. The other models' fal pages are not seeds: ours apply to them.
DEFAULTS: dict[str, dict[str, Any]] = {
    "e1-full": {
        "steps": 50,
        "guidance_scale": 3.5,
        "image_guidance_scale": 2.0,
        "negative_prompt": "low resolution, blur",
        "output_format": "jpeg",
        "safety_check": True,
    },
}


def model_of(namespace: str, name: str) -> str | None:
    """fal's model id → ours (`fal-ai/hidream-i1-fast` → `i1-fast`), or None."""
    model = name.removeprefix("hidream-") if namespace in NAMESPACES else None
    return model if model in MODELS else None


def image_size(value: Any) -> dict[str, Any]:
    """fal's `image_size` (a preset name or {"width", "height"}) → our width and height, returned exactly."""
    if value is None:
        return {}
    if isinstance(value, str) and value in IMAGE_SIZES:
        width, height = IMAGE_SIZES[value]
        return {"width": width, "height": height, "exact_size": True}
    if isinstance(value, dict) and set(value) == {"width", "height"}:
        return {"width": value["width"], "height": value["height"], "exact_size": True}
    raise InputError(f"image_size: expected one of {', '.join(IMAGE_SIZES)} or {{width, height}} (got {value!r:.80})")


def row(model: str, body: dict[str, Any]) -> dict[str, Any]:
    """A fal request body → a manifest row in fal's names (jobs.dialects maps them), fal's defaults under it."""
    values = dict(body)
    for key in ("webhookUrl", "id", "sync_mode"):
        values.pop(key, None)
    values.update(image_size(values.pop("image_size", None)))
    defaults = {k: v for k, v in DEFAULTS.get(model, {}).items() if not _given(values, k)}
    return {**defaults, **values}


_THEIRS = {"steps": "num_inference_steps", "safety_check": "enable_safety_checker"}


def _given(values: dict[str, Any], ours: str) -> bool:
    return ours in values or _THEIRS.get(ours, ours) in values


def output(item: ItemRecord, url_for: UrlFor) -> dict[str, Any]:
    """A completed request's result in fal's output schema. `has_nsfw_concepts` is the safety checker's flag per
    image, or null when no checker ran (`safety_checker` then says why)."""
    images = [
        {"url": url_for(i), "width": i.width, "height": i.height, "content_type": i.content_type}
        for i in common.images(item)
    ]
    return {
        "images": images,
        "seed": item.seed,
        "prompt": common.prompt(item),
        "has_nsfw_concepts": common.nsfw(item),
        "safety_checker": common.safety(item),
        "timings": {"inference": item.timings.inference_s},
    }


def queue_status(
    job: JobRecord, item: ItemRecord | None, *, position: int, logs: bool, step: str | None = None
) -> dict[str, Any]:
    """fal's status object: IN_QUEUE (with `queue_position`), IN_PROGRESS, or COMPLETED, which a request that
    failed or was cancelled also is, with `error` and `error_type` (the item's error kind). `step`: the running
    item's denoising step ("3/16"), a log line of its own while it runs."""
    log_lines = _logs(job, item, step) if logs else None
    if common.ended(job, item):
        out: dict[str, Any] = {
            "status": "COMPLETED",
            "logs": log_lines,
            "metrics": {"inference_time": item.timings.inference_s if item else None},
        }
        if not common.completed(item):
            out.update(error=common.error(job, item), error_type=common.error_kind(job, item))
        return out
    if job.status == "queued":
        return {"status": "IN_QUEUE", "queue_position": position, "logs": log_lines}
    return {"status": "IN_PROGRESS", "logs": log_lines}


def _logs(job: JobRecord, item: ItemRecord | None, step: str | None = None) -> list[dict[str, Any]]:
    """What is known of the request's run, as fal log lines (no runner output is kept)."""
    lines = [{"message": "queued", "level": "INFO", "source": "dreambatch", "timestamp": job.created_at}]
    if item is not None and item.timings.started_at:
        lines.append(
            {
                "message": f"started (attempt {item.attempts})",
                "level": "INFO",
                "source": "dreambatch",
                "timestamp": _iso(item.timings.started_at),
            }
        )
    if item is not None and step and item.status == "running":
        percent = common.progress(step)
        lines.append(
            {
                "message": f"denoising step {step}" + (f" ({percent:g}%)" if percent is not None else ""),
                "level": "INFO",
                "source": "dreambatch",
                "timestamp": _iso(time.time()),
            }
        )
    if item is not None and item.status.terminal:
        lines.append(
            {
                "message": item.status.value + (f": {item.error}" if item.error else ""),
                "level": "ERROR" if item.error else "INFO",
                "source": "dreambatch",
                "timestamp": item.updated_at,
            }
        )
    return lines


def _iso(epoch: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


def error_detail(job: JobRecord, item: ItemRecord | None) -> list[dict[str, Any]]:
    """fal's `detail` for a request that failed: one entry, the item's error and its kind."""
    return [{"msg": common.error(job, item), "type": common.error_kind(job, item), "loc": ["body"]}]


def webhook_body(job: JobRecord, item: ItemRecord | None, url_for: UrlFor) -> dict[str, Any]:
    """fal's webhook envelope for a request that has ended."""
    body: dict[str, Any] = {"request_id": job.job_id, "gateway_request_id": job.job_id}
    if item is not None and common.completed(item):
        return {**body, "status": "OK", "payload": output(item, url_for), "error": None}
    return {**body, "status": "ERROR", "error": common.error(job, item), "payload": {"detail": error_detail(job, item)}}


def position_in(depth: int) -> int:
    """fal's 0-based queue position from the depth of the model's queue ahead of and including this request
    (an upper bound: the queue is a list of messages, not of requests)."""
    return max(0, math.ceil(depth) - 1)
