"""The durable record of a job, written next to its outputs in object storage.

    {prefix}{job_id}/job.json            normalized job spec, at submit
    {prefix}{job_id}/rows.jsonl          normalized rows (one per manifest row), at submit
    {prefix}{job_id}/items/{item}.json   one small record per item, when it ends
    {prefix}{job_id}/results.jsonl       one line per manifest row, when the job ends
    {prefix}_open/{job_id}               from the job's commit until it ends (periodic reconcile scans it)

Redis holds the live state; these files are what survives it.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

from jobs import keys
from jobs.models import ItemRecord, JobRecord
from jobs.storage import ObjectStore

JSON = "application/json"
JSONL = "application/x-ndjson"


def write_job_spec(store: ObjectStore, job: JobRecord) -> str:
    key = keys.S3_JOB_SPEC.format(prefix="", job_id=job.job_id)
    return store.put(key, job.model_dump_json(indent=2).encode(), JSON)


def mark_open(store: ObjectStore, job: JobRecord) -> str:
    return store.put(keys.S3_OPEN_JOB.format(prefix="", job_id=job.job_id),
                     json.dumps({"job_id": job.job_id, "created_at": job.created_at}).encode(), JSON)


def mark_ended(store: ObjectStore, job_id: str) -> None:
    store.delete(keys.S3_OPEN_JOB.format(prefix="", job_id=job_id))


def open_jobs(store: ObjectStore) -> list[str]:
    """Ids of the jobs in this location that were committed and have not ended."""
    marker = keys.S3_OPEN_JOB.format(prefix="", job_id="")
    return [key.removeprefix(marker) for key in store.keys(marker)]


def write_rows(store: ObjectStore, job_id: str, rows_file: Path) -> str:
    return store.put_file(keys.S3_JOB_ROWS.format(prefix="", job_id=job_id), rows_file, JSONL)


def write_item_result(store: ObjectStore, item: ItemRecord) -> str:
    key = keys.S3_ITEM_RESULT.format(prefix="", job_id=item.job_id, item_id=item.item_id)
    line = {"job_id": item.job_id, **item.result_line()}
    return store.put(key, json.dumps(line).encode(), JSON)


def write_results(store: ObjectStore, job_id: str, items: Iterable[ItemRecord]) -> tuple[str, int]:
    """Stream every item's result line into results.jsonl; returns its URI and the line count."""
    count = 0
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as fh:
        for item in items:
            fh.write(json.dumps(item.result_line()) + "\n")
            count += 1
        path = Path(fh.name)
    try:
        uri = store.put_file(keys.S3_RESULTS.format(prefix="", job_id=job_id), path, JSONL)
    finally:
        path.unlink(missing_ok=True)
    return uri, count


def read_results(store: ObjectStore, job_id: str) -> list[dict] | None:
    data = store.get(keys.S3_RESULTS.format(prefix="", job_id=job_id))
    return None if data is None else [json.loads(line) for line in data.decode().splitlines() if line]
