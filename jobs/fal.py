"""fal's shapes, shared by the API's fal-style queue (jobs.api.fal_routes) and the workers' webhooks:
model ids, `image_size` presets, a request's output and fal's webhook envelope.

A fal request is a one-item job (request id = job id); its output is that item's images. The webhook
is one POST when the request ends: `{"request_id", "gateway_request_id", "status": "OK" | "ERROR",
"payload", "error"}` (fal's "Webhooks" page), instead of dreambatch's per-item and per-job events.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jobs.errors import InputError
from jobs.lifecycle import ItemStatus
from jobs.models import MODELS, ItemRecord, JobRecord, OutputImage

NAMESPACES = ("fal-ai", "dreambatch")  # fal-ai/hidream-e1-full, dreambatch/e1-full
IMAGE_SIZES = {"square_hd": (1024, 1024), "square": (512, 512), "portrait_4_3": (768, 1024),
               "portrait_16_9": (576, 1024), "landscape_4_3": (1024, 768), "landscape_16_9": (1024, 576)}
UrlFor = Callable[[OutputImage], str | None]


def model_of(namespace: str, name: str) -> str | None:
    """fal's model id → ours (`fal-ai/hidream-i1-fast` → `i1-fast`), or None."""
    model = name.removeprefix("hidream-") if namespace in NAMESPACES else None
    return model if model in MODELS else None


def image_size(value: Any) -> dict[str, Any]:
    """fal's `image_size` (a preset name or {"width", "height"}) → our width and height."""
    if value is None:
        return {}
    if isinstance(value, str) and value in IMAGE_SIZES:
        width, height = IMAGE_SIZES[value]
        return {"width": width, "height": height}
    if isinstance(value, dict) and set(value) == {"width", "height"}:
        return {"width": value["width"], "height": value["height"]}
    raise InputError(f"image_size: expected one of {', '.join(IMAGE_SIZES)} or {{width, height}} (got {value!r:.80})")


def output(item: ItemRecord, url_for: UrlFor) -> dict[str, Any]:
    """A completed request's result in fal's output schema."""
    images = [{"url": url_for(i), "width": i.width, "height": i.height, "content_type": i.content_type}
              for i in (item.output.images if item.output else [])]
    return {"images": images, "seed": item.seed, "prompt": item.params.get("prompt") or item.params.get("instruction"),
            "has_nsfw_concepts": [False] * len(images), "timings": {"inference": item.timings.inference_s}}


def error_of(job: JobRecord, item: ItemRecord | None) -> str:
    return (item.error if item else None) or f"request {job.status}"


def webhook_body(job: JobRecord, item: ItemRecord | None, url_for: UrlFor) -> dict[str, Any]:
    """fal's webhook envelope for a request that has ended."""
    body: dict[str, Any] = {"request_id": job.job_id, "gateway_request_id": job.job_id}
    if item is not None and item.status == ItemStatus.COMPLETED:
        return {**body, "status": "OK", "payload": output(item, url_for), "error": None}
    error = error_of(job, item)
    return {**body, "status": "ERROR", "error": error,
            "payload": {"detail": [{"msg": error, "type": item.status if item else job.status}]}}
