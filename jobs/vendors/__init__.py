"""The hosted APIs' own shapes, so their SDKs run against dreambatch unchanged (the pages in ../shared/seeds/).

    fal.py          fal.ai: model ids, `image_size` presets, fal's defaults for its models, result, webhook envelope
    inferencesh.py  inference.sh: app refs, integer task statuses, the task object, its webhook
    wavespeed.py    WaveSpeedAI: model paths, the `{code, message, data}` envelope, prediction statuses

Each is data only (no HTTP): the API's vendor routers (jobs/api/*_routes.py) answer with these shapes, and a
worker sends a vendor's webhook envelope with them when a request made in that vendor's shape ends
(`JobRecord.webhook_format`). A vendor request is a one-item job: request id = task id = prediction id = job id.

Safety (worker/safety.py) shows in every shape: a flag per image when a checker ran (`ItemOutput.nsfw`), and
`safety_checker` naming the checker, or "off: …" when none ran.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jobs.models import ItemRecord, JobRecord, OutputImage
from jobs.vendors import fal, inferencesh, wavespeed

UrlFor = Callable[[OutputImage], str | None]
# webhook_format → the one envelope POSTed when the request ends
WEBHOOKS: dict[str, Callable[[JobRecord, ItemRecord | None, UrlFor], dict[str, Any]]] = {
    "fal": fal.webhook_body,
    "inferencesh": inferencesh.webhook_body,
    "wavespeed": wavespeed.webhook_body,
}


def webhook_body(job: JobRecord, item: ItemRecord | None, url_for: UrlFor) -> dict[str, Any]:
    return WEBHOOKS[job.webhook_format](job, item, url_for)
