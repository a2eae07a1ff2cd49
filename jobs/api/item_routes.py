"""/v1/jobs/{job_id}/items/{item_id}/…: one item of a manifest job — cancel it, retry it, and its images.

The images are served with the caller's API key (the review page fetches them with its Authorization header),
so a browser never sees an `s3://` link nor a bucket's credentials:

    GET …/input        the row's input image: a staged upload, an s3:// object or a URL (fetched under the
                       address guard, jobs.netguard, as a worker fetches it)
    GET …/output/{n}   its n-th output image (from 0)
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.responses import Response

from jobs import control, inputs
from jobs.api import shapes, tenancy
from jobs.api.deps import ServicesDep
from jobs.api.jobs_routes import ERRORS, ONE_JOB, JobId, Reader, Writer
from jobs.api.service import ApiError, Services
from jobs.errors import InputError, JobNotFound
from jobs.formats import CONTENT_TYPES, sniff
from jobs.models import ApiKeyRecord, ItemRecord, JobRecord

router = APIRouter(tags=["jobs"])
ItemId = Annotated[str, PathParam(min_length=1, max_length=256, description="an item id (the row's id or line)")]
IMAGE = {
    200: {"content": {t: {} for t in CONTENT_TYPES.values()}},
    **ERRORS,
    **shapes.responses(shapes.OPENAI, 404, 422, 502, _404="no such job, item or image"),
}
ONE_ITEM = {
    200: {"description": "the item, as its results line (id, line, status, error, reason, attempts, …)"},
    **ERRORS,
    **ONE_JOB,
    **shapes.responses(shapes.OPENAI, 409),
}


def _item(svc: Services, key: ApiKeyRecord, job_id: str, item_id: str) -> tuple[JobRecord, ItemRecord]:
    """The job and item when `key` may see them (another tenant's: 404, as for none)."""
    job = tenancy.job_for(svc, key, job_id)
    item = svc.store.get_item(job_id, item_id)
    if item is None:
        raise JobNotFound(f"job {job_id} has no item {item_id!r}")
    return job, item


@router.post("/v1/jobs/{job_id}/items/{item_id}/cancel", responses=ONE_ITEM)
def cancel_item(job_id: JobId, item_id: ItemId, svc: ServicesDep, key: Writer) -> dict:
    """A queued item ends `cancelled` at once (its webhook sent), a running one at its next denoising step (it
    answers `running` then); the rest of the job runs on. Cancelling a cancelled item changes nothing; one that
    ended otherwise is a 409."""
    _item(svc, key, job_id, item_id)
    return control.cancel_item(svc, job_id, item_id).result_line()


@router.post("/v1/jobs/{job_id}/items/{item_id}/retry", responses=ONE_ITEM)
def retry_item(job_id: JobId, item_id: ItemId, svc: ServicesDep, key: Writer) -> dict:
    """Re-queue one failed item in a new round of its job (same id and line, attempts counted), as
    `POST /v1/jobs/{job_id}/retry` does for all of them; a 409 when it is not a failed item that ran."""
    _item(svc, key, job_id, item_id)
    return control.retry_item(svc, job_id, item_id).result_line()


def _read(svc: Services, job: JobRecord, ref: str) -> bytes | None:
    """The bytes behind an image reference of `job`, read as a worker reads them (jobs.inputs.fetch: an s3://
    object, a URL under the address guard, or a file inside the job's own local output folder); None when
    they are not there (or may not be read)."""
    try:
        return inputs.fetch(ref, job, svc.settings, svc.objects)
    except InputError:
        return None


def _image(data: bytes | None, what: str) -> Response:
    if data is None:
        raise ApiError(404, f"{what}: not found in storage", code="not_found")
    fmt = sniff(data)
    if fmt is None:
        raise ApiError(502, f"{what}: not a PNG, JPEG or WebP image", type_="server_error", code="not_an_image")
    return Response(data, media_type=CONTENT_TYPES[fmt], headers={"Cache-Control": "private, max-age=300"})


@router.get("/v1/jobs/{job_id}/items/{item_id}/input", response_class=Response, responses=IMAGE)
def item_input(job_id: JobId, item_id: ItemId, svc: ServicesDep, key: Reader) -> Response:
    """The item's input image (an edit row's `image`); 404 for a generation row, which has none."""
    job, item = _item(svc, key, job_id, item_id)
    ref = item.params.get("image")
    if not ref:
        raise ApiError(404, f"item {item_id} has no input image (a generation row or a rejected one)")
    return _image(_read(svc, job, str(ref)), f"item {item_id} input")


@router.get("/v1/jobs/{job_id}/items/{item_id}/output/{n}", response_class=Response, responses=IMAGE)
def item_output(
    job_id: JobId, item_id: ItemId, n: Annotated[int, PathParam(ge=0, le=1000)], svc: ServicesDep, key: Reader
) -> Response:
    """The item's n-th output image (from 0), once it has one."""
    job, item = _item(svc, key, job_id, item_id)
    images = item.output.images if item.output else []
    if n >= len(images) or not images[n].s3_uri:
        raise ApiError(404, f"item {item_id} has no output {n} (it has {len(images)})")
    return _image(_read(svc, job, images[n].s3_uri or ""), f"item {item_id} output {n}")
