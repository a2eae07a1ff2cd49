"""fal's queue protocol (docs.fal.ai, "Queue"), so fal clients run against this server unchanged:

    POST /queue/{namespace}/{name}                         submit → request_id, status/response/cancel URLs
    GET  /queue/{namespace}/{name}/requests/{id}/status    IN_QUEUE | IN_PROGRESS | COMPLETED
    GET  /queue/{namespace}/{name}/requests/{id}           the result (fal's output schema)
    PUT  /queue/{namespace}/{name}/requests/{id}/cancel    CANCELLATION_REQUESTED | ALREADY_COMPLETED

`{namespace}/{name}` is fal's model id (`fal-ai/hidream-e1-full`, `fal-ai/hidream-i1-fast`, …) or
`dreambatch/<model>`. The body is the model's input in fal's field names (`image_url`,
`edit_instruction`, `num_inference_steps`, `image_size`, …; jobs.dialects and jobs.fal map them). A
webhook URL comes as fal's `fal_webhook` query parameter, or `webhookUrl` (query or body field, as the
fal clients name it); it receives one POST in fal's envelope when the request ends (jobs.fal).
Each request is a one-item job (`num_images` images in that item); request id = job id.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Body, Depends, Header, Path, Query, Request
from fastapi.responses import JSONResponse

from jobs import control, fal
from jobs.api import schemas
from jobs.api.deps import ServicesDep, require
from jobs.api.service import (
    ApiError,
    Services,
    Upload,
    fingerprint,
    idempotent,
    image_url,
    not_found,
    submit,
)
from jobs.errors import InputError
from jobs.lifecycle import ItemStatus, JobStatus
from jobs.models import MODELS, JobRecord, JobSpec
from jobs.submit import ManifestInvalid

router = APIRouter(prefix="/queue", tags=["fal queue"])
Images = Annotated[Any, Depends(require("images"))]
Segment = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
RequestId = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
FAL_STATUS = {JobStatus.QUEUED: "IN_QUEUE", JobStatus.RUNNING: "IN_PROGRESS"}
MAX_INPUT_KEYS = 64


def model_of(namespace: str, name: str) -> str:
    model = fal.model_of(namespace, name)
    if model is None:
        raise ApiError(404, f"no model {namespace}/{name}; try fal-ai/hidream-{', fal-ai/hidream-'.join(MODELS)}",
                       code="model_not_found")
    return model


def _urls(request: Request, svc: Services, namespace: str, name: str, request_id: str) -> dict[str, str]:
    base = (svc.settings.api.public_url or str(request.base_url)).rstrip("/")
    response = f"{base}/queue/{namespace}/{name}/requests/{request_id}"
    return {"response_url": response, "status_url": f"{response}/status", "cancel_url": f"{response}/cancel"}


def _job(svc: Services, model: str, request_id: str) -> JobRecord:
    job = svc.store.get_job(request_id)
    if job is None or job.model != model:
        raise not_found(request_id)
    return job


@router.post("/{namespace}/{name}", status_code=200, responses={200: {"model": schemas.FalSubmitted}})
async def submit_request(
    namespace: Segment, name: Segment, request: Request, svc: ServicesDep, key: Images,
    body: Annotated[dict[str, Any], Body(description="the model input, in fal's field names")],
    fal_webhook: Annotated[str | None, Query(max_length=2048, description="fal's webhook parameter")] = None,
    webhook_url: Annotated[str | None, Query(alias="webhookUrl", max_length=2048)] = None,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)] = None,
) -> dict:
    """Queue one request; answers at once with its id and URLs."""
    model = model_of(namespace, name)
    if len(body) > MAX_INPUT_KEYS:
        raise ApiError(422, f"input: at most {MAX_INPUT_KEYS} fields")
    row = dict(body)
    in_body = row.pop("webhookUrl", None)
    webhook = fal_webhook or webhook_url or (in_body if isinstance(in_body, str) else None)
    row.pop("id", None)
    try:
        row.update(fal.image_size(row.pop("image_size", None)))
    except InputError as exc:
        raise ApiError(422, str(exc), param="image_size", errors=[str(exc)]) from None

    def create() -> str:
        upload = Upload()
        try:
            options = JobSpec(model=model, webhook=webhook, webhook_format="fal")
            return submit(svc, upload.write_rows([row]), options, upload).job.job_id
        except ManifestInvalid as exc:
            errors = list(dict.fromkeys(re.sub(r"^line \d+: ", "", e) for e in exc.issues))
            raise ApiError(422, "; ".join(errors) or str(exc), errors=errors) from None
        finally:
            upload.close()

    job_id, _ = await idempotent(svc, key.key_id, idempotency_key, fingerprint("fal", model, row, webhook), create)
    return {"request_id": job_id, "gateway_request_id": job_id, **_urls(request, svc, namespace, name, job_id),
            "queue_position": None}


@router.get("/{namespace}/{name}/requests/{request_id}/status", responses={200: {"model": schemas.FalStatus}})
def request_status(namespace: Segment, name: Segment, request_id: RequestId, request: Request, svc: ServicesDep,
                   _key: Images, logs: Annotated[int, Query(ge=0, le=1)] = 0) -> dict:
    """IN_QUEUE, IN_PROGRESS, or COMPLETED (also when it failed or was cancelled: `error` says so)."""
    job = _job(svc, model_of(namespace, name), request_id)
    out = {"status": "COMPLETED" if job.finished_at else FAL_STATUS.get(job.status, "IN_PROGRESS"),
           "request_id": request_id, **_urls(request, svc, namespace, name, request_id), "logs": [] if logs else None}
    if job.finished_at and job.status != JobStatus.COMPLETED:
        out["error"] = fal.error_of(job, next(svc.store.items(request_id), None))
    return out


@router.get("/{namespace}/{name}/requests/{request_id}", responses={200: {"model": schemas.FalResult}})
async def request_result(namespace: Segment, name: Segment, request_id: RequestId, request: Request,
                         svc: ServicesDep, _key: Images):
    """The output in fal's schema: `images` (`url`, `width`, `height`, `content_type`), `seed`, `prompt`."""
    model = model_of(namespace, name)
    return await anyio.to_thread.run_sync(_result, svc, model, request_id, str(request.base_url))


def _result(svc: Services, model: str, request_id: str, base_url: str):
    job = _job(svc, model, request_id)
    if not job.finished_at:
        return JSONResponse({"detail": "Request is still in progress", "status": FAL_STATUS.get(job.status)}, 400)
    item = next(svc.store.items(request_id), None)
    if item is None or item.status != ItemStatus.COMPLETED:
        body = fal.webhook_body(job, item, lambda image: None)
        return JSONResponse({"detail": body["payload"]["detail"]}, 422)
    return fal.output(item, lambda image: image_url(svc, job, image, base_url))


@router.put("/{namespace}/{name}/requests/{request_id}/cancel", status_code=202)
def cancel_request(namespace: Segment, name: Segment, request_id: RequestId, svc: ServicesDep, _key: Images):
    """Cancel a request that has not finished: CANCELLATION_REQUESTED (202), or ALREADY_COMPLETED (400)."""
    job = _job(svc, model_of(namespace, name), request_id)
    if job.finished_at or job.cancel_requested:
        return JSONResponse({"status": "ALREADY_COMPLETED"}, 400)
    control.cancel_job(svc, request_id)
    return {"status": "CANCELLATION_REQUESTED"}
