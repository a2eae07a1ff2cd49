"""The durable record of a job, written next to its outputs in object storage. The only module that
reads or writes it (the key templates are jobs.keys'):

    {prefix}{job_id}/job.json            normalized job spec, at submit      write_job_spec, read_job
    {prefix}{job_id}/rows.jsonl          normalized rows (one per manifest   write_rows, read_rows
                                         row), at submit
    {prefix}{job_id}/inputs/{item}.ext   a row's local file or data URI,     write_input
                                         staged at submit (workers read it by the URI this returns)
    {prefix}{job_id}/items/{item}.json   one small record per item, when     write_item_result, read_item_result,
                                         it ends: its results line and       read_item_results
                                         every other field but its params
    {prefix}{job_id}/results.jsonl       one line per manifest row, when     write_results, read_results,
                                         the job ends                        has_results
    {prefix}{job_id}/                    all of the above, and its outputs   delete_job (`purge --outputs`)
    {prefix}_open/{job_id}               from the job's commit until it      mark_open, mark_ended, open_jobs
                                         ends (periodic reconcile scans it)
    {prefix}_outbox/{job_id}/{until}     from a job with a webhook's end     mark_outbox, clear_outbox,
                                         until its events' retry window      outbox_jobs
                                         closes (reconcile re-sends them)

And, under the API's own output location (DREAMBATCH_OUTPUT), what its clients hold it to:

    {prefix}_keys/{key_id}.json          an API key: its token's SHA-256,    write_api_key, read_api_key,
                                         scopes, tenant, prefix, rate        read_api_keys
    {prefix}_idempotency/{key_id}/       the job an Idempotency-Key made,    write_idempotency, read_idempotency
        {digest}.json                    until it expires

Redis holds the live state; these files are what survives it.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from jobs import keys
from jobs.models import ApiKeyRecord, ItemRecord, JobRecord
from jobs.storage import ObjectStore, key_of

JSON = "application/json"
JSONL = "application/x-ndjson"


def _json_lines(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


# --- job.json ---------------------------------------------------------------------------------
def write_job_spec(store: ObjectStore, job: JobRecord) -> str:
    key = keys.S3_JOB_SPEC.format(prefix="", job_id=job.job_id)
    return store.put(key, job.model_dump_json(indent=2).encode(), JSON)


def read_job(store: ObjectStore, job_id: str) -> JobRecord | None:
    """The job's spec as last written (at submit, at cancel, when it ended), or None when there is none."""
    data = store.get(keys.S3_JOB_SPEC.format(prefix="", job_id=job_id))
    return None if data is None else JobRecord.model_validate_json(data)


# --- the _open marker -------------------------------------------------------------------------
def mark_open(store: ObjectStore, job: JobRecord) -> str:
    return store.put(
        keys.S3_OPEN_JOB.format(prefix="", job_id=job.job_id),
        json.dumps({"job_id": job.job_id, "created_at": job.created_at}).encode(),
        JSON,
    )


def mark_ended(store: ObjectStore, job_id: str) -> None:
    store.delete(keys.S3_OPEN_JOB.format(prefix="", job_id=job_id))


def side_by_side(*writes: Callable[[], object]) -> None:
    """Do `writes` (each a round trip to object storage) at once, returning when every one has; the first
    error raised goes up once all have ended."""
    with ThreadPoolExecutor(max(len(writes) - 1, 1), thread_name_prefix="records") as pool:
        others = [pool.submit(write) for write in writes[1:]]
        try:
            writes[0]()
        finally:
            for other in others:
                other.result()


def open_job(store: ObjectStore, job: JobRecord) -> None:
    """A committed job's job.json (no longer submitting) and its _open marker, side by side. Either order is
    safe: a marker whose job.json still says submitting is passed over, as a job.json without a marker is."""
    side_by_side(lambda: write_job_spec(store, job), lambda: mark_open(store, job))


def close_job(
    store: ObjectStore,
    job: JobRecord,
    items: Iterable[ItemRecord] | None = None,
    outbox_until: float | None = None,
) -> None:
    """A finished job's durable end, side by side: results.jsonl (the result lines of `items`, when given),
    its final job.json and (`outbox_until`) its outbox marker: one round trip on the finalizer's path to the
    job's webhook, not three. The finalizer writes them before Redis marks the job ended
    (worker.process.finalize_job), so a job Redis calls ended has them all; one that stops half way is
    finalized again by its redelivered message. Any order among them is safe: after a Redis loss, reconcile
    takes a job's end from results.jsonl and job.json together; the events go out only once all are
    written. Its _open marker goes only after Redis has the end (`mark_ended`): a marker gone with
    results.jsonl not written would leave a Redis loss nothing to find the job by."""
    writes: list[Callable[[], object]] = [lambda: write_job_spec(store, job)]
    if items is not None:
        writes.append(lambda: write_results(store, job.job_id, items, job.model))
    if outbox_until is not None:
        writes.append(lambda: mark_outbox(store, job.job_id, outbox_until))
    side_by_side(*writes)


def open_jobs(store: ObjectStore) -> list[str]:
    """Ids of the jobs in this location that were committed and have not ended."""
    marker = keys.S3_OPEN_JOB.format(prefix="", job_id="")
    return [key.removeprefix(marker) for key in store.keys(marker)]


# --- the _outbox marker -----------------------------------------------------------------------
def mark_outbox(store: ObjectStore, job_id: str, until: float) -> str:
    """An ended job whose webhook events may still be on their way until `until` (epoch s): if Redis loses
    it before then, reconcile sends every event again (same webhook-id)."""
    return store.put(keys.S3_OUTBOX.format(prefix="", job_id=job_id, until=int(until)), b"", JSON)


def clear_outbox(store: ObjectStore, job_id: str) -> None:
    for key in list(store.keys(keys.S3_OUTBOX.format(prefix="", job_id=job_id, until=""))):
        store.delete(key)


def outbox_jobs(store: ObjectStore) -> dict[str, float]:
    """Ended jobs whose events may still be undelivered: job id → when their retry window closes (epoch s)."""
    marker = keys.S3_OUTBOX.format(prefix="", job_id="", until="").removesuffix("/")
    found: dict[str, float] = {}
    for key in store.keys(marker):
        job_id, _, until = key.removeprefix(marker).rpartition("/")
        if job_id and until.isdigit():
            found[job_id] = max(found.get(job_id, 0.0), float(until))
    return found


def has_outbox(store: ObjectStore, job_id: str) -> bool:
    return any(True for _ in store.keys(keys.S3_OUTBOX.format(prefix="", job_id=job_id, until="")))


# --- rows.jsonl and inputs/ -------------------------------------------------------------------
def write_rows(store: ObjectStore, job_id: str, rows_file: Path) -> str:
    return store.put_file(keys.S3_JOB_ROWS.format(prefix="", job_id=job_id), rows_file, JSONL)


def read_rows(store: ObjectStore, job_id: str) -> list[dict[str, Any]] | None:
    """Every row as submitted ({id, line, params, metadata, error}), or None when the job has no rows.jsonl."""
    data = store.get(keys.S3_JOB_ROWS.format(prefix="", job_id=job_id))
    return None if data is None else _json_lines(data)


def write_input(store: ObjectStore, job_id: str, item_id: str, ext: str, data: bytes, content_type: str) -> str:
    """Stage a row's input image (`ext`: ".png", …) next to the job; returns the reference workers read."""
    return store.put(keys.S3_INPUT.format(prefix="", job_id=job_id, item_id=item_id, ext=ext), data, content_type)


# --- items/ -----------------------------------------------------------------------------------
# what an item record keeps beside its results line: every field of the item but its params (rows.jsonl has them)
RECORD_FIELDS = {"round", "round_start_attempts", "enqueued_at", "created_at", "updated_at"}


def write_item_result(store: ObjectStore, item: ItemRecord, alongside: Callable[[], object] | None = None) -> None:
    """The item's record as it is now, written side by side with `alongside` (its outputs' writes: a record
    may land before its outputs, so reconcile trusts a completed record only with its outputs there,
    `outputs_missing`)."""
    key = keys.S3_ITEM_RESULT.format(prefix="", job_id=item.job_id, item_id=item.item_id)
    line = {"job_id": item.job_id, **item.result_line(), **item.model_dump(mode="json", include=RECORD_FIELDS)}
    data = json.dumps(line).encode()
    if alongside is None:
        store.put(key, data, JSON)
    else:
        side_by_side(lambda: store.put(key, data, JSON), alongside)


def read_item_result(store: ObjectStore, job_id: str, item_id: str) -> dict[str, Any] | None:
    """One ended item's record (its results line and job id), or None when it has not ended."""
    data = store.get(keys.S3_ITEM_RESULT.format(prefix="", job_id=job_id, item_id=item_id))
    return None if data is None else json.loads(data)


def read_item_results(store: ObjectStore, job_id: str) -> dict[str, dict[str, Any]]:
    """Every ended item's record, by item id."""
    prefix = keys.S3_ITEMS.format(prefix="", job_id=job_id)
    found: dict[str, dict[str, Any]] = {}
    for key in store.keys(prefix):
        name = key[len(prefix) :]
        if "/" in name or not name.endswith(".json"):
            continue
        data = store.get(key)
        if data is not None:
            rec = json.loads(data)
            found[str(rec.get("id", name.removesuffix(".json")))] = rec
    return found


def outputs_missing(store: ObjectStore, location: str, job_id: str, ended: dict[str, dict[str, Any]]) -> set[str]:
    """The ids of the completed records in `ended` (by item id, of job `job_id` in `store` at `location`)
    whose output objects are not all there: one listing of the job's folder, a HEAD for each output outside
    it."""
    folder = keys.S3_JOB_FOLDER.format(prefix="", job_id=job_id)
    present: set[str] | None = None
    missing = set()
    for item_id, rec in ended.items():
        if rec.get("status") != "completed":
            continue
        for image in (rec.get("output") or {}).get("images") or []:
            key = key_of(location, image.get("s3_uri") or "")
            if key is None:
                continue
            if key.startswith(folder):
                present = set(store.keys(folder)) if present is None else present
                found = key in present
            else:
                found = store.head(key) is not None
            if not found:
                missing.add(item_id)
                break
    return missing


# --- results.jsonl ----------------------------------------------------------------------------
def results_key(job_id: str) -> str:
    return keys.S3_RESULTS.format(prefix="", job_id=job_id)


def write_results(
    store: ObjectStore, job_id: str, items: Iterable[ItemRecord], model: str | None = None
) -> tuple[str, int]:
    """Stream every item's result line (of a job of `model`) into results.jsonl; returns its URI and the line
    count."""
    count = 0
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as fh:
        for item in items:
            fh.write(json.dumps(item.result_line(model)) + "\n")
            count += 1
        path = Path(fh.name)
    try:
        uri = store.put_file(results_key(job_id), path, JSONL)
    finally:
        path.unlink(missing_ok=True)
    return uri, count


def read_results(store: ObjectStore, job_id: str) -> list[dict] | None:
    data = store.get(results_key(job_id))
    return None if data is None else [json.loads(line) for line in data.decode().splitlines() if line]


def has_results(store: ObjectStore, job_id: str) -> bool:
    return store.get(results_key(job_id)) is not None


# --- API keys and idempotency records ---------------------------------------------------------
def write_api_key(store: ObjectStore, key: ApiKeyRecord) -> str:
    return store.put(keys.S3_API_KEY.format(prefix="", key_id=key.key_id), key.model_dump_json().encode(), JSON)


def read_api_key(store: ObjectStore, key_id: str) -> ApiKeyRecord | None:
    data = store.get(keys.S3_API_KEY.format(prefix="", key_id=key_id))
    return None if data is None else ApiKeyRecord.model_validate_json(data)


def read_api_keys(store: ObjectStore) -> list[ApiKeyRecord]:
    """Every key recorded here, oldest first."""
    found = [store.get(key) for key in store.keys(keys.S3_API_KEYS.format(prefix="")) if key.endswith(".json")]
    return sorted((ApiKeyRecord.model_validate_json(d) for d in found if d is not None), key=lambda k: k.created_at)


def write_idempotency(
    store: ObjectStore, key_id: str, digest: str, fingerprint: str, job_id: str, expires: float
) -> str:
    key = keys.S3_IDEMPOTENCY.format(prefix="", key_id=key_id, digest=digest)
    record = {"fingerprint": fingerprint, "job_id": job_id, "expires": expires}
    return store.put(key, json.dumps(record).encode(), JSON)


def read_idempotency(store: ObjectStore, key_id: str, digest: str) -> dict[str, Any] | None:
    """{fingerprint, job_id, expires} of a settled Idempotency-Key, or None (also once it has expired)."""
    data = store.get(keys.S3_IDEMPOTENCY.format(prefix="", key_id=key_id, digest=digest))
    if data is None:
        return None
    record = json.loads(data)
    return record if record.get("expires", 0) > time.time() else None


# --- the whole job ----------------------------------------------------------------------------
def delete_job(store: ObjectStore, location: str, job_id: str) -> int:
    """Delete every image the job's item records name (a row's own output_key may sit outside the job folder),
    then everything under the job folder: its record, staged inputs, outputs and review sheet. Returns the count."""
    doomed: set[str] = set()
    for result in read_item_results(store, job_id).values():
        for image in (result.get("output") or {}).get("images") or []:
            key = key_of(location, image.get("s3_uri") or "")
            if key:
                doomed.add(key)
    doomed.update(store.keys(keys.S3_JOB_FOLDER.format(prefix="", job_id=job_id)))
    for key in sorted(doomed):
        store.delete(key)
    return len(doomed)
