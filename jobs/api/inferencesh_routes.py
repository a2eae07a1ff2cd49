"""inference.sh's protocol at the API root (the `inferencesh` SDK appends its paths to `base_url`), so
`inference(api_key=KEY, base_url="https://HOST:PORT")` runs its documented examples unchanged:

    POST /apps/run                {"app": "infsh/hidream-e1-full", "input": {…}, "webhook"?} → the task
    GET  /tasks/{id}              the task: integer `status` (the SDK's TaskStatus), `output`, `error`, `progress`
    GET  /tasks/{id}/stream       NDJSON: the task now, then every change, heartbeats; closed after a terminal line
    POST /tasks/{id}/cancel       the task (CANCELLING, then CANCELLED once it stops)
    POST /files                   {"files": [{filename, content_type, size}]} → [{uri, upload_url, …}]: the SDK PUTs
                                  the bytes to `upload_url` (no auth) and sends `uri` as the app's image

Every answer is wrapped as `{"data": …}`; errors are RFC 9457 problem+json (jobs.api.shapes). The key comes as
`Authorization: Bearer …`. A task is a one-item job (task id = job id) on the same queues as every other.
The same body re-POSTed by the same key within the retry window is the same task (jobs.api.retries).
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Header, Request
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from jobs import control
from jobs.api import retries, shapes, tenancy, uploads
from jobs.api.deps import ServicesDep, endings, require
from jobs.api.service import ApiError, Services, Upload, fingerprint, image_url, submit_rows
from jobs.errors import InputError, JobStateError
from jobs.models import MODELS, ApiKeyRecord, JobRecord, JobSpec
from jobs.vendors import common, inferencesh
from jobs.vendors.inferencesh import TaskStatus

router = APIRouter(tags=["inference.sh"])
Images = Annotated[ApiKeyRecord, Depends(require("images"))]
TaskId = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", description="a task id")]
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)]
ERRORS = shapes.responses(shapes.INFERENCESH, 400, *shapes.COMMON, 413)
SUBMITS = shapes.responses(shapes.INFERENCESH, 409, 500)  # an Idempotency-Key in use, no output configured
TASK_ERRORS = shapes.responses(shapes.INFERENCESH, 404, *shapes.COMMON, _404="no such task")
HEARTBEAT_EVERY = 15.0  # s between heartbeat lines (the SDK's read timeout is 60 s)
REPEAT_EVERY = 20.0  # s after which an unchanged state is sent again (the SDK gives up after 30 s of heartbeats)
IMAGE_FIELDS = ("image", "image_url")
MAX_INPUT_KEYS = 64


class AppRun(BaseModel):
    """ApiAppRunRequest: the fields this server reads (others are accepted and ignored)."""

    model_config = ConfigDict(extra="allow")
    app: str = Field(
        ...,
        min_length=1,
        max_length=200,
        examples=["infsh/hidream-i1-fast"],
        description="infsh/hidream-e1-full, infsh/hidream-i1-fast, … (an @version or :function suffix is fine)",
    )
    input: dict[str, Any] | None = Field(
        None,
        description="the app's input, as its page lists it",
        examples=[{"prompt": "a lighthouse at dusk", "num_inference_steps": 16}],
    )
    webhook: str | None = Field(None, max_length=2048, description="POSTed once when the task ends")


class TaskData(BaseModel):
    id: str
    status: int = Field(
        ..., description="TaskStatus: 2 queued, 7 running, 8 cancelling, 10 completed, 11 failed, 12 cancelled"
    )
    status_text: str
    app: str
    input: dict[str, Any]
    output: dict[str, Any] | None
    error: str
    error_kind: str | None
    progress: float | None
    logs: list[Any]
    session_id: str | None
    webhook: str | None
    created_at: str
    updated_at: str


class TaskEnvelope(BaseModel):
    data: TaskData


class FileRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    uri: str | None = None
    filename: str | None = Field(None, max_length=255)
    content_type: str | None = Field(None, max_length=100)
    path: str | None = None
    size: int | None = Field(None, ge=0)
    public: bool | None = None


class FilesRequest(BaseModel):
    files: list[FileRequest] = Field(..., min_length=1, max_length=20)


class FileData(BaseModel):
    id: str
    uri: str
    upload_url: str
    filename: str
    content_type: str
    size: int | None
    created_at: str
    updated_at: str


class FilesEnvelope(BaseModel):
    data: list[FileData]


def model_of(app: str) -> str:
    model = inferencesh.model_of(app)
    if model is None:
        raise ApiError(
            404, f"no app {app!r}; try infsh/hidream-{', infsh/hidream-'.join(MODELS)}", code="app_not_found"
        )
    return model


def _job(svc: Services, key: ApiKeyRecord, task_id: str) -> JobRecord:
    job = svc.store.get_job(task_id)
    if job is None or job.webhook_format != "inferencesh" or not tenancy.sees(key, job):
        raise ApiError(404, f"no task {task_id!r}", code="not_found")
    return job


def _stored_input(values: dict[str, Any]) -> dict[str, Any]:
    """The input as the task echoes it, long strings (a data URI) cut short."""
    return {
        k: (f"{v[:64]}… ({len(v)} characters)" if isinstance(v, str) and len(v) > 512 else v) for k, v in values.items()
    }


def task_of(
    svc: Services, key: ApiKeyRecord, task_id: str, base_url: str, job: JobRecord | None = None
) -> dict[str, Any]:
    job = job or _job(svc, key, task_id)
    item = next(svc.store.items(task_id), None)
    step = svc.store.step_of(task_id, item.item_id) if item is not None and not job.finished_at else None
    return inferencesh.task(
        job, item, lambda image: image_url(svc, job, image, base_url), progress=common.progress(step)
    )


@router.post(
    "/apps/run",
    responses={
        200: {"model": TaskEnvelope},
        **ERRORS,
        **SUBMITS,
        **shapes.responses(shapes.INFERENCESH, 404, _404="no such app"),
    },
)
async def run_app(
    body: AppRun, request: Request, svc: ServicesDep, key: Images, idempotency_key: IdempotencyKey = None
) -> dict:
    """Run an app: the task, queued (the SDK then streams or polls it)."""
    model = model_of(body.app)
    values = dict(body.input or {})
    if len(values) > MAX_INPUT_KEYS:
        raise ApiError(422, f"input: at most {MAX_INPUT_KEYS} fields", param="input")
    try:
        row = inferencesh.row(model, values)
    except InputError as exc:
        raise ApiError(422, str(exc), errors=[str(exc)]) from None
    api = {"app": body.app, "input": _stored_input(values)}

    def create() -> str:
        upload = Upload()
        try:
            uploads.resolve(svc, request, row, IMAGE_FIELDS, upload)
            options = JobSpec(model=model, webhook=body.webhook, webhook_format="inferencesh", api=api)
            return submit_rows(svc, [row], tenancy.own(svc, key, options), upload)
        finally:
            upload.close()

    job_id, _ = await retries.once(
        svc,
        key.key_id,
        idempotency_key,
        fingerprint("inferencesh", model, values, body.webhook),
        create,
        retries.Attempt.of(request),
    )
    return {"data": await anyio.to_thread.run_sync(task_of, svc, key, job_id, str(request.base_url))}


@router.get("/tasks/{task_id}", responses={200: {"model": TaskEnvelope}, **TASK_ERRORS})
def get_task(task_id: TaskId, request: Request, svc: ServicesDep, key: Images) -> dict:
    """The task now."""
    return {"data": task_of(svc, key, task_id, str(request.base_url))}


@router.post("/tasks/{task_id}/cancel", responses={200: {"model": TaskEnvelope}, **TASK_ERRORS})
def cancel_task(task_id: TaskId, request: Request, svc: ServicesDep, key: Images) -> dict:
    """Cancel a task that has not ended: CANCELLING until its item stops, then CANCELLED. A task that has ended
    is answered as it is."""
    job = _job(svc, key, task_id)
    if not job.cancel_requested and not common.ended(job, next(svc.store.items(task_id), None)):
        try:
            control.cancel_job(svc, task_id)
        except JobStateError:  # it ended in between: answered as it is
            pass
    return {"data": task_of(svc, key, task_id, str(request.base_url))}


@router.get(
    "/tasks/{task_id}/stream",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"application/x-ndjson": {}},
            "description": 'one task object per line: the task now, then every change; `{"type": "heartbeat"}` '
            "lines in between; the stream closes after a terminal status",
        },
        **TASK_ERRORS,
    },
)
async def stream_task(task_id: TaskId, request: Request, svc: ServicesDep, key: Images) -> StreamingResponse:
    """NDJSON task updates. A status never goes back; the unchanged state is sent again every 20 s and a heartbeat
    line every 15 s, so the SDK neither times out nor gives up on a task that waits in a long queue."""
    base_url, ends = str(request.base_url), endings(request)
    await anyio.to_thread.run_sync(_job, svc, key, task_id)

    async def lines():
        highest, last, sent, beat = TaskStatus.UNKNOWN, None, 0.0, time.monotonic()
        with ends.watch(task_id) as waited:  # its end is the stream's last line: sent as it is heard (wait_for)
            while True:
                ended = waited.event
                task = await anyio.to_thread.run_sync(task_of, svc, key, task_id, base_url)
                highest = max(highest, TaskStatus(task["status"]))
                task["status"], task["status_text"] = int(highest), highest.name.lower()
                state = (task["status"], task["progress"], task["output"] is not None)
                now = time.monotonic()
                if state != last or now - sent >= REPEAT_EVERY:
                    last, sent, beat = state, now, now
                    yield json.dumps(task) + "\n"
                elif now - beat >= HEARTBEAT_EVERY:
                    beat = now
                    yield json.dumps({"type": "heartbeat"}) + "\n"
                if highest in inferencesh.TERMINAL:
                    return
                with anyio.move_on_after(0.25):
                    await ended.wait()

    return StreamingResponse(
        lines(), media_type="application/x-ndjson", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


@router.post("/files", responses={200: {"model": FilesEnvelope}, **ERRORS, **shapes.responses(shapes.INFERENCESH, 500)})
def create_files(body: FilesRequest, request: Request, svc: ServicesDep, key: Images) -> dict:
    """Upload tickets: PUT each file's bytes to its `upload_url` (no Authorization), then send its `uri` as an
    app's `image`."""
    data = []
    for file in body.files:
        ticket = uploads.new_ticket(svc, request, key.key_id, file.filename, file.content_type, file.size)
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        data.append(
            {
                "id": ticket.upload_id,
                "uri": ticket.file_url,
                "upload_url": ticket.put_url,
                "filename": ticket.filename,
                "content_type": ticket.content_type,
                "size": file.size,
                "created_at": at,
                "updated_at": at,
            }
        )
    return {"data": data}
