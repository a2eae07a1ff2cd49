"""OpenAI-compatible images, as Lumenfall serves HiDream: `POST /v1/images/generations` (JSON) and
`POST /v1/images/edits` (multipart `image`, `prompt`, `n`, `size`, `response_format`, `output_format`,
`output_compression`). Each request becomes a job of `n` items on the same queues as manifest jobs
(one image per item, so `n` images render in parallel on as many workers), and the request waits for
it (`DREAMBATCH_API__WAIT_TIMEOUT`, ended before the SDK's `X-Stainless-Read-Timeout`). Parameters it does
not name (`steps`, `guidance_scale`, fal's `num_inference_steps`, …) pass through to the row, as Lumenfall
passes them to the provider.

A `size` WxH comes back exactly that size: generations render at the nearest size HiDream supports (~1 MP, the
same aspect) and are resized; edits are fitted to the model's canvas and brought back to it (worker.geometry).

The SDK's retries never make a second job (jobs.api.retries): attempt 0 makes the job, attempts 1 and 2
(`X-Stainless-Retry-Count`) attach to it. A wait that ends first is a 504 with `x-should-retry: true`, so
the SDK retries into the same job and waits again; its last attempt raises with the job id in the message.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Depends, Header, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jobs import formats
from jobs.api import retries, schemas, shapes, tenancy
from jobs.api.deps import ServicesDep, endings, require
from jobs.api.service import (
    ApiError,
    Services,
    Upload,
    fingerprint,
    image_b64,
    image_url,
    submit_rows,
    wait_for,
)
from jobs.errors import ErrorKind
from jobs.lifecycle import ItemStatus
from jobs.models import MAX_SEED, MODELS, ApiKeyRecord, JobRecord, JobSpec
from jobs.vendors import common

router = APIRouter(tags=["openai images"])
Images = Annotated[Any, Depends(require("images"))]
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)]
MODEL_NAMES = {**{m: m for m in MODELS}, **{f"hidream-{m}": m for m in MODELS}}  # hidream-e1-1 → e1-1
DEFAULT_MODEL = {"generate": "i1-fast", "edit": "e1-1"}
RESERVED = {"id", "num_images", "image", "image[]", "mask", "stream", "model", "n", "size", "response_format", "seed"}
SIZE = re.compile(r"^(?:(?P<w>\d{2,5})x(?P<h>\d{2,5})|(?P<a>\d{1,3}):(?P<b>\d{1,3})|auto)$")


def model_for(name: str | None, kind: str) -> str:
    model = MODEL_NAMES.get(name or DEFAULT_MODEL[kind])
    if model is None:
        raise ApiError(
            404,
            f"model {name!r} does not exist; choose one of {', '.join(MODEL_NAMES)}",
            code="model_not_found",
            param="model",
        )
    if MODELS[model].kind != kind:
        other = "/v1/images/edits" if kind == "generate" else "/v1/images/generations"
        raise ApiError(
            400,
            f"model {name!r} does not {'generate' if kind == 'generate' else 'edit'} images; "
            f"use {other} or another model",
            code="model_not_supported",
            param="model",
        )
    return model


def size_fields(size: str | None, kind: str) -> dict[str, Any]:
    """OpenAI's `size` as row fields: WxH, or W:H (an aspect ratio, as Lumenfall accepts), or auto."""
    match = SIZE.match(size or "auto")
    if match is None:
        raise ApiError(400, f"size: expected WxH, W:H or auto (got {size!r})", param="size")
    if match["w"]:
        w, h = int(match["w"]), int(match["h"])
        return {"width": w, "height": h, "exact_size": True} if kind == "generate" else {"size": f"{w}x{h}"}
    if match["a"]:
        a, b = int(match["a"]), int(match["b"])
        if kind == "edit":
            return {"aspect_ratio": f"{a}:{b}"}
        if not (a and b):
            raise ApiError(400, f"size: aspect ratio sides must be positive (got {size!r})", param="size")
        return {
            "width": max(64, min(4096, round(1024 * (a / b) ** 0.5))),
            "height": max(64, min(4096, round(1024 * (b / a) ** 0.5))),
        }
    return {}


def item_rows(row: dict[str, Any], n: int, seed: int | None) -> list[dict[str, Any]]:
    """n rows of one image each; a fixed seed gives seed, seed+1, … so the n images differ."""
    if seed is None or seed < 0:
        return [dict(row) for _ in range(n)]
    return [{**row, "seed": (seed + k) % (MAX_SEED + 1)} for k in range(n)]


def _passthrough(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k not in RESERVED and v is not None}


RETRY_INTO_THE_SAME_JOB = {"x-should-retry": "true", "retry-after": "1"}


async def run_images(
    svc: Services,
    key: ApiKeyRecord,
    idempotency_key: str | None,
    model: str,
    rows: list[dict],
    upload: Upload,
    body: str,
    request: Request,
    response_format: str,
) -> dict[str, Any]:
    """Submit the rows as one job (or attach to the job this request's first attempt made), wait for it within
    the client's read timeout, answer in OpenAI's shape."""
    attempt = retries.Attempt.of(request)
    try:
        job_id, _ = await retries.once(
            svc,
            key.key_id,
            idempotency_key,
            body,
            lambda: submit_rows(svc, rows, tenancy.own(svc, key, JobSpec(model=model)), upload, status=400),
            attempt,
        )
    finally:
        upload.close()
    wait = retries.wait_budget(svc.settings.api.wait_timeout, attempt)
    job = await wait_for(
        svc,
        job_id,
        wait,
        request=request,
        endings=endings(request),
        headers=RETRY_INTO_THE_SAME_JOB,
        where=f"GET /v1/jobs/{job_id}; a retry of this request waits for the same job",
    )
    return await anyio.to_thread.run_sync(images_response, svc, job, str(request.base_url), response_format)


def images_response(svc: Services, job: JobRecord, base_url: str, response_format: str) -> dict[str, Any]:
    items = list(svc.store.items(job.job_id))
    failed = [i for i in items if i.status != ItemStatus.COMPLETED]
    if failed:
        item = failed[0]
        error = item.error or f"the request was {item.status}"
        client_fault = item.error_kind == ErrorKind.INPUT or item.status == ItemStatus.CANCELLED
        # the job has ended: a retry would attach to it and fail the same way
        raise ApiError(
            400 if client_fault else 500,
            error,
            type_="invalid_request_error" if client_fault else "server_error",
            code=item.status.value
            if item.status == ItemStatus.CANCELLED
            else (str(item.error_kind) if item.error_kind else None),
            headers={"x-should-retry": "false"},
        )
    data, prompt = [], None
    for item in items:
        prompt = item.params.get("prompt") or item.params.get("instruction")
        for image in item.output.images if item.output else []:
            entry = (
                {"b64_json": image_b64(svc, job, image)}
                if response_format == "b64_json"
                else {"url": image_url(svc, job, image, base_url)}
            )
            data.append({**entry, "revised_prompt": prompt})
    first = items[0].output.images[0] if items and items[0].output and items[0].output.images else None
    flags = [common.nsfw(i) for i in items]
    return {
        "created": int(time.time()),
        "data": data,
        "output_format": items[0].params.get("output_format") if items else None,
        "size": f"{first.width}x{first.height}" if first else None,
        "id": job.job_id,
        "has_nsfw_concepts": None if any(f is None for f in flags) else [b for f in flags for b in f or ()],
        "safety_checker": common.safety(items[0]) if items else common.NOT_RUN,
    }


IMAGE_ERRORS = shapes.responses(
    shapes.OPENAI,
    400,
    *shapes.COMMON,
    404,
    409,
    413,
    500,
    502,
    504,
    _400="bad request, a model that does not do this, or an item that failed on its input or was cancelled",
    _404="no such model",
    _504="the job did not end within the wait (the client's read "
    "timeout, or DREAMBATCH_API__WAIT_TIMEOUT); retrying this request waits for the "
    "same job (`x-should-retry: true`)",
)


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    prompt: str = Field(..., min_length=1, max_length=4000)
    model: str | None = Field(None, max_length=64, description="hidream-i1-fast (default), -dev, -full")
    n: int = Field(1, ge=1, le=10)
    size: str | None = Field(None, max_length=16, description="WxH, W:H or auto")
    response_format: Literal["url", "b64_json"] | None = "url"
    output_format: str | None = Field(None, max_length=8, description="png, jpeg or webp")
    output_compression: int | None = Field(None, ge=0, le=100)
    seed: int | None = Field(None, ge=-1, le=MAX_SEED)
    negative_prompt: str | None = Field(None, max_length=4000)


@router.post("/v1/images/generations", responses={200: {"model": schemas.ImagesResponse}, **IMAGE_ERRORS})
async def generations(
    body: GenerationRequest, request: Request, svc: ServicesDep, key: Images, idempotency_key: IdempotencyKey = None
) -> dict:
    """Text to image (HiDream-I1). Waits for the images; `url` links are presigned S3 URLs (or signed
    links to this server when outputs are in a local folder)."""
    model = model_for(body.model, "generate")
    values = body.model_dump(exclude_none=True)
    row = {**_passthrough(values), **size_fields(body.size, "generate")}
    rows = item_rows(row, body.n, body.seed)
    return await run_images(
        svc,
        key,
        idempotency_key,
        model,
        rows,
        Upload(),
        fingerprint("generations", values),
        request,
        body.response_format or "url",
    )


def _image_suffix(data: bytes) -> str | None:
    fmt = formats.sniff(data)
    return f".{formats.EXTENSIONS[fmt]}" if fmt else None


class EditFields(BaseModel):
    """The edit form's fields besides the file (which comes as `image`, or `image[]` as the SDK sends a list)."""

    model_config = ConfigDict(extra="allow")
    prompt: str = Field(..., min_length=1, max_length=8000, description="the instruction (or an E1 prompt)")
    model: str | None = Field(None, max_length=64, description="hidream-e1-1 (default) or hidream-e1-full")
    n: int = Field(1, ge=1, le=10)
    size: str | None = Field(None, max_length=16, description="WxH (returned exactly), W:H, or auto (the input's)")
    response_format: Literal["url", "b64_json"] = "url"
    output_format: str | None = Field(None, max_length=8, description="png, jpeg or webp")
    output_compression: int | None = Field(None, ge=0, le=100)
    seed: int | None = Field(None, ge=-1, le=MAX_SEED)
    negative_prompt: str | None = Field(None, max_length=4000)


class EditUpload(EditFields):
    image: bytes = Field(..., json_schema_extra={"format": "binary"}, description="one PNG, JPEG or WebP file")


EDIT_BODY = {
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": EditUpload.model_json_schema()}}}
}


@router.post(
    "/v1/images/edits",
    openapi_extra=EDIT_BODY,
    responses={200: {"model": schemas.ImagesResponse}, **IMAGE_ERRORS, **shapes.responses(shapes.OPENAI, 413, 415)},
)
async def edits(request: Request, svc: ServicesDep, key: Images, idempotency_key: IdempotencyKey = None) -> dict:
    """Edit one image (HiDream-E1) by an instruction. Waits for the result."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise ApiError(
            415,
            f"send multipart/form-data with an image file (got {kind or 'no content type'!r})",
            code="unsupported_media_type",
        )
    form = await request.form(max_files=4, max_fields=200)
    extras = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    try:
        fields = EditFields.model_validate({k: v for k, v in extras.items() if k in EditFields.model_fields})
    except ValidationError as exc:
        lines = [f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg'].lower()}" for e in exc.errors()]
        raise ApiError(422, "; ".join(lines), errors=lines) from None
    edit_model = model_for(fields.model, "edit")
    files = [f for f in (*form.getlist("image"), *form.getlist("image[]")) if not isinstance(f, str)]
    if form.get("mask") is not None:
        raise ApiError(400, "mask: not supported; HiDream-E1 edits the image by instruction", param="mask")
    if len(files) != 1:
        raise ApiError(400, f"image: send exactly one image file (got {len(files)})", param="image")
    limit = svc.settings.api.max_upload_bytes
    data = await files[0].read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, f"image: over the {limit}-byte limit", code="too_large", param="image")
    suffix = _image_suffix(data)
    if suffix is None:
        raise ApiError(400, "image: not a PNG, JPEG or WebP file", param="image")
    values = {
        **extras,
        "prompt": fields.prompt,
        "output_format": fields.output_format,
        "output_compression": fields.output_compression,
        "negative_prompt": fields.negative_prompt,
    }
    row = {**_passthrough(values), "image": f"image{suffix}", **size_fields(fields.size, "edit")}
    rows = item_rows(row, fields.n, fields.seed)
    upload = Upload()  # closed by run_images
    (upload.inputs / f"image{suffix}").write_bytes(data)
    return await run_images(
        svc,
        key,
        idempotency_key,
        edit_model,
        rows,
        upload,
        fingerprint("edits", extras, data, fields.model, fields.n, fields.size, fields.response_format, fields.seed),
        request,
        fields.response_format,
    )
