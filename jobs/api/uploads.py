"""Vendor file uploads: a ticket names a signed URL the client PUTs its bytes to without credentials, and the
file's own URL, which the client then sends as a request's image.

    POST /files (inference.sh), POST /api/v3/media/uploads (WaveSpeed)   → a ticket (their routers)
    PUT  /uploads/{id}?expires=…&signature=…                              the bytes (no API key: the signature is it)
    GET  /uploads/{id}/{filename}                                         the file (the 128-bit id is the secret)

The bytes go to the API's output location (`_uploads/{id}/{filename}`). When a request names one of these URLs
as its image, `resolve` reads the stored object back (it is never fetched over HTTP through the address guard),
and it is staged next to the job like any other input. Upload records live a day.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlsplit

import anyio
from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import Response

from jobs import formats, keys
from jobs.api import shapes
from jobs.api.deps import ServicesDep
from jobs.api.service import ApiError, Services, Upload
from jobs.submit import now_iso

router = APIRouter(tags=["uploads"])
UPLOAD_TTL = 24 * 3600
UploadId = Annotated[str, PathParam(pattern=r"^[0-9a-f]{32}$", description="an upload id")]
OUR_PATH = re.compile(r"^/uploads/(?P<id>[0-9a-f]{32})(?:/[^/]*)?$")
SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
# content type → the suffix an upload of it is saved with (jobs.formats, the one table)
IMAGE_TYPES = {kind: f".{formats.EXTENSIONS[name]}" for kind, name in formats.BY_CONTENT_TYPE.items()}


@dataclass(frozen=True)
class Ticket:
    upload_id: str
    filename: str
    content_type: str
    put_url: str  # PUT the bytes here, no credentials
    file_url: str  # the file, as a request's image
    expires: int


def _base(svc: Services, request: Request) -> str:
    return (svc.settings.api.public_url or str(request.base_url)).rstrip("/")


def _sign(svc: Services, upload_id: str, expires: int) -> str:
    return hmac.new(svc.url_secret, f"PUT\n{upload_id}\n{expires}".encode(), hashlib.sha256).hexdigest()


def filename_of(name: str | None, content_type: str | None) -> str:
    stem = SAFE_NAME.sub("_", (name or "").rsplit("/", 1)[-1]).strip("._")[:100]
    return stem or f"upload{IMAGE_TYPES.get((content_type or '').lower(), '.bin')}"


def new_ticket(
    svc: Services, request: Request, key_id: str, filename: str | None, content_type: str | None, size: int | None
) -> Ticket:
    """A place for one file of at most the upload limit (`size`, when the client says it, is checked now)."""
    limit = svc.settings.api.max_upload_bytes
    if size is not None and size > limit:
        raise ApiError(413, f"size: {size} bytes is over the {limit}-byte upload limit", code="too_large", param="size")
    upload_id = secrets.token_hex(16)
    name = filename_of(filename, content_type)
    kind = (content_type or "application/octet-stream")[:100]
    expires = int(time.time()) + svc.settings.api.url_expires
    svc.store.put_upload(
        upload_id,
        {
            "filename": name,
            "content_type": kind,
            "size": size,
            "key_id": key_id,
            "output": svc.output(),
            "done": False,
            "created_at": now_iso(),
        },
        UPLOAD_TTL,
    )
    base = _base(svc, request)
    return Ticket(
        upload_id,
        name,
        kind,
        f"{base}/uploads/{upload_id}?expires={expires}&signature={_sign(svc, upload_id, expires)}",
        f"{base}/uploads/{upload_id}/{name}",
        expires,
    )


def _object_key(record: dict[str, Any], upload_id: str) -> str:
    return keys.S3_UPLOAD.format(prefix="", upload_id=upload_id, filename=record["filename"])


@router.put(
    "/uploads/{upload_id}",
    status_code=200,
    responses={200: {"description": "stored"}, **shapes.responses(shapes.OPENAI, 403, 404, 413, 422, 503)},
)
async def put_upload(
    upload_id: UploadId,
    request: Request,
    svc: ServicesDep,
    expires: Annotated[int, Query(ge=0, le=2**40)],
    signature: Annotated[str, Query(max_length=64)],
) -> dict:
    """The bytes of an upload, by the signed URL its ticket gave (no API key: the signature is the key)."""
    good = hmac.compare_digest(_sign(svc, upload_id, expires).encode(), signature.encode())
    if not good or expires < time.time():
        raise ApiError(403, "invalid or expired upload link", type_="permission_error", code="invalid_signature")
    record = await anyio.to_thread.run_sync(svc.store.get_upload, upload_id)
    if record is None:
        raise ApiError(404, "no such upload (upload tickets live a day)", code="not_found")
    limit = svc.settings.api.max_upload_bytes
    data = bytearray()
    async for chunk in request.stream():
        data.extend(chunk)
        if len(data) > limit:
            raise ApiError(413, f"upload: over the {limit}-byte limit", code="too_large")
    kind = request.headers.get("content-type") or record["content_type"]
    record.update(done=True, size=len(data), content_type=kind.split(";")[0].strip()[:100] or record["content_type"])

    def store() -> None:
        svc.objects(record["output"]).put(_object_key(record, upload_id), bytes(data), record["content_type"])
        svc.store.put_upload(upload_id, record, UPLOAD_TTL)

    await anyio.to_thread.run_sync(store)
    return {"id": upload_id, "size": len(data)}


@router.get(
    "/uploads/{upload_id}/{filename}",
    response_class=Response,
    responses={
        200: {"content": {**{kind: {} for kind in formats.CONTENT_TYPES.values()}, "application/octet-stream": {}}},
        **shapes.responses(shapes.OPENAI, 404, 422, 503),
    },
)
def get_upload(upload_id: UploadId, filename: Annotated[str, PathParam(max_length=200)], svc: ServicesDep) -> Response:
    """An uploaded file (images as themselves, anything else as an attachment)."""
    record, data = read(svc, upload_id)
    if record is None or data is None or filename != record["filename"]:
        raise ApiError(404, "no such file", code="not_found")
    kind = record["content_type"]
    if kind.lower() in IMAGE_TYPES:
        return Response(data, media_type=kind, headers={"X-Content-Type-Options": "nosniff"})
    return Response(
        data,
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": f'attachment; filename="{record["filename"]}"',
            "X-Content-Type-Options": "nosniff",
        },
    )


def read(svc: Services, upload_id: str) -> tuple[dict[str, Any] | None, bytes | None]:
    record = svc.store.get_upload(upload_id)
    if record is None or not record.get("done"):
        return record, None
    return record, svc.objects(record["output"]).get(_object_key(record, upload_id), svc.settings.api.max_upload_bytes)


def upload_id_of(svc: Services, request: Request, ref: Any) -> str | None:
    """The upload a URL names when it is one of this server's upload URLs (this host, or the public URL's)."""
    if not isinstance(ref, str) or not ref.startswith(("http://", "https://")):
        return None
    parts = urlsplit(ref)
    match = OUR_PATH.match(parts.path)
    if match is None:
        return None
    ours = {urlsplit(str(request.base_url)).netloc, request.headers.get("host", "")}
    if svc.settings.api.public_url:
        ours.add(urlsplit(svc.settings.api.public_url).netloc)
    return match["id"] if parts.netloc in ours else None


def resolve(svc: Services, request: Request, row: dict[str, Any], fields: tuple[str, ...], upload: Upload) -> None:
    """Replace this server's upload URLs in `row[fields]` by the uploaded files, copied into the request's private
    folder (where its local image paths may point)."""
    for field in fields:
        upload_id = upload_id_of(svc, request, row.get(field))
        if upload_id is None:
            continue
        record, data = read(svc, upload_id)
        if record is None or data is None:
            raise ApiError(
                422,
                f"{field}: upload {upload_id} has no file (PUT it first, within a day)",
                param=field,
                errors=[f"{field}: upload {upload_id} has no file"],
            )
        suffix = IMAGE_TYPES.get(record["content_type"].lower()) or "." + record["filename"].rsplit(".", 1)[-1][:5]
        name = f"{field}-{upload_id}{suffix.lower()}"
        (upload.inputs / name).write_bytes(data)
        row[field] = name
