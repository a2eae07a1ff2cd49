"""Statuses and the transitions between them. Nothing else decides what a status may become.

Items:  queued → running → completed | failed | cancelled   (failed: also over its attempt cap)
        running → running     (a redelivery after a lost worker starts it again; each start is an attempt)
        queued → cancelled    (`cancel JOB`, not started before the job's --expires-after deadline, or its
                              submission never committed)
        queued → failed       (reconcile: the item's durable record says it failed; the live state missed it)
        failed → queued       (`retry JOB`: the item runs again in a new round, attempts counted)
        A row rejected at submit (--skip-invalid) is created `failed` and never moves.
Jobs:   queued → running → completed | failed | cancelled
        `failed` only when every item failed; `completed` when at least one item completed;
        `cancelled` when a cancel was asked and it stopped an item, or when nothing completed and
        something was cancelled. A retried job is re-opened (running again) and ends once more.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum


class ItemStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_ITEM


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_JOB


TERMINAL_ITEM = frozenset({ItemStatus.COMPLETED, ItemStatus.FAILED, ItemStatus.CANCELLED})
TERMINAL_JOB = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})

ITEM_TRANSITIONS: dict[ItemStatus, frozenset[ItemStatus]] = {
    ItemStatus.QUEUED: frozenset({ItemStatus.RUNNING, ItemStatus.FAILED, ItemStatus.CANCELLED}),
    ItemStatus.RUNNING: frozenset({ItemStatus.RUNNING, ItemStatus.COMPLETED, ItemStatus.FAILED, ItemStatus.CANCELLED}),
    ItemStatus.COMPLETED: frozenset(),
    ItemStatus.FAILED: frozenset({ItemStatus.QUEUED}),
    ItemStatus.CANCELLED: frozenset(),
}


def allowed_sources(target: ItemStatus) -> list[str]:
    """The statuses an item may be in for a move to `target` (what the store checks atomically)."""
    return [str(src) for src, dests in ITEM_TRANSITIONS.items() if target in dests]


def ended(counts: Mapping[str, int]) -> int:
    """How many of a job's items have ended, from its per-status counts."""
    return sum(counts.get(status, 0) for status in TERMINAL_ITEM)


def job_outcome(counts: Mapping[str, int], *, cancelled: bool = False) -> JobStatus:
    """The terminal status of a job whose items have all ended (`cancelled`: a cancel was asked)."""
    if cancelled and counts.get(ItemStatus.CANCELLED, 0) > 0:
        return JobStatus.CANCELLED
    if counts.get(ItemStatus.COMPLETED, 0) == 0 and counts.get(ItemStatus.FAILED, 0) > 0:
        return JobStatus.FAILED
    if counts.get(ItemStatus.COMPLETED, 0) == 0 and counts.get(ItemStatus.CANCELLED, 0) > 0:
        return JobStatus.CANCELLED
    return JobStatus.COMPLETED


def job_progress_status(counts: Mapping[str, int]) -> JobStatus:
    """A non-terminal job is `running` once any item has started or ended."""
    started = counts.get(ItemStatus.RUNNING, 0) + ended(counts)
    return JobStatus.RUNNING if started else JobStatus.QUEUED
