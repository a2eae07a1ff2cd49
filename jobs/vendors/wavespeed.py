"""WaveSpeedAI's shapes (the `wavespeed` SDK, 2.0.5, and the seed page are the spec): model paths, the
`{code, message, data}` envelope, the prediction object and its four statuses, the webhook.

A prediction is a one-item job (prediction id = job id). `data.status` is only ever `created`, `processing`,
`completed` or `failed` (a cancelled prediction is `failed`, its error says so): any other value makes the SDK poll
forever. `outputs` stays empty until it is `completed`; `timings.inference` is integer milliseconds.
"""

from __future__ import annotations

from typing import Any

from jobs.lifecycle import JobStatus
from jobs.models import MODELS, ItemRecord, JobRecord
from jobs.vendors import common
from jobs.vendors.common import UrlFor

NAMESPACES = ("wavespeed-ai", "dreambatch")  # wavespeed-ai/hidream-e1-full, dreambatch/e1-full
# WaveSpeed's defaults for its HiDream models, applied to WaveSpeed-shaped requests only. Source: the WaveSpeed page
# for wavespeed-ai/hidream-e1-full (../shared/seeds/002): seed -1, output_format jpeg, enable_base64_output false.
DEFAULTS: dict[str, Any] = {"output_format": "jpeg"}


def model_of(owner: str, name: str) -> str | None:
    """`wavespeed-ai/hidream-e1-full` → `e1-full`, or None."""
    model = name.removeprefix("hidream-") if owner in NAMESPACES else None
    return model if model in MODELS else None


def model_id(job: JobRecord) -> str:
    return job.api.get("model_id") or f"wavespeed-ai/hidream-{job.model}"


def row(values: dict[str, Any], kind: str) -> dict[str, Any]:
    """A request body → a manifest row in WaveSpeed's names (jobs.dialects maps them). A generation's `size` is
    WaveSpeed's `W*H`, returned exactly."""
    out = {**DEFAULTS, **values}
    for key in ("enable_base64_output", "enable_sync_mode", "webhook"):
        out.pop(key, None)
    size = out.get("size")
    if kind == "generate" and isinstance(size, str) and "*" in size:
        width, _, height = out.pop("size").partition("*")
        out.update(width=_int(width), height=_int(height), exact_size=True)
    return out


def _int(text: str) -> int | str:
    return int(text) if text.strip().isdigit() else text


def status_of(job: JobRecord, item: ItemRecord | None) -> str:
    if common.ended(job, item):
        return "completed" if common.completed(item) else "failed"
    return "processing" if job.status == JobStatus.RUNNING else "created"


def prediction(
    job: JobRecord, item: ItemRecord | None, url_for: UrlFor, result_url: str, error: str | None = None
) -> dict[str, Any]:
    """The prediction object (`data`), as the seed page lists it."""
    status = status_of(job, item)
    done = status == "completed"
    images = common.images(item) if done else []
    inference = item.timings.inference_s if item is not None else None
    flags = common.nsfw(item) if done else None
    return {
        "id": job.job_id,
        "model": model_id(job),
        "outputs": [url_for(i) for i in images],
        "urls": {"get": result_url},
        "has_nsfw_contents": flags if flags is not None else [],
        "safety_checker": common.safety(item) if done else common.NOT_RUN,
        "status": status,
        "created_at": job.created_at,
        "error": error if error is not None else (common.error(job, item) if status == "failed" else ""),
        "timings": {"inference": int(round(inference * 1000)) if inference is not None else 0},
    }


def envelope(data: Any, code: int = 200, message: str = "success") -> dict[str, Any]:
    return {"code": code, "message": message, "data": data}


def error_body(code: int, message: str) -> dict[str, Any]:
    """WaveSpeed's error shape (the HTTP status is the same `code`)."""
    return {"code": code, "message": message, "data": None}


def webhook_body(job: JobRecord, item: ItemRecord | None, url_for: UrlFor) -> dict[str, Any]:
    """The prediction object, POSTed once when it ends (its `urls.get` uses the API's public URL when set)."""
    base = (job.api.get("base_url") or "").rstrip("/")
    return prediction(job, item, url_for, f"{base}/api/v3/predictions/{job.job_id}/result")
