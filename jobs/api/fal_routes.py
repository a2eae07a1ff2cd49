"""fal's protocol (docs.fal.ai "Queue"; `fal-client` 1.0.3 is the spec) at the API root, so fal clients run
against this server with `FAL_QUEUE_RUN_HOST` (and `FAL_RUN_HOST`) pointed at it, over https:

    POST /{namespace}/{name}                         submit → request_id, status/response/cancel URLs
    GET  /{namespace}/{name}/requests/{id}/status    IN_QUEUE (queue_position) | IN_PROGRESS | COMPLETED; ?logs=true
    GET  /{namespace}/{name}/requests/{id}           the result (fal's output schema)
    PUT  /{namespace}/{name}/requests/{id}/cancel    202 CANCELLATION_REQUESTED | 400 ALREADY_COMPLETED
    POST /run/{namespace}/{name}                     fal.run: wait, answer the result (FAL_RUN_HOST=HOST:PORT/run)
    POST /run/{namespace}/{name}/stream              fal.stream: server-sent status events, then the result

`{namespace}/{name}` is fal's model id (`fal-ai/hidream-e1-full`, `fal-ai/hidream-i1-fast`, …) or
`dreambatch/<model>`. The key comes as fal's `Authorization: Key …` (a Bearer works too). The body is the model's
input in fal's field names (jobs.vendors.fal, jobs.dialects), with fal's defaults for the model under it (for
hidream-e1-full those of its fal page; manifests keep dreambatch's). `sync_mode: true` answers images as data URIs.
A webhook URL comes as `fal_webhook` (query), or `webhookUrl` (query or body); it receives one POST in fal's
envelope when the request ends. Each request is a one-item job (`num_images` images in it); request id = job id.
The same body re-POSTed by the same key within the retry window is the same request (jobs.api.retries): fal-client
retries a submit whose answer it did not get.

The old paths under `/queue/…` still answer (not in the OpenAPI document).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Body, Depends, Header, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials
from starlette.convertors import Convertor, register_url_convertor

from jobs import control, keys
from jobs.api import retries, schemas, shapes, tenancy, uploads
from jobs.api.deps import ServicesDep, endings, require
from jobs.api.service import (
    ApiError,
    Services,
    Upload,
    fingerprint,
    image_b64,
    image_url,
    not_found,
    submit_rows,
    wait_for,
)
from jobs.errors import InputError, JobStateError
from jobs.models import MODELS, ApiKeyRecord, JobRecord, JobSpec, OutputImage
from jobs.vendors import common, fal


class _Namespace(Convertor):
    """A path segment that is one of fal's namespaces here, so other two-segment paths never match these routes."""

    regex = "|".join(fal.NAMESPACES)

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("falns", _Namespace())
router = APIRouter(tags=["fal"])
key_header = APIKeyHeader(
    name="Authorization",
    auto_error=False,
    scheme_name="falKey",
    description="fal's `Key <api key>` (or `Bearer <api key>`)",
)
_images = require("images")


async def fal_key(request: Request, header: Annotated[str | None, Depends(key_header)]) -> ApiKeyRecord:
    """The API key from fal's `Authorization: Key …` (or Bearer), with the `images` scope."""
    scheme, _, token = (header or "").strip().partition(" ")
    given = scheme.lower() in ("key", "bearer") and token.strip()
    return await _images(
        request, HTTPAuthorizationCredentials(scheme="Bearer", credentials=token.strip()) if given else None
    )


Key = Annotated[ApiKeyRecord, Depends(fal_key)]
Namespace = Annotated[Literal["fal-ai", "dreambatch"], PathParam(description="fal-ai, or dreambatch")]
Name = Annotated[
    str,
    PathParam(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="hidream-e1-full, hidream-i1-fast, … (or e1-full under dreambatch)",
    ),
]
RequestId = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
SUBMIT = "/{namespace:falns}/{name}"
REQUEST = "/{namespace:falns}/{name}/requests/{request_id}"
MAX_INPUT_KEYS = 64
ERRORS = shapes.responses(shapes.FAL, *shapes.COMMON, 404, _404="no such model, or no such request for it")
SUBMITS = shapes.responses(shapes.FAL, 400, 409, 413, 500)  # a body not JSON, an Idempotency-Key in use, too big
WAITS = shapes.responses(shapes.FAL, 400, 500, 504)


def model_of(namespace: str, name: str) -> str:
    model = fal.model_of(namespace, name)
    if model is None:
        raise ApiError(
            404,
            f"no model {namespace}/{name}; try fal-ai/hidream-{', fal-ai/hidream-'.join(MODELS)}",
            code="model_not_found",
        )
    return model


def _urls(request: Request, svc: Services, namespace: str, name: str, request_id: str) -> dict[str, str]:
    base = (svc.settings.api.public_url or str(request.base_url)).rstrip("/")
    response = f"{base}/{namespace}/{name}/requests/{request_id}"
    return {"response_url": response, "status_url": f"{response}/status", "cancel_url": f"{response}/cancel"}


def _job(svc: Services, key: ApiKeyRecord, model: str, request_id: str) -> JobRecord:
    job = svc.store.get_job(request_id)
    if job is None or job.model != model or job.webhook_format != "fal" or not tenancy.sees(key, job):
        raise not_found(request_id)
    return job


async def _create(
    svc: Services,
    request: Request,
    key: ApiKeyRecord,
    namespace: str,
    name: str,
    body: dict[str, Any],
    webhook: str | None,
    idempotency_key: str | None,
) -> tuple[str, str]:
    """The request as a one-item job (or the job an earlier attempt of it made). Returns (model, request id)."""
    model = model_of(namespace, name)
    if len(body) > MAX_INPUT_KEYS:
        raise ApiError(422, f"input: at most {MAX_INPUT_KEYS} fields")
    in_body = body.get("webhookUrl")
    webhook = webhook or (in_body if isinstance(in_body, str) else None)
    try:
        row = fal.row(model, body)
    except InputError as exc:
        raise ApiError(422, str(exc), param="image_size", errors=[str(exc)]) from None
    api = {"model_id": f"{namespace}/{name}", "sync_mode": body.get("sync_mode") is True}

    def create() -> str:
        upload = Upload()
        try:
            uploads.resolve(svc, request, row, ("image_url", "image"), upload)
            spec = JobSpec(model=model, webhook=webhook, webhook_format="fal", api=api)
            return submit_rows(svc, [row], tenancy.own(svc, key, spec), upload)
        finally:
            upload.close()

    job_id, _ = await retries.once(
        svc, key.key_id, idempotency_key, fingerprint("fal", model, body, webhook), create, retries.Attempt.of(request)
    )
    return model, job_id


WebhookQuery = Annotated[str | None, Query(max_length=2048, description="fal's webhook parameter")]
WebhookUrlQuery = Annotated[str | None, Query(alias="webhookUrl", max_length=2048)]
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)]
Input = Annotated[
    dict[str, Any],
    Body(
        description="the model input, in fal's field names",
        examples=[{"prompt": "a lighthouse at dusk", "image_size": "landscape_4_3"}],
    ),
]


@router.post(SUBMIT, status_code=200, responses={200: {"model": schemas.FalSubmitted}, **ERRORS, **SUBMITS})
async def submit_request(
    namespace: Namespace,
    name: Name,
    request: Request,
    svc: ServicesDep,
    key: Key,
    body: Input,
    fal_webhook: WebhookQuery = None,
    webhook_url: WebhookUrlQuery = None,
    idempotency_key: IdempotencyKey = None,
) -> dict:
    """Queue one request; answers at once with its id, URLs and queue position."""
    model, job_id = await _create(svc, request, key, namespace, name, body, fal_webhook or webhook_url, idempotency_key)
    job = await anyio.to_thread.run_sync(svc.job, job_id)
    return {
        "request_id": job_id,
        "gateway_request_id": job_id,
        **_urls(request, svc, namespace, name, job_id),
        "queue_position": await anyio.to_thread.run_sync(_position, svc, job) if not job.finished_at else None,
    }


def _position(svc: Services, job: JobRecord) -> int:
    lists = keys.priority_lists(keys.gpu_queue(job.model))
    ahead = [name for prio, name in lists.items() if keys.PRIORITIES[prio] <= keys.PRIORITIES[job.priority]]
    return fal.position_in(sum(svc.store.list_lengths(ahead).values()))


def _flag(value: str | None) -> bool:
    """fal-client sends `logs=true|false` (httpx's bool); 1 and 0 work too."""
    if value is None:
        return False
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no", ""):
        return False
    raise ApiError(
        422,
        f"logs: expected true or false (got {value!r:.20})",
        param="logs",
        errors=[f"logs: expected true or false (got {value!r:.20})"],
    )


@router.get(REQUEST + "/status", responses={200: {"model": schemas.FalStatus}, **ERRORS})
def request_status(
    namespace: Namespace,
    name: Name,
    request_id: RequestId,
    request: Request,
    svc: ServicesDep,
    key: Key,
    logs: Annotated[str | None, Query(max_length=8, description="true or false")] = None,
) -> dict:
    """IN_QUEUE (with `queue_position`), IN_PROGRESS, or COMPLETED (also when it failed or was cancelled: `error`
    and `error_type` say so)."""
    with_logs = _flag(logs)
    job = _job(svc, key, model_of(namespace, name), request_id)
    item = next(svc.store.items(request_id), None)
    position = _position(svc, job) if job.status == "queued" and not job.finished_at else 0
    step = svc.store.step_of(request_id, item.item_id) if with_logs and item and item.status == "running" else None
    return {
        **fal.queue_status(job, item, position=position, logs=with_logs, step=step),
        "request_id": request_id,
        **_urls(request, svc, namespace, name, request_id),
    }


@router.get(
    REQUEST,
    responses={
        200: {"model": schemas.FalResult},
        **shapes.responses(
            shapes.FAL,
            400,
            422,
            502,
            _400="the request has not ended yet",
            _422="the request failed or was cancelled: `detail` says why",
        ),
        **ERRORS,
    },
)
async def request_result(
    namespace: Namespace, name: Name, request_id: RequestId, request: Request, svc: ServicesDep, key: Key
):
    """The output in fal's schema: `images` (`url`, `width`, `height`, `content_type`), `seed`, `prompt`,
    `has_nsfw_concepts` (null when no safety checker ran; `safety_checker` says which ran, or why none did)."""
    model = model_of(namespace, name)
    return await anyio.to_thread.run_sync(_result, svc, key, model, request_id, str(request.base_url))


def _result(svc: Services, key: ApiKeyRecord, model: str, request_id: str, base_url: str):
    job = _job(svc, key, model, request_id)
    item = next(svc.store.items(request_id), None)
    if not common.ended(job, item):
        return JSONResponse({"detail": "Request is still in progress", "status": "IN_PROGRESS"}, 400)
    if item is None or not common.completed(item):
        return JSONResponse({"detail": fal.error_detail(job, item), "error_type": common.error_kind(job, item)}, 422)
    return fal.output(item, _url_for(svc, job, base_url))


def _url_for(svc: Services, job: JobRecord, base_url: str):
    """Image links: a data URI with `sync_mode` (fal's meaning), else a presigned or signed URL."""
    if job.api.get("sync_mode"):

        def data_uri(image: OutputImage) -> str:
            return f"data:{image.content_type};base64,{image_b64(svc, job, image)}"

        return data_uri
    return lambda image: image_url(svc, job, image, base_url)


@router.put(
    REQUEST + "/cancel",
    status_code=202,
    responses={
        202: {
            "description": "CANCELLATION_REQUESTED",
            "content": {"application/json": {"example": {"status": "CANCELLATION_REQUESTED"}}},
        },
        400: {
            "description": "ALREADY_COMPLETED: the request has ended (or a cancel was already asked)",
            "content": {"application/json": {"example": {"status": "ALREADY_COMPLETED"}}},
        },
        **ERRORS,
    },
)
def cancel_request(namespace: Namespace, name: Name, request_id: RequestId, svc: ServicesDep, key: Key):
    """Cancel a request that has not finished: CANCELLATION_REQUESTED (202), or ALREADY_COMPLETED (400)."""
    job = _job(svc, key, model_of(namespace, name), request_id)
    if job.cancel_requested or common.ended(job, next(svc.store.items(request_id), None)):
        return JSONResponse({"status": "ALREADY_COMPLETED"}, 400)
    try:
        control.cancel_job(svc, request_id)
    except JobStateError:  # it ended in between
        return JSONResponse({"status": "ALREADY_COMPLETED"}, 400)
    return JSONResponse({"status": "CANCELLATION_REQUESTED"}, 202)


# --- fal.run and fal.stream (FAL_RUN_HOST=HOST:PORT/run) --------------------------------------------------
@router.post(
    "/run" + SUBMIT,
    responses={200: {"model": schemas.FalResult}, **ERRORS, **SUBMITS, **WAITS, **shapes.responses(shapes.FAL, 502)},
)
async def run(
    namespace: Namespace,
    name: Name,
    request: Request,
    svc: ServicesDep,
    key: Key,
    body: Input,
    idempotency_key: IdempotencyKey = None,
):
    """fal's synchronous run: the result once the request ends (within the server's wait: then 504, naming the
    request's status URL, where it can be fetched when it ends)."""
    model, job_id = await _create(svc, request, key, namespace, name, body, None, idempotency_key)
    urls = _urls(request, svc, namespace, name, job_id)
    wait = retries.wait_budget(svc.settings.api.wait_timeout, retries.Attempt.of(request))
    await wait_for(svc, job_id, wait, request=request, endings=endings(request), where=f"GET {urls['status_url']}")
    return await anyio.to_thread.run_sync(_result, svc, key, model, job_id, str(request.base_url))


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


@router.post(
    "/run" + SUBMIT + "/stream",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": 'status events (`status`, `progress`), then the result (or `{"error"}`) as the last',
        },
        **ERRORS,
        **SUBMITS,
    },
)
async def stream(
    namespace: Namespace,
    name: Name,
    request: Request,
    svc: ServicesDep,
    key: Key,
    body: Input,
    idempotency_key: IdempotencyKey = None,
) -> StreamingResponse:
    """fal's streaming run: a server-sent event whenever the request's status or progress changes (`status`,
    `request_id`, `progress` in percent), and its result (fal's output schema) as the last event."""
    model, job_id = await _create(svc, request, key, namespace, name, body, None, idempotency_key)
    wait = svc.settings.api.wait_timeout

    async def events():
        last, waited = None, 0.0
        while True:
            job: JobRecord = await anyio.to_thread.run_sync(svc.job, job_id)
            item = await anyio.to_thread.run_sync(lambda: next(svc.store.items(job_id), None))
            if common.ended(job, item):
                result = await anyio.to_thread.run_sync(_result, svc, key, model, job_id, str(request.base_url))
                yield _sse(
                    {"error": json.loads(bytes(result.body))["detail"]} if isinstance(result, JSONResponse) else result
                )
                return
            step = await anyio.to_thread.run_sync(svc.store.step_of, job_id, item.item_id) if item else None
            state = {
                "status": fal.queue_status(job, item, position=0, logs=False)["status"],
                "request_id": job_id,
                "progress": common.progress(step),
            }
            if state != last:
                last = state
                yield _sse(state)
            if waited >= wait:
                yield _sse({"error": f"request {job_id} has not ended after {wait:g}s; it keeps running"})
                return
            await anyio.sleep(0.25)
            waited += 0.25

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
