"""What the vendor shapes share: an item's images, its safety verdict, its error, in plain values."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jobs.lifecycle import ItemStatus
from jobs.models import ItemRecord, JobRecord, OutputImage

UrlFor = Callable[[OutputImage], str | None]
NOT_RUN = "off: the request has not produced images"


def images(item: ItemRecord | None) -> list[OutputImage]:
    return list(item.output.images) if item is not None and item.output else []


def nsfw(item: ItemRecord | None) -> list[bool] | None:
    """One flag per image when a safety checker ran; None when none did."""
    return list(item.output.nsfw) if item is not None and item.output and item.output.nsfw is not None else None


def safety(item: ItemRecord | None) -> str:
    """The checker that ran, or why none did ("off: …")."""
    return (item.output.safety if item is not None and item.output else None) or NOT_RUN


def ended(job: JobRecord, item: ItemRecord | None) -> bool:
    """Whether the request has ended: its item has (a vendor request is one item), or its job was finalized."""
    return bool(job.finished_at) or (item is not None and item.status.terminal)


def completed(item: ItemRecord | None) -> bool:
    return item is not None and item.status == ItemStatus.COMPLETED


def error(job: JobRecord, item: ItemRecord | None) -> str:
    """Why a request ended without its images, for people."""
    if item is not None and item.error:
        return item.error
    if item is not None and item.status == ItemStatus.CANCELLED:
        return "cancelled" if item.reason in (None, "cancelled") else f"cancelled ({item.reason})"
    return f"request {job.status}"


def error_kind(job: JobRecord, item: ItemRecord | None) -> str:
    """The same for code: the item's ErrorKind (jobs.errors), `cancelled` for a cancel."""
    if item is not None and item.error_kind:
        return str(item.error_kind)
    if item is not None and item.status == ItemStatus.CANCELLED:
        return "cancelled"
    return str(job.status)


def prompt(item: ItemRecord | None) -> str:
    params: dict[str, Any] = item.params if item is not None else {}
    return params.get("prompt") or params.get("instruction") or ""


def progress(step: str | None) -> float | None:
    """ "3/16" (the store's step record) → 18.75 (percent), or None."""
    if not step or "/" not in step:
        return None
    done, _, total = step.partition("/")
    try:
        return round(100 * int(done) / int(total), 2) if int(total) else None
    except ValueError:
        return None
