"""The FastAPI application: auth, one error shape, a body-size limit, health, metrics, routers.

While Redis is away the API keeps running: requests wait out DREAMBATCH_REDIS_RETRY_S, then get a 503 that says
so; `/healthz` answers at once with whether Redis and the output location can be reached.

Every route needs a bearer API key with the route's scope (jobs.api.deps): none or an unknown key
is a 401, a key without the scope a 403. Errors are `{"error": {"message", "type", "code", "param"}}`
(OpenAI's shape, so OpenAI clients raise readable exceptions); validation errors add `errors`, one
line per problem, in the CLI's `line N: field: message (got value)` form.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from jobs import metrics as job_metrics
from jobs.api import (
    fal_routes,
    inferencesh_routes,
    item_routes,
    jobs_routes,
    keyring,
    openai_routes,
    shapes,
    ui,
    uploads,
    wavespeed_routes,
)
from jobs.api.deps import ServicesDep, require
from jobs.api.service import ApiError, Endings
from jobs.errors import ConfigError, DreambatchError, InputError, JobNotFound, JobStateError, TransientError
from jobs.models import ApiKeyRecord
from jobs.services import Services
from jobs.settings import Settings
from jobs.storage import check_location
from jobs.store import listen_for_endings, redis_errors, say_if_unreachable
from jobs.store import problem as redis_problem
from jobs.store import unreachable as unreachable_redis

log = logging.getLogger("dreambatch.api")


def _error(request: Request, exc: ApiError) -> JSONResponse:
    return shapes.render(request.url.path, exc)  # in the shape of the client the path belongs to


def _validation_lines(exc: RequestValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"] if p not in ("body", "query", "path", "header", "form"))
        got = "" if err.get("type") == "missing" or "input" not in err else f" (got {err['input']!r:.80})"
        msg = err["msg"][:1].lower() + err["msg"][1:]  # "Field required" → "field required"; patterns keep their case
        lines.append(f"{where or 'body'}: {msg}{got}")
    return lines


def create_app(settings: Settings) -> FastAPI:
    endings = Endings()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        """One listener for the whole process hears jobs end, so a synchronous route answers as its job ends."""
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(listen_for_endings, settings.redis_url, endings.ended, log)
            yield
            tasks.cancel_scope.cancel()

    app = FastAPI(
        lifespan=lifespan,
        title="dreambatch",
        version="1",
        max_body_size=settings.api.max_upload_bytes + 2**20,
        description="Batch HiDream image jobs; the OpenAI, fal, inference.sh and WaveSpeed protocols "
        "their SDKs speak. See docs/api.md.",
    )
    app.state.services = Services(settings)
    app.state.endings = endings

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _error(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        lines = _validation_lines(exc)
        return _error(request, ApiError(422, "; ".join(lines), errors=lines))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(
            request, ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        )

    @app.exception_handler(DreambatchError)
    async def dreambatch_error(request: Request, exc: DreambatchError):
        if isinstance(exc, InputError):
            return _error(request, ApiError(422, str(exc), errors=list(getattr(exc, "issues", None) or [str(exc)])))
        if isinstance(exc, JobNotFound):
            return _error(request, ApiError(404, str(exc), code="not_found"))
        if isinstance(exc, JobStateError):
            return _error(request, ApiError(409, str(exc), code="job_state"))
        if isinstance(exc, TransientError):
            return _error(request, ApiError(503, str(exc), type_="server_error", code="unavailable"))
        if isinstance(exc, ConfigError):
            log.error("configuration: %s", exc)
            return _error(request, ApiError(500, str(exc), type_="server_error", code="misconfigured"))
        raise exc

    async def unreachable(request: Request, exc: Exception):
        """Redis went away mid-request, past the client's retries (DREAMBATCH_REDIS_RETRY_S): a 503 saying so."""
        found = unreachable_redis(settings.redis_url, exc)
        log.warning("%s", found)
        return _error(request, ApiError(503, str(found), type_="server_error", code="unavailable"))

    for error_class in redis_errors():
        app.add_exception_handler(error_class, unreachable)

    @app.get("/healthz", include_in_schema=False)
    def healthz(svc: ServicesDep) -> JSONResponse:
        """Unauthenticated: whether the API reaches Redis and its output location (S3: the bucket, with the
        credentials it has), each with the error when not; 200 when both do, else 503. Answers in seconds."""
        redis_found = redis_problem(svc.settings.redis_url, timeout=2.0)
        output, s3_error = svc.settings.output, None
        try:
            if not output:
                raise ConfigError("DREAMBATCH_OUTPUT is not set: the API has nowhere to write (s3://bucket/prefix)")
            check_location(output, svc.settings)
        except DreambatchError as exc:
            s3_error = str(exc)
        body = {
            "ok": redis_found is None and s3_error is None,
            "redis": {"ok": redis_found is None, "error": None if redis_found is None else str(redis_found)},
            "s3": {
                "ok": s3_error is None,
                "location": output,
                "error": s3_error,
                "used": bool(output and output.startswith("s3://")),
            },
        }
        return JSONResponse(body, 200 if body["ok"] else 503)

    @app.get(
        "/metrics",
        tags=["operations"],
        response_class=Response,
        responses={
            200: {"content": {"text/plain": {}}, "description": "Prometheus text format"},
            **shapes.responses(shapes.OPENAI, *shapes.AUTH, 503),
        },
    )
    def metrics(svc: ServicesDep, _key: Annotated[ApiKeyRecord, Depends(require("metrics"))]) -> Response:
        """Prometheus metrics of the control plane (jobs.metrics: items by status, queue depth per model and
        priority, live workers). Each worker serves its own (`--metrics-port`)."""
        body, content_type = job_metrics.render(svc.store)
        return Response(body, media_type=content_type)

    app.include_router(jobs_routes.router)
    app.include_router(item_routes.router)  # /v1/jobs/{id}/items/{item}/…: cancel, retry, its images
    app.include_router(ui.router)  # /ui/: the review page
    app.include_router(openai_routes.router)
    app.include_router(inferencesh_routes.router)  # /apps, /tasks, /files at the root, as the SDK appends them
    app.include_router(wavespeed_routes.router)  # /api/v3/…
    app.include_router(uploads.router)  # /uploads/…: the signed PUT and GET of the two above's files
    app.include_router(fal_routes.router)  # /{fal-ai|dreambatch}/{name}… and /run/…, after every fixed path
    app.include_router(fal_routes.router, prefix="/queue", include_in_schema=False)  # the paths before fal's root
    return app


def serve(
    settings: Settings, host: str, port: int, ssl_certfile: str | None = None, ssl_keyfile: str | None = None
) -> None:
    """Serve the API; over HTTPS when given a certificate and its key (or DREAMBATCH_API__SSL_CERTFILE/_KEYFILE):
    fal-client only speaks https."""
    import uvicorn

    certfile = ssl_certfile or settings.api.ssl_certfile
    keyfile = ssl_keyfile or settings.api.ssl_keyfile
    if bool(certfile) != bool(keyfile):
        raise ConfigError("TLS needs both a certificate and its key (--ssl-certfile and --ssl-keyfile)")
    app = create_app(settings)
    if not say_if_unreachable(
        settings.redis_url, log, "The API", " (requests get a 503 and /healthz says so meanwhile)"
    ):
        pass  # the key check below would wait out the outage
    elif not [k for k in keyring.every(app.state.services) if k.revoked_at is None]:
        log.warning(
            "no API keys yet: every request will get 401; create one with "
            "`dreambatch keys create --tenant NAME --scope jobs:read --scope jobs:write --scope images`"
        )
    uvicorn.run(
        app, host=host, port=port, log_level="info", proxy_headers=False, ssl_certfile=certfile, ssl_keyfile=keyfile
    )
