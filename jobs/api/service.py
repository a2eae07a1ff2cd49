"""What the routes share: the app's `Services` (jobs.services: settings, store, Celery, object stores), submitting
rows or a manifest as a job exactly as `dreambatch submit` does, waiting for a job, its status with
rate and ETA, and links to its images (presigned S3 URLs, or signed URLs this server serves).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from jobs import pace, records
from jobs.api import keyring
from jobs.errors import DreambatchError, ManifestInvalid
from jobs.inputs import InputPolicy
from jobs.lifecycle import ItemStatus
from jobs.metrics import no_worker_warning
from jobs.models import JobRecord, JobSpec, OutputImage
from jobs.services import Services
from jobs.storage import key_of
from jobs.submit import Submission, create_job

IDEMPOTENCY_TTL = 24 * 3600
log = logging.getLogger("dreambatch.api")


class ApiError(Exception):
    """An error the API answers with `status` and `{"error": {"message", "type", "code", "errors"?}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        errors: list[str] | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(status, message)
        self.status, self.message, self.type, self.code, self.errors, self.param = (
            status,
            message,
            type_,
            code,
            errors,
            param,
        )
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"message": self.message, "type": self.type, "code": self.code, "param": self.param}
        if self.errors is not None:
            error["errors"] = self.errors
        return {"error": error}


def not_found(job_id: str) -> ApiError:
    return ApiError(404, f"no job {job_id!r}", code="not_found")


# --- submitting ---------------------------------------------------------------------------------
class Upload:
    """A private folder for one request: the manifest, and the only place its local image paths may point."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="dreambatch-api-"))
        self.inputs = self.root / "inputs"
        self.inputs.mkdir()

    def write_rows(self, rows: list[dict[str, Any]]) -> Path:
        path = self.root / "manifest.jsonl"
        with path.open("w") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
        return path

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def submit(svc: Services, manifest: Path, spec: JobSpec, upload: Upload) -> Submission:
    """Validate and queue a manifest as every job is made (jobs.submit.create_job). Local image paths may only
    name files uploaded with this request (the upload's inputs folder), never the server's own files."""
    return create_job(spec, manifest, svc, policy=InputPolicy(upload.inputs, (), svc.settings.inputs.max_bytes))


def submit_rows(svc: Services, rows: list[dict[str, Any]], spec: JobSpec, upload: Upload, status: int = 422) -> str:
    """One request's rows as a job; returns its id. Bad rows are an ApiError `status` listing each problem once,
    without the `line N:` of a manifest (the request's fields are its only line)."""
    try:
        return submit(svc, upload.write_rows(rows), spec, upload).job.job_id
    except ManifestInvalid as exc:
        errors = list(dict.fromkeys(re.sub(r"^line \d+: ", "", e) for e in exc.issues))
        raise ApiError(status, "; ".join(errors) or str(exc), errors=errors) from None


def fingerprint(*parts: Any) -> str:
    """A digest of what a request asked for (canonical JSON of its parts; bytes by their SHA-256)."""

    def canon(value: Any) -> Any:
        return hashlib.sha256(value).hexdigest() if isinstance(value, bytes) else value

    return hashlib.sha256(json.dumps([canon(p) for p in parts], sort_keys=True, default=str).encode()).hexdigest()


async def idempotent(svc: Services, key_id: str, idempotency_key: str | None, body: str, create) -> tuple[str, bool]:
    """Run `create()` (a sync function returning a job id) at most once per Idempotency-Key and body.
    Returns (job_id, replayed). The same key with another body is a 422; while the first request with
    a key is still running, a second one gets 409."""
    if idempotency_key is None:
        return await anyio.to_thread.run_sync(create), False
    if not 1 <= len(idempotency_key) <= 255 or not idempotency_key.isprintable():
        raise ApiError(422, "Idempotency-Key must be 1..255 printable characters", param="Idempotency-Key")
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()
    seen = await anyio.to_thread.run_sync(svc.store.claim_idempotency, key_id, digest, body, IDEMPOTENCY_TTL)
    if seen is None:  # new to Redis: the durable record says whether it was settled before a Redis loss
        seen = await anyio.to_thread.run_sync(_settled_before, svc, key_id, digest)
    if seen is not None:
        if seen["fingerprint"] != body:
            raise ApiError(
                422,
                "this Idempotency-Key was used with a different request body",
                code="idempotency_key_reused",
                param="Idempotency-Key",
            )
        if seen["job_id"] is None:
            raise ApiError(
                409,
                "a request with this Idempotency-Key is still being processed",
                code="idempotency_key_in_use",
                param="Idempotency-Key",
            )
        return seen["job_id"], True
    job_id = None
    try:
        job_id = await anyio.to_thread.run_sync(create)
        await anyio.to_thread.run_sync(_keep_durably, svc, key_id, digest, body, job_id)
        return job_id, False
    finally:
        await anyio.to_thread.run_sync(svc.store.settle_idempotency, key_id, digest, body, job_id, IDEMPOTENCY_TTL)


def _settled_before(svc: Services, key_id: str, digest: str) -> dict[str, Any] | None:
    """A key Redis did not know: its durable record (cached in Redis again), or None to go ahead."""
    objects = keyring.durable(svc)
    found = records.read_idempotency(objects, key_id, digest) if objects is not None else None
    if found is None:
        return None
    ttl = max(1, int(found["expires"] - time.time()))
    svc.store.settle_idempotency(key_id, digest, found["fingerprint"], found["job_id"], ttl)
    return found


def _keep_durably(svc: Services, key_id: str, digest: str, body: str, job_id: str) -> None:
    """The settled key, next to the API's keys; a failed write leaves it in Redis alone (and says so)."""
    objects = keyring.durable(svc)
    if objects is None:
        return
    try:
        records.write_idempotency(objects, key_id, digest, body, job_id, time.time() + IDEMPOTENCY_TTL)
    except DreambatchError as exc:
        log.warning("Idempotency-Key of job %s is kept in Redis only: %s", job_id, exc)


class StillRunning(ApiError):
    """A waited-for job that has not ended in time (504); `job` is its latest state."""

    def __init__(self, job: JobRecord, timeout: float, where: str, headers: dict[str, str] | None = None):
        super().__init__(
            504,
            f"job {job.job_id} has not ended after {timeout:g}s; it keeps running: {where}",
            type_="timeout",
            code="timeout",
            headers=headers,
        )
        self.job = job


@dataclass
class _Waited:
    waiters: int = 0
    event: anyio.Event = field(default_factory=anyio.Event)  # set (and replaced) when the job's end is heard


class Endings:
    """The jobs this API process waits for, each with an event that the app's one listener
    (jobs.store.listen_for_endings, started with the app) sets as finish_job announces the job's end. Both run
    on the app's event loop."""

    def __init__(self) -> None:
        self._waited: dict[str, _Waited] = {}

    @contextmanager
    def watch(self, job_id: str) -> Iterator[_Waited]:
        waited = self._waited.setdefault(job_id, _Waited())
        waited.waiters += 1
        try:
            yield waited
        finally:
            waited.waiters -= 1
            if not waited.waiters:
                del self._waited[job_id]

    def ended(self, job_id: str) -> None:
        waited = self._waited.get(job_id)
        if waited is not None:
            waited.event.set()
            waited.event = anyio.Event()  # for a job ended again after `retry JOB`


async def wait_for(
    svc: Services,
    job_id: str,
    timeout: float,
    interval: float = 0.1,
    *,
    request=None,
    where: str | None = None,
    headers: dict[str, str] | None = None,
    endings: Endings | None = None,
) -> JobRecord:
    """The job once it has ended; StillRunning (a 504, code `timeout`) when it has not within `timeout` s or
    the client of `request` went away, and 503 (code `no_worker`) as soon as no live worker has served one of
    the queues it needs for two heartbeats. Between reads it waits `interval` s (growing to 1 s), or less when
    `endings` hears the job end; without them (or while their listener cannot reach Redis) it just polls."""
    with (endings or Endings()).watch(job_id) as waited:
        return await _wait(svc, job_id, timeout, interval, waited, request, where, headers)


async def _wait(
    svc: Services,
    job_id: str,
    timeout: float,
    interval: float,
    waited: _Waited,
    request: Any,
    where: str | None,
    headers: dict[str, str] | None,
) -> JobRecord:
    deadline = time.monotonic() + timeout
    grace = 2 * svc.settings.celery.heartbeat
    unserved_since, looked = None, 0.0
    while True:
        ended = waited.event  # taken before the read: an end announced after it still wakes this wait
        job = await anyio.to_thread.run_sync(svc.job, job_id)
        if job.finished_at:
            return job
        if time.monotonic() - looked >= min(grace / 4, 1.0):
            looked = time.monotonic()
            warning = no_worker_warning(await anyio.to_thread.run_sync(svc.store.workers), job.model)
            unserved_since = (unserved_since or looked) if warning else None
            if warning and unserved_since is not None and looked - unserved_since >= grace:
                raise ApiError(
                    503,
                    f"job {job_id}: {warning}; it stays queued and runs then: {where or f'GET /v1/jobs/{job_id}'}",
                    type_="server_error",
                    code="no_worker",
                    headers=headers,
                )
        if time.monotonic() >= deadline or (request is not None and await request.is_disconnected()):
            raise StillRunning(job, timeout, where or f"GET /v1/jobs/{job_id}", headers)
        with anyio.move_on_after(min(interval, max(deadline - time.monotonic(), 0))):
            await ended.wait()
        interval = min(interval * 1.5, 1.0)


# --- reading ------------------------------------------------------------------------------------
def job_status(
    job: JobRecord,
    now: float | None = None,
    workers: list[dict[str, Any]] | None = None,
    steps: dict[str, tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """Status, counts, throughput since submission (items/s, jobs.pace) and, while running, the ETA in seconds,
    the model seconds its items used (`gpu_s`) and, given the store's `steps`, each running item's denoising
    step. Given the live `workers` (heartbeats), an unfinished job nobody serves gets a `warning` saying which
    worker to start."""
    counts = {"total": job.total, **{s.value: job.counts.get(s, 0) for s in ItemStatus}}
    return {
        "id": job.job_id,
        "object": "job",
        "status": job.status,
        "model": job.model,
        "counts": counts,
        **pace.since(job, now).as_dict(),
        "gpu_s": job.gpu_s,
        "running": pace.running(steps or {}),
        "priority": job.priority,
        "max_concurrency": job.max_concurrency,
        "expires_at": job.expires_at,
        "cancel_requested": job.cancel_requested,
        "round": job.round,
        "schedule": job.schedule,
        "webhook": job.webhook,
        "webhook_events": job.webhook_events,
        "results_uri": job.results_uri,
        "created_at": job.created_at,
        "finished_at": job.finished_at,
        "warning": None
        if workers is None or job.finished_at or job.submit_aborted
        else no_worker_warning(workers, job.model),
    }


def sign_file(svc: Services, job_id: str, key: str, expires: int) -> str:
    return hmac.new(svc.url_secret, f"{job_id}\n{key}\n{expires}".encode(), hashlib.sha256).hexdigest()


def image_url(svc: Services, job: JobRecord, image: OutputImage, base_url: str) -> str | None:
    """A URL the client can fetch without credentials: presigned S3, or a signed link to /v1/files."""
    key = key_of(job.output, image.s3_uri or "")
    if key is None:
        return None
    url = svc.objects(job.output).url(key, svc.settings.api.url_expires)
    if url:
        return url
    expires = int(time.time()) + svc.settings.api.url_expires
    base = (svc.settings.api.public_url or base_url).rstrip("/")
    return f"{base}/v1/files/{job.job_id}/{key}?expires={expires}&signature={sign_file(svc, job.job_id, key, expires)}"


def image_b64(svc: Services, job: JobRecord, image: OutputImage) -> str:
    key = key_of(job.output, image.s3_uri or "")
    data = svc.objects(job.output).get(key, svc.settings.api.max_upload_bytes) if key else None
    if data is None:
        raise ApiError(502, f"output {image.s3_uri} is missing from storage", type_="server_error")
    return base64.b64encode(data).decode()
