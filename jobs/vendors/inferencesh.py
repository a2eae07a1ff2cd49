"""inference.sh's shapes (the `inferencesh` SDK, 0.36, is the spec): app refs, the integer task statuses, the task
object its client reads, the input fields of its HiDream apps, and the webhook it POSTs when a task ends.

A task is a one-item job (task id = job id). Its `status` is the SDK's `TaskStatus`; a task's status only moves
forward (QUEUED → RUNNING → CANCELLING → COMPLETED | FAILED | CANCELLED). The seed page's webhook example shows 9,
which the SDK reads as UPLOADING; a finished task here is 10, as the SDK expects.
"""

from __future__ import annotations

import re
from enum import IntEnum
from typing import Any

from jobs.errors import InputError
from jobs.lifecycle import ItemStatus, JobStatus
from jobs.models import MODELS, ItemRecord, JobRecord
from jobs.vendors import common
from jobs.vendors.common import UrlFor

NAMESPACES = ("infsh", "dreambatch")  # infsh/hidream-e1-full, dreambatch/e1-full
APP_REF = re.compile(r"^(?P<namespace>[a-z0-9][a-z0-9_-]*)/(?P<name>[A-Za-z0-9._-]+)(?:@[A-Za-z0-9_-]+)?(?::[\w-]+)?$")
MULTIPLE = 8  # the i1 apps' width and height go to the nearest multiple of 8 (the seed page)


class TaskStatus(IntEnum):
    """inferencesh.types.TaskStatus."""

    UNKNOWN = 0
    RECEIVED = 1
    QUEUED = 2
    DISPATCHED = 3
    PREPARING = 4
    SERVING = 5
    SETTING_UP = 6
    RUNNING = 7
    CANCELLING = 8
    UPLOADING = 9
    COMPLETED = 10
    FAILED = 11
    CANCELLED = 12
    REJECTED = 13


TERMINAL = {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED}


def model_of(app: str) -> str | None:
    """`infsh/hidream-e1-full` (optionally `@version`, `:function`) → `e1-full`, or None."""
    match = APP_REF.match(app or "")
    if match is None or match["namespace"] not in NAMESPACES:
        return None
    model = match["name"].removeprefix("hidream-")
    return model if model in MODELS else None


def app_of(job: JobRecord) -> str:
    return job.api.get("app") or f"infsh/hidream-{job.model}"


def row(model: str, values: dict[str, Any]) -> dict[str, Any]:
    """The app's input → a manifest row: `scheduler_type` is our `scheduler`; an i1 app's width and height go to the
    nearest multiple of 8 and come back exactly so; the rest are the seed page's names, which jobs.dialects maps."""
    out = dict(values)
    if "scheduler_type" in out:
        out["scheduler"] = out.pop("scheduler_type")
    if MODELS[model].kind == "generate" and ("width" in out or "height" in out):
        for side in ("width", "height"):
            if side in out:
                value = out[side]
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise InputError(f"{side}: expected a number of pixels (got {value!r:.40})")
                out[side] = max(MULTIPLE, int(round(value / MULTIPLE)) * MULTIPLE)
        out["exact_size"] = True
    return out


def status_of(job: JobRecord, item: ItemRecord | None) -> TaskStatus:
    if common.ended(job, item):
        status = item.status if item is not None else job.status
        ended_as: dict[str, TaskStatus] = {
            ItemStatus.COMPLETED: TaskStatus.COMPLETED,
            ItemStatus.CANCELLED: TaskStatus.CANCELLED,
        }
        return ended_as.get(status, TaskStatus.FAILED)
    if job.cancel_requested:
        return TaskStatus.CANCELLING
    if job.status == JobStatus.RUNNING:
        return TaskStatus.RUNNING
    return TaskStatus.QUEUED


def file_of(
    url: str | None, content_type: str, name: str, width: int | None = None, height: int | None = None
) -> dict[str, Any]:
    """An inference.sh File: `uri`, `content_type`, `filename` (and the image's size)."""
    out: dict[str, Any] = {"uri": url, "path": None, "content_type": content_type, "filename": name}
    if width is not None:
        out.update(width=width, height=height)
    return out


def output(item: ItemRecord, url_for: UrlFor) -> dict[str, Any]:
    """A completed task's output: `image` (the first), `images`, `seed`, and the safety verdict."""
    files = [
        file_of(url_for(i), i.content_type, (i.s3_uri or "").rsplit("/", 1)[-1], i.width, i.height)
        for i in common.images(item)
    ]
    return {
        "image": files[0] if files else None,
        "images": files,
        "seed": item.seed,
        "has_nsfw_concepts": common.nsfw(item),
        "safety_checker": common.safety(item),
    }


def task(
    job: JobRecord,
    item: ItemRecord | None,
    url_for: UrlFor,
    *,
    status: TaskStatus | None = None,
    progress: float | None = None,
) -> dict[str, Any]:
    """The task object the SDK reads (TaskDTO's fields it uses: id, status, input, output, error, logs,
    session_id, created_at, updated_at), with `status_text` and `progress` (percent of denoising steps). The SDK
    reads no progress field of its own; it hands `logs` to the caller, so a running task's step is a TASK log
    line there too."""
    status = status if status is not None else status_of(job, item)
    done = status == TaskStatus.COMPLETED and item is not None
    failed = status in (TaskStatus.FAILED, TaskStatus.CANCELLED)
    return {
        "id": job.job_id,
        "short_id": job.job_id[-8:],
        "status": int(status),
        "status_text": status.name.lower(),
        "app": app_of(job),
        "input": job.api.get("input", {}),
        "output": output(item, url_for) if done and item is not None else None,
        "error": common.error(job, item) if failed else "",
        "error_kind": common.error_kind(job, item) if failed else None,
        "progress": 100.0 if done else progress,
        "logs": [] if done or failed or progress is None else [_step_log(job, progress)],
        "session_id": None,
        "webhook": job.webhook,
        "created_at": job.created_at,
        "updated_at": (item.updated_at if item is not None else None) or job.updated_at,
    }


def _step_log(job: JobRecord, progress: float) -> dict[str, Any]:
    """A TaskLog (log_type 4: TASK) saying how far the running item's denoising is."""
    return {
        "id": f"{job.job_id}-progress",
        "task_id": job.job_id,
        "log_type": 4,
        "content": f"denoising: {progress:g}% of its steps done",
        "created_at": job.created_at,
        "updated_at": job.updated_at,
    }


def webhook_body(job: JobRecord, item: ItemRecord | None, url_for: UrlFor) -> dict[str, Any]:
    """The seed page's webhook payload, POSTed once when the task ends."""
    whole = task(job, item, url_for)
    return {key: whole[key] for key in ("id", "status", "output", "error", "session_id", "created_at", "updated_at")}


def problem(status: int, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    """An RFC 9457 problem body (inference.sh's error shape: the SDK reads `detail`, then `title`)."""
    return {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
