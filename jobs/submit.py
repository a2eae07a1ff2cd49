"""Fan-out: a manifest becomes a job record, item records and one queued task per valid row.

Two streaming passes over the file: the first validates every row and collects every issue
(nothing is created if any row is bad, unless `skip_invalid`); the second writes items in batches
and hands each batch of ids to `dispatch` (Celery publishing, or the local runner).
"""

from __future__ import annotations

import json
import secrets
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jobs import inputs, records
from jobs.errors import InputError
from jobs.inputs import InputPolicy
from jobs.lifecycle import ItemStatus
from jobs.manifest import CheckedRow, CheckReport, Issue, RowChecker, check_manifest, input_policy, validate_manifest
from jobs.models import MAX_SEED, ItemRecord, JobRecord
from jobs.storage import ObjectStore
from jobs.store import Store


class ManifestInvalid(InputError):
    """The manifest has bad rows and nothing was queued. `issues` lists every one."""

    def __init__(self, message: str, issues: list[str] | None = None):
        super().__init__(message, issues or [])
        self.issues = issues or []

    def __str__(self) -> str:
        return self.args[0]


@dataclass
class Submission:
    job: JobRecord
    queued: int
    rejected: int
    report: CheckReport
    job_done: bool  # every row was rejected: the job can be finalized at once


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def new_job_id() -> str:
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}"


def resolve_seed(seed: int) -> int:
    """-1 means random: pick it now, so every retry of the item renders the same image."""
    return secrets.randbelow(MAX_SEED + 1) if seed < 0 else seed


def _item(job_id: str, row: CheckedRow, at: str, objects: ObjectStore, max_bytes: int) -> ItemRecord:
    if row.ok:
        params = {**row.params, "seed": resolve_seed(row.params["seed"])}
        if "image" in params:  # local files and data URIs move next to the job, for any worker to read
            params["image"] = inputs.stage(params["image"], objects, job_id, row.item_id, max_bytes)
        return ItemRecord(job_id=job_id, item_id=row.item_id, line=row.line, params=params,
                          metadata=row.metadata, seed=params["seed"], created_at=at, updated_at=at)
    error = "; ".join(str(i) for i in row.issues)
    return ItemRecord(job_id=job_id, item_id=row.item_id, line=row.line, status=ItemStatus.FAILED.value,
                      metadata=row.metadata, error=f"invalid row: {error}", created_at=at, updated_at=at)


def create_job(
    manifest: Path,
    *,
    model: str,
    defaults: dict[str, Any],
    output: str,
    webhook: str | None,
    store: Store,
    objects: ObjectStore,
    dispatch: Callable[[list[str]], None],
    skip_invalid: bool = False,
    batch: int = 500,
    job_id: str | None = None,
    policy: InputPolicy | None = None,
    on_rejected: Callable[[list[ItemRecord]], None] | None = None,
    review_sheet: bool = False,
) -> Submission:
    # 1. validate every row; nothing is created when a row is bad (unless skip_invalid)
    policy = policy or input_policy(manifest)
    report = validate_manifest(manifest, model, defaults, policy)
    file_issues = [i for i in report.issues if i.line <= 0]
    if file_issues or (report.issues and not skip_invalid):
        shown = [str(i) for i in report.issues]
        raise ManifestInvalid(f"{manifest}: {len(shown)} problem(s); nothing was queued", shown)
    if report.rows == 0:
        raise ManifestInvalid(f"{manifest}: no rows; nothing was queued")

    # 2. the job record, live and durable
    at = now_iso()
    job = JobRecord(job_id=job_id or new_job_id(), model=model, defaults=defaults, output=output,
                    webhook=webhook, manifest=str(manifest), total=report.rows, created_at=at, updated_at=at,
                    review_sheet=review_sheet)
    store.create_job(job)
    records.write_job_spec(objects, job)

    # 3. second pass: items in batches, each batch stored before its tasks are published
    checker = RowChecker(model, defaults, policy)
    queued = rejected = 0
    pending: list[ItemRecord] = []
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as rows_fh:
        rows_path = Path(rows_fh.name)

        def flush() -> None:
            nonlocal queued, rejected
            store.add_items(pending)
            failed = [item for item in pending if item.status == ItemStatus.FAILED]
            for item in failed:
                records.write_item_result(objects, item)
            if failed and on_rejected:
                on_rejected(failed)  # their terminal-state webhooks
            ids = [i.item_id for i in pending if i.status == ItemStatus.QUEUED]
            if ids:
                dispatch(ids)
            queued += len(ids)
            rejected += len(pending) - len(ids)
            pending.clear()

        for row in check_manifest(manifest, checker):
            if isinstance(row, Issue):  # file-level issues were refused in step 1
                continue
            item = _item(job.job_id, row, at, objects, policy.max_bytes)
            rows_fh.write(json.dumps({"id": item.item_id, "line": item.line, "params": item.params,
                                      "metadata": item.metadata, "error": item.error}) + "\n")
            pending.append(item)
            if len(pending) >= batch:
                flush()
        if pending:
            flush()
    try:
        records.write_rows(objects, job.job_id, rows_path)
    finally:
        rows_path.unlink(missing_ok=True)
    # 4. rejected rows count as ended: if they were the last to end, the caller finalizes
    live = store.get_job(job.job_id)
    ended = sum(live.counts.get(s, 0) for s in ("completed", "failed", "cancelled")) if live else 0
    return Submission(job, queued, rejected, report, job_done=rejected > 0 and ended >= job.total)
