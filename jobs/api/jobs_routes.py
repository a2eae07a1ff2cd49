"""/v1/jobs: manifest jobs over HTTP, the same jobs `dreambatch submit` creates.

POST takes a manifest file (multipart `manifest`, CSV or JSONL) or JSON rows; a bad manifest is a
422 listing every bad line as `line N: field: message (got value)`, and nothing is queued.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jobs import control, export, keys
from jobs.api import schemas, shapes, tenancy
from jobs.api.deps import ServicesDep, require
from jobs.api.service import (
    ApiError,
    Services,
    Upload,
    fingerprint,
    idempotent,
    job_status,
    not_found,
    sign_file,
    submit,
)
from jobs.errors import InputError, ManifestInvalid
from jobs.formats import CONTENT_TYPES, EXTENSIONS
from jobs.lifecycle import ItemStatus
from jobs.manifest import parse_sets
from jobs.models import (
    DEFAULT_WEBHOOK_EVENTS,
    ApiKeyRecord,
    JobRecord,
    JobSpec,
    Priority,
    WebhookEvent,
    parse_duration,
    parse_webhook_events,
)

router = APIRouter(tags=["jobs"])
JobId = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", description="a job id")]
Reader = Annotated[ApiKeyRecord, Depends(require("jobs:read"))]
Writer = Annotated[ApiKeyRecord, Depends(require("jobs:write"))]
IdempotencyKey = Annotated[
    str | None, Header(alias="Idempotency-Key", max_length=255, description="same key + same body → the same job")
]
ERRORS = shapes.responses(shapes.OPENAI, *shapes.COMMON)  # every route here: a key, its input, Redis
ONE_JOB = shapes.responses(shapes.OPENAI, 404, _404="no such job")
MANIFEST_TYPES = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    "text/csv": "csv",
    "application/x-ndjson": "jsonl",
    "application/jsonl": "jsonl",
    "application/x-jsonlines": "jsonl",
}
Scalar = str | int | float | bool
NOT_ASKED = {"output", "review_sheet", "catalog"}  # spec fields a request does not set (left out of its fingerprint)


class JobCreate(BaseModel):
    """A job from JSON rows (each row as a manifest line would have it)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(..., description="i1-full, i1-dev, i1-fast, e1-1 or e1-full")
    rows: list[dict[str, Any]] = Field(..., min_length=1, description="manifest rows")
    defaults: dict[str, Scalar] = Field(default_factory=dict, description="job defaults (`--set`)")
    webhook: str | None = Field(None, max_length=2048, description="POSTed on every item and job terminal state")
    webhook_events: list[WebhookEvent] = Field(
        default_factory=lambda: list(DEFAULT_WEBHOOK_EVENTS),
        min_length=1,
        description="which events the webhook gets: start (job.running), item (each item's end), job (the job's end)",
    )
    skip_invalid: bool = Field(False, description="queue the valid rows, record the invalid ones as failed")
    priority: Priority = Field("normal", description="a worker takes high items first, low ones last")
    max_concurrency: int | None = Field(None, ge=1, le=100_000, description="at most N items running at once")
    expires_after: str | None = Field(
        None, max_length=16, description="90s, 15m, 2h, 1d: items not started by then end cancelled (reason expired)"
    )


class JobUpload(BaseModel):
    """A job from a manifest file."""

    manifest: bytes = Field(..., json_schema_extra={"format": "binary"}, description="a .csv or .jsonl manifest")
    model: str
    set: list[str] = Field(default_factory=list, description="job defaults, key=value")
    webhook: str | None = None
    webhook_events: str | None = Field(None, max_length=64, description="start,item,job (default item,job)")
    skip_invalid: bool = False
    priority: Priority = "normal"
    max_concurrency: int | None = Field(None, ge=1, le=100_000)
    expires_after: str | None = Field(None, max_length=16)


CREATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": JobCreate.model_json_schema()},
            "multipart/form-data": {"schema": JobUpload.model_json_schema()},
        },
    }
}


def _lines(exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "body"
        got = "" if err["type"] == "missing" else f" (got {json.dumps(err.get('input'), default=str)[:80]})"
        out.append(f"{where}: {err['msg'].lower()}{got}")
    return out


def _duration(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return parse_duration(text)
    except InputError as exc:
        raise ApiError(422, f"expires_after: {exc}", param="expires_after", errors=[f"expires_after: {exc}"]) from None


async def _read_capped(upload, limit: int, dest: Path) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, f"{upload.filename or 'upload'}: over the {limit}-byte limit", code="too_large")
    dest.write_bytes(data)
    return data


async def _parse_create(request: Request, svc: Services, upload: Upload) -> tuple[Path, JobSpec, str]:
    """The manifest file, the job options and a fingerprint of both, from either body shape."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=200)
        file = form.get("manifest")
        if file is None or isinstance(file, str):
            raise ApiError(
                422, "manifest: a manifest file is required", param="manifest", errors=["manifest: field required"]
            )
        suffix = Path(file.filename or "").suffix.lower()
        fmt = MANIFEST_TYPES.get(suffix) or MANIFEST_TYPES.get((file.content_type or "").lower())
        if fmt is None:
            raise ApiError(
                422,
                f"manifest: unknown manifest type {suffix or file.content_type!r}; use .csv or .jsonl",
                param="manifest",
            )
        try:
            fields = JobUpload(
                manifest=b"",
                model=form.get("model"),
                set=form.getlist("set"),
                webhook=form.get("webhook") or None,
                webhook_events=form.get("webhook_events") or None,
                skip_invalid=str(form.get("skip_invalid", "false")).lower() in ("1", "true", "yes"),
                priority=form.get("priority") or "normal",
                max_concurrency=form.get("max_concurrency") or None,
                expires_after=form.get("expires_after") or None,
            )
            defaults = parse_sets(fields.set)
        except ValidationError as exc:
            lines = _lines(exc)
            raise ApiError(422, "; ".join(lines), errors=lines) from None
        try:
            events = parse_webhook_events(fields.webhook_events) if fields.webhook_events else DEFAULT_WEBHOOK_EVENTS
        except InputError as exc:
            raise ApiError(422, str(exc), param="webhook_events", errors=[str(exc)]) from None
        path = upload.root / f"manifest.{fmt}"
        data = await _read_capped(file, svc.settings.api.max_upload_bytes, path)
        options = JobSpec(
            model=fields.model,
            defaults=defaults,
            webhook=fields.webhook,
            webhook_events=events,
            skip_invalid=fields.skip_invalid,
            priority=fields.priority,
            max_concurrency=fields.max_concurrency,
            expires_after=_duration(fields.expires_after),
        )
        return path, options, fingerprint("manifest", fmt, data, options.model_dump(exclude=NOT_ASKED))
    if kind not in ("application/json", ""):
        raise ApiError(
            415,
            f"send application/json rows or a multipart/form-data manifest (got {kind!r})",
            code="unsupported_media_type",
        )
    try:
        body = JobCreate.model_validate_json(await request.body())
    except ValidationError as exc:
        lines = _lines(exc)
        raise ApiError(422, "; ".join(lines), errors=lines) from None
    if len(body.rows) > svc.settings.api.max_json_rows:
        raise ApiError(
            413,
            f"rows: at most {svc.settings.api.max_json_rows} rows in a JSON body; upload a manifest file for more",
            code="too_large",
            param="rows",
        )
    options = JobSpec(
        model=body.model,
        defaults={k: str(v) for k, v in body.defaults.items()},
        webhook=body.webhook,
        webhook_events=body.webhook_events,
        skip_invalid=body.skip_invalid,
        priority=body.priority,
        max_concurrency=body.max_concurrency,
        expires_after=_duration(body.expires_after),
    )
    return upload.write_rows(body.rows), options, fingerprint("rows", body.model_dump())


@router.post(
    "/v1/jobs",
    status_code=201,
    openapi_extra=CREATE_BODY,
    responses={
        201: {"model": schemas.JobCreated},
        **ERRORS,
        **shapes.responses(shapes.OPENAI, 409, 413, 415, 500),
        422: {"model": schemas.Error, "description": "every bad line, as `line N: field: message (got value)`"},
    },
)
async def create(request: Request, svc: ServicesDep, key: Writer, idempotency_key: IdempotencyKey = None):
    """Submit a manifest (multipart `manifest` file) or JSON rows as a job."""
    upload = Upload()
    try:
        manifest, options, body = await _parse_create(request, svc, upload)
        created: dict[str, Any] = {}

        def create_job() -> str:
            try:
                sub = submit(svc, manifest, tenancy.own(svc, key, options), upload)
            except ManifestInvalid as exc:
                raise ApiError(422, str(exc).replace(str(manifest), "manifest"), errors=exc.issues) from None
            created.update(queued=sub.queued, rejected=sub.rejected, notes=sub.report.notes[:100])
            return sub.job.job_id

        job_id, replayed = await idempotent(svc, key.key_id, idempotency_key, body, create_job)
    finally:
        upload.close()
    job = await anyio.to_thread.run_sync(svc.job, job_id)
    out = {**job_status(job, workers=await anyio.to_thread.run_sync(svc.store.workers)), **created}
    return JSONResponse(out, 201, headers={"Idempotent-Replayed": "true"} if replayed else None)


@router.get("/v1/jobs", responses={200: {"model": schemas.JobList}, **ERRORS})
def list_jobs(svc: ServicesDep, key: Reader, limit: Annotated[int, Query(ge=1, le=200)] = 50) -> dict:
    """The most recent jobs of the key's tenant (every tenant's with `admin`), newest first."""
    jobs = tenancy.jobs_of(svc, key, limit)
    workers = svc.store.workers()
    return {"object": "list", "data": [job_status(j, workers=workers) for j in jobs]}


@router.get("/v1/jobs/{job_id}", responses={200: {"model": schemas.JobStatus}, **ERRORS, **ONE_JOB})
def get_job(job_id: JobId, svc: ServicesDep, key: Reader) -> dict:
    """Status, counts, throughput (items/s since submission) and ETA; `warning` when no live worker serves it."""
    job = tenancy.job_for(svc, key, job_id)
    steps = None if job.finished_at else svc.store.running_steps(job_id)
    return job_status(job, workers=svc.store.workers(), steps=steps)


@router.get("/v1/jobs/{job_id}/items", responses={200: {"model": schemas.ItemList}, **ERRORS, **ONE_JOB})
def list_items(
    job_id: JobId,
    svc: ServicesDep,
    key: Reader,
    status: Annotated[ItemStatus | None, Query(description="only items in this status")] = None,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict:
    """Items in manifest order, each as its results line (filter with `status=failed`); a running item's line
    has `progress`, its denoising step: {"step": 3, "steps": 16}."""
    job = tenancy.job_for(svc, key, job_id)
    steps = {} if job.finished_at else svc.store.running_steps(job_id)
    data: list[dict] = []
    seen = 0
    for item in svc.store.items(job_id):
        if status is not None and item.status != status:
            continue
        if seen >= offset and len(data) < limit:
            line = item.result_line(job.model)
            if item.status == ItemStatus.RUNNING and item.item_id in steps:
                line["progress"] = dict(zip(("step", "steps"), steps[item.item_id], strict=True))
            data.append(line)
        seen += 1
    return {
        "object": "list",
        "data": data,
        "total": seen,
        "next_offset": offset + len(data) if offset + len(data) < seen else None,
    }


@router.get(
    "/v1/jobs/{job_id}/results",
    response_class=Response,
    responses={200: {"content": {"application/x-ndjson": {}, "text/csv": {}}}, **ERRORS, **ONE_JOB},
)
def results(
    job_id: JobId,
    svc: ServicesDep,
    key: Reader,
    format: Annotated[Literal["jsonl", "csv"], Query(description="jsonl or csv")] = "jsonl",
):  # noqa: A002
    """One line per manifest row (live state while the job runs). CSV cells that a spreadsheet would run
    (starting with = + - @) are quoted."""
    job = tenancy.job_for(svc, key, job_id)
    lines = export.result_lines(job, svc)
    if format == "csv":
        return StreamingResponse(
            export.csv_rows(lines),
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{job_id}.csv"'},
        )
    return StreamingResponse(export.jsonl_rows(lines), media_type="application/x-ndjson")


def _sse(event: str, data: dict, event_id: int) -> str:
    return f"id: {event_id}\nevent: {event}\ndata: {json.dumps(data)}\n\n"


@router.get(
    "/v1/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **ERRORS, **ONE_JOB},
)
async def events(
    job_id: JobId,
    svc: ServicesDep,
    key: Reader,
    timeout: Annotated[float, Query(gt=0, le=86400, description="s before the stream closes")] = 3600,
) -> StreamingResponse:
    """Server-sent events: `progress` (the status object) whenever status, counts or a running item's denoising
    step change, then `end` when the job has ended (or `timeout` when the stream closes first; reconnect to go on)."""
    await anyio.to_thread.run_sync(tenancy.job_for, svc, key, job_id)
    deadline = time.monotonic() + timeout

    async def stream():
        last, n, beat = None, 0, time.monotonic()
        while True:
            job: JobRecord | None = await anyio.to_thread.run_sync(svc.store.get_job, job_id)
            if job is None:
                yield _sse("error", not_found(job_id).body(), n + 1)
                return
            steps = None if job.finished_at else await anyio.to_thread.run_sync(svc.store.running_steps, job_id)
            status = job_status(job, steps=steps)
            state = (status["status"], tuple(status["counts"].values()), tuple(sorted((steps or {}).items())))
            if state != last:
                last, n, beat = state, n + 1, time.monotonic()
                yield _sse("progress", status, n)
            elif time.monotonic() - beat > 15:
                beat = time.monotonic()
                yield ": keep-alive\n\n"
            if job.finished_at:
                yield _sse("end", status, n + 1)
                return
            if time.monotonic() >= deadline:
                yield _sse("timeout", status, n + 1)
                return
            await anyio.sleep(0.5)

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


@router.post(
    "/v1/jobs/{job_id}/cancel",
    responses={200: {"model": schemas.JobStatus}, **ERRORS, **ONE_JOB, **shapes.responses(shapes.OPENAI, 409)},
)
def cancel(job_id: JobId, svc: ServicesDep, key: Writer) -> dict:
    """Queued items end `cancelled` at once, running items stop at their next step; the job ends
    `cancelled` (webhook sent) when they have. Outputs already written are kept. 409 for a job that
    already ended otherwise; cancelling a cancelled job changes nothing."""
    tenancy.job_for(svc, key, job_id)
    return job_status(control.cancel_job(svc, job_id))


@router.post(
    "/v1/jobs/{job_id}/retry",
    responses={200: {"model": schemas.JobRequeued}, **ERRORS, **ONE_JOB, **shapes.responses(shapes.OPENAI, 409)},
)
def retry(job_id: JobId, svc: ServicesDep, key: Writer) -> dict:
    """Re-queue only the failed items, in the same job (same ids and lines, attempts counted); `requeued`
    lists their ids ([] when none failed)."""
    tenancy.job_for(svc, key, job_id)
    requeued = control.retry_job(svc, job_id)
    return {**job_status(svc.job(job_id)), "requeued": requeued}


@router.post(
    "/v1/jobs/{job_id}/resume",
    responses={200: {"model": schemas.JobRequeued}, **ERRORS, **ONE_JOB, **shapes.responses(shapes.OPENAI, 409)},
)
def resume(job_id: JobId, svc: ServicesDep, key: Writer) -> dict:
    """Re-queue the items that have no result (after an outage lost their messages); nothing that ended
    runs again."""
    tenancy.job_for(svc, key, job_id)
    requeued = control.resume_job(svc, job_id)
    return {**job_status(svc.job(job_id)), "requeued": requeued}


@router.get(
    "/v1/files/{job_id}/{key:path}",
    response_class=Response,
    tags=["files"],
    responses={
        200: {"content": {t: {} for t in CONTENT_TYPES.values()}},
        **shapes.responses(shapes.OPENAI, 403, 404, 422, 503),
    },
)
def file(
    job_id: JobId,
    key: str,
    svc: ServicesDep,
    expires: Annotated[int, Query(ge=0, le=2**40)],
    signature: Annotated[str, Query(max_length=64)],
) -> Response:
    """An output image, by the signed link an images response gave (no API key: the signature is the key)."""
    import hmac

    good = hmac.compare_digest(sign_file(svc, job_id, key, expires).encode(), signature.encode())
    if not good or expires < time.time() or not key.startswith(keys.S3_JOB_FOLDER.format(prefix="", job_id=job_id)):
        raise ApiError(403, "invalid or expired link", type_="permission_error", code="invalid_signature")
    job = svc.job(job_id)
    data = svc.objects(job.output).get(key, svc.settings.api.max_upload_bytes)
    if data is None:
        raise ApiError(404, "no such file", code="not_found")
    media = {EXTENSIONS[f]: t for f, t in CONTENT_TYPES.items()}.get(key.rsplit(".", 1)[-1], "application/octet-stream")
    return Response(data, media_type=media)
