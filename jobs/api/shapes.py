"""Errors in each client's own shape, and the OpenAPI declaration of every status code a route answers.

One ApiError (jobs.api.service) is rendered by the dialect of the path it answered:

    /api/v3/…                          WaveSpeed   {"code": 404, "message": "…", "data": null}, HTTP status = code
    /apps/…, /tasks/…, /files          inference.sh RFC 9457 problem+json {"type", "title", "status", "detail"}
    /fal-ai/…, /dreambatch/…, /run/…   fal         {"detail": "…", "error_type": "…"} (fal-client reads both)
    everything else                    OpenAI      {"error": {"message", "type", "code", "param", "errors"?}}

`responses(dialect, 401, 403, …)` declares those codes with that dialect's body for a route's OpenAPI entry.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from jobs.api import schemas
from jobs.api.service import ApiError

OPENAI, INFERENCESH, WAVESPEED, FAL = "openai", "inferencesh", "wavespeed", "fal"
PREFIXES = (
    (WAVESPEED, ("/api/v3/",)),
    (INFERENCESH, ("/apps/", "/tasks/", "/files")),
    (FAL, ("/fal-ai/", "/dreambatch/", "/run/", "/queue/")),
)
DESCRIPTIONS = {
    400: "the request cannot be run as sent (its message says why)",
    401: "no API key, or an unknown or revoked one",
    403: "the API key lacks this route's scope, or a signed link is invalid or expired",
    404: "no such job, request, task, prediction, file or model (or one of another tenant's)",
    409: "the job's state does not allow this, or the same Idempotency-Key is still being processed",
    413: "the body or an uploaded file is over the size limit",
    415: "unsupported content type",
    429: "the API key's rate limit (`dreambatch keys create --rate`) is spent; retry after `Retry-After` seconds",
    422: "invalid parameters; `errors` (or `detail`) lists every problem",
    500: "the model failed on this request, or the server is misconfigured",
    502: "an output is missing from storage",
    503: "Redis, the broker or storage is unreachable for now; retry later",
    504: "the job did not end within the server's wait; it keeps running (the message says where to look)",
}
MEDIA = {INFERENCESH: "application/problem+json"}
MODELS: dict[str, type[BaseModel]] = {
    OPENAI: schemas.Error,
    INFERENCESH: schemas.Problem,
    WAVESPEED: schemas.WaveSpeedError,
    FAL: schemas.FalError,
}


def dialect_of(path: str) -> str:
    for dialect, prefixes in PREFIXES:
        if path.startswith(prefixes):
            return dialect
    return OPENAI


def body(dialect: str, exc: ApiError) -> dict[str, Any]:
    if dialect == WAVESPEED:
        return {"code": exc.status, "message": exc.message, "data": None}
    if dialect == INFERENCESH:
        out: dict[str, Any] = {
            "type": "about:blank",
            "title": _phrase(exc.status),
            "status": exc.status,
            "detail": exc.message,
            "code": exc.code,
        }
        if exc.errors is not None:
            out["errors"] = exc.errors
        return out
    if dialect == FAL:
        return {"detail": exc.message, "error_type": exc.code or exc.type}
    return exc.body()


def render(path: str, exc: ApiError) -> JSONResponse:
    dialect = dialect_of(path)
    headers = dict(exc.headers)
    if exc.status == 401:
        headers.setdefault("WWW-Authenticate", "Key" if dialect == FAL else "Bearer")
    return JSONResponse(
        body(dialect, exc), exc.status, headers=headers or None, media_type=MEDIA.get(dialect, "application/json")
    )


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def responses(dialect: str, *codes: int, **described: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error codes, each with the dialect's error body (`described`: `_404="…"`
    overrides a description)."""
    schema = MODELS[dialect].model_json_schema(ref_template="#/components/schemas/{model}")
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        description = described.get(f"_{code}", DESCRIPTIONS.get(code, _phrase(code)))
        if dialect in MEDIA:
            out[code] = {"description": description, "content": {MEDIA[dialect]: {"schema": schema}}}
        else:
            out[code] = {"model": MODELS[dialect], "description": description}
    return out


AUTH = (401, 403, 429)  # every route behind an API key (429: its rate limit)
COMMON = (*AUTH, 422, 503)  # ... that validates its input and reads Redis
