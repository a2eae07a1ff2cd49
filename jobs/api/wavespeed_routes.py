"""WaveSpeedAI's protocol at the API root (the `wavespeed` SDK appends `/api/v3/…` to `base_url`), so
`Client(api_key=KEY, base_url="https://HOST:PORT")` runs its documented examples unchanged:

    POST /api/v3/{owner}/{model}                 submit (`wavespeed-ai/hidream-e1-full`, …) → the prediction
    GET  /api/v3/predictions/{id}/result         the prediction: `status`, `outputs` once completed, …
    POST /api/v3/media/uploads                   {filename, size, content_type} → {upload: {method, url, headers},
                                                 download_url}: the SDK PUTs the bytes, then sends download_url

Submit and result answer exactly HTTP 200 with `{"code": 200, "message": "success", "data": {…}}` (the SDK raises
on any other status); errors are `{"code", "message"}` with that HTTP status. `enable_base64_output` answers
outputs as data URIs; `enable_sync_mode` waits for the prediction (within the server's wait, then answers it still
`processing`, "Sync mode timed out", as the SDK expects). A `?webhook=URL` query parameter receives the prediction
once it ends. WaveSpeed's defaults for its models (jpeg) apply to these requests only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Body, Depends, Header, Query, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field

from jobs.api import retries, shapes, tenancy, uploads
from jobs.api.deps import ServicesDep, endings, require
from jobs.api.service import (
    ApiError,
    Services,
    StillRunning,
    Upload,
    fingerprint,
    image_b64,
    image_url,
    submit_rows,
    wait_for,
)
from jobs.models import MODELS, ApiKeyRecord, JobRecord, JobSpec, OutputImage
from jobs.vendors import wavespeed

router = APIRouter(tags=["wavespeed"])
Images = Annotated[ApiKeyRecord, Depends(require("images"))]
Segment = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
PredictionId = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", description="a prediction id")]
ERRORS = shapes.responses(shapes.WAVESPEED, 400, *shapes.COMMON, 413)
SUBMITS = shapes.responses(shapes.WAVESPEED, 409, 500, 502)  # an Idempotency-Key in use, no output, base64 read
MAX_INPUT_KEYS = 64


class Prediction(BaseModel):
    id: str
    model: str
    outputs: list[str | None] = Field(
        ..., description="URLs (data URIs with enable_base64_output); empty until completed"
    )
    urls: dict[str, str]
    has_nsfw_contents: list[bool] = Field(..., description="one per output when a safety checker ran, else []")
    safety_checker: str
    status: str = Field(..., description="created, processing, completed or failed")
    created_at: str
    error: str
    timings: dict[str, int]


class PredictionEnvelope(BaseModel):
    code: int
    message: str
    data: Prediction


class UploadRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    filename: str = Field(..., min_length=1, max_length=255)
    size: int | None = Field(None, ge=0)
    content_type: str | None = Field(None, max_length=100)


class UploadInstruction(BaseModel):
    method: str
    url: str
    headers: dict[str, str]


class UploadTicket(BaseModel):
    upload: UploadInstruction
    download_url: str


class UploadEnvelope(BaseModel):
    code: int
    message: str
    data: UploadTicket


def _job(svc: Services, key: ApiKeyRecord, prediction_id: str) -> JobRecord:
    job = svc.store.get_job(prediction_id)
    if job is None or job.webhook_format != "wavespeed" or not tenancy.sees(key, job):
        raise ApiError(404, f"no prediction {prediction_id!r}", code="not_found")
    return job


def _result_url(svc: Services, request: Request, prediction_id: str) -> str:
    base = (svc.settings.api.public_url or str(request.base_url)).rstrip("/")
    return f"{base}/api/v3/predictions/{prediction_id}/result"


def prediction_of(svc: Services, request: Request, job: JobRecord, error: str | None = None) -> dict[str, Any]:
    item = next(svc.store.items(job.job_id), None)
    base_url = str(request.base_url)
    url_for: Callable[[OutputImage], str | None]
    if job.api.get("base64"):

        def url_for(image: OutputImage) -> str | None:
            return f"data:{image.content_type};base64,{image_b64(svc, job, image)}"
    else:

        def url_for(image: OutputImage) -> str | None:
            return image_url(svc, job, image, base_url)

    return wavespeed.prediction(job, item, url_for, _result_url(svc, request, job.job_id), error)


# registered before the model route: POST /api/v3/media/uploads is not a model
@router.post(
    "/api/v3/media/uploads",
    responses={200: {"model": UploadEnvelope}, **ERRORS, **shapes.responses(shapes.WAVESPEED, 500)},
)
def media_upload(body: UploadRequest, request: Request, svc: ServicesDep, key: Images) -> dict:
    """An upload ticket: PUT the bytes to `upload.url` with `upload.headers`, then send `download_url` as an
    input's `image`."""
    ticket = uploads.new_ticket(svc, request, key.key_id, body.filename, body.content_type, body.size)
    return wavespeed.envelope(
        {
            "upload": {"method": "PUT", "url": ticket.put_url, "headers": {"Content-Type": ticket.content_type}},
            "download_url": ticket.file_url,
        }
    )


@router.post(
    "/api/v3/{owner}/{model}",
    responses={
        200: {"model": PredictionEnvelope},
        **ERRORS,
        **SUBMITS,
        **shapes.responses(shapes.WAVESPEED, 404, _404="no such model"),
    },
)
async def submit(
    owner: Segment,
    model: Segment,
    request: Request,
    svc: ServicesDep,
    key: Images,
    body: Annotated[
        dict[str, Any],
        Body(description="the model's input, as its page lists it", examples=[{"prompt": "a lighthouse", "seed": -1}]),
    ],
    webhook: Annotated[str | None, Query(max_length=2048, description="POSTed once the prediction ends")] = None,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)] = None,
) -> dict:
    """Submit a prediction (HTTP 200, `data.status` created). With `enable_sync_mode` the answer waits for it."""
    ours = wavespeed.model_of(owner, model)
    if ours is None:
        raise ApiError(
            404,
            f"no model {owner}/{model}; try wavespeed-ai/hidream-{', wavespeed-ai/hidream-'.join(MODELS)}",
            code="model_not_found",
        )
    if len(body) > MAX_INPUT_KEYS:
        raise ApiError(422, f"input: at most {MAX_INPUT_KEYS} fields")
    row = wavespeed.row(body, MODELS[ours].kind)
    base = (svc.settings.api.public_url or str(request.base_url)).rstrip("/")
    api = {"model_id": f"{owner}/{model}", "base64": body.get("enable_base64_output") is True, "base_url": base}

    def create() -> str:
        upload = Upload()
        try:
            uploads.resolve(svc, request, row, ("image", "image_url"), upload)
            options = JobSpec(model=ours, webhook=webhook, webhook_format="wavespeed", api=api)
            return submit_rows(svc, [row], tenancy.own(svc, key, options), upload, status=400)
        finally:
            upload.close()

    attempt = retries.Attempt.of(request)
    job_id, _ = await retries.once(
        svc, key.key_id, idempotency_key, fingerprint("wavespeed", ours, body, webhook), create, attempt
    )
    job = await anyio.to_thread.run_sync(svc.job, job_id)
    error = None
    if body.get("enable_sync_mode") is True:
        try:
            job = await wait_for(
                svc,
                job_id,
                retries.wait_budget(svc.settings.api.wait_timeout, attempt),
                request=request,
                endings=endings(request),
            )
        except StillRunning as still:
            job = still.job
            error = (
                f"Sync mode timed out after {svc.settings.api.wait_timeout:g}s; the prediction keeps running: "
                f"query the result later at {_result_url(svc, request, job_id)}"
            )
    data = await anyio.to_thread.run_sync(prediction_of, svc, request, job, error)
    return wavespeed.envelope(data)


@router.get(
    "/api/v3/predictions/{prediction_id}/result",
    responses={
        200: {"model": PredictionEnvelope},
        **shapes.responses(shapes.WAVESPEED, 404, 502, *shapes.COMMON, _404="no such prediction"),
    },
)
def result(prediction_id: PredictionId, request: Request, svc: ServicesDep, key: Images) -> dict:
    """The prediction now (HTTP 200 whatever its status; `outputs` once it is completed)."""
    return wavespeed.envelope(prediction_of(svc, request, _job(svc, key, prediction_id)))
