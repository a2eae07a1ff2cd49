"""The FastAPI application: auth, one error shape, a body-size limit, health, metrics, routers.

Every route needs a bearer API key with the route's scope (jobs.api.deps): none or an unknown key
is a 401, a key without the scope a 403. Errors are `{"error": {"message", "type", "code", "param"}}`
(OpenAI's shape, so OpenAI clients raise readable exceptions); validation errors add `errors`, one
line per problem, in the CLI's `line N: field: message (got value)` form.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from jobs import metrics as job_metrics
from jobs.api import fal_routes, inferencesh_routes, jobs_routes, openai_routes, shapes, uploads, wavespeed_routes
from jobs.api.deps import ServicesDep, require
from jobs.api.service import ApiError, Services
from jobs.errors import ConfigError, DreambatchError, InputError, JobNotFound, JobStateError, TransientError
from jobs.models import ApiKeyRecord
from jobs.settings import Settings

log = logging.getLogger("dreambatch.api")


def _error(request: Request, exc: ApiError) -> JSONResponse:
    return shapes.render(request.url.path, exc)  # in the shape of the client the path belongs to


def _validation_lines(exc: RequestValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"] if p not in ("body", "query", "path", "header", "form"))
        got = "" if err.get("type") == "missing" or "input" not in err else f" (got {err['input']!r:.80})"
        lines.append(f"{where or 'body'}: {err['msg'].lower()}{got}")
    return lines


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(title="dreambatch", version="1", max_body_size=settings.api.max_upload_bytes + 2**20,
                  description="Batch HiDream image jobs; the OpenAI, fal, inference.sh and WaveSpeed protocols "
                              "their SDKs speak. See docs/api.md.")
    app.state.services = Services.from_settings(settings)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _error(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        lines = _validation_lines(exc)
        return _error(request, ApiError(422, "; ".join(lines), errors=lines))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(request, ApiError(exc.status_code, str(exc.detail),
                                        code="not_found" if exc.status_code == 404 else None))

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

    @app.get("/healthz", include_in_schema=False)
    def healthz(svc: ServicesDep) -> dict:
        """Unauthenticated liveness: the API answers and reaches Redis."""
        return {"ok": svc.store.ping()}

    @app.get("/metrics", tags=["operations"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"},
                        **shapes.responses(shapes.OPENAI, *shapes.AUTH, 503)})
    def metrics(svc: ServicesDep, _key: Annotated[ApiKeyRecord, Depends(require("metrics"))]) -> Response:
        """Prometheus metrics of the control plane (jobs.metrics: items by status, queue depth per model and
        priority, live workers). Each worker serves its own (`--metrics-port`)."""
        body, content_type = job_metrics.render(svc.settings, svc.store)
        return Response(body, media_type=content_type)

    app.include_router(jobs_routes.router)
    app.include_router(openai_routes.router)
    app.include_router(inferencesh_routes.router)  # /apps, /tasks, /files at the root, as the SDK appends them
    app.include_router(wavespeed_routes.router)  # /api/v3/…
    app.include_router(uploads.router)  # /uploads/…: the signed PUT and GET of the two above's files
    app.include_router(fal_routes.router)  # /{fal-ai|dreambatch}/{name}… and /run/…, after every fixed path
    app.include_router(fal_routes.router, prefix="/queue", include_in_schema=False)  # the paths before fal's root
    return app


def serve(settings: Settings, host: str, port: int, ssl_certfile: str | None = None,
          ssl_keyfile: str | None = None) -> None:
    """Serve the API; over HTTPS when given a certificate and its key (or DREAMBATCH_API__SSL_CERTFILE/_KEYFILE):
    fal-client only speaks https."""
    import uvicorn

    certfile = ssl_certfile or settings.api.ssl_certfile
    keyfile = ssl_keyfile or settings.api.ssl_keyfile
    if bool(certfile) != bool(keyfile):
        raise ConfigError("TLS needs both a certificate and its key (--ssl-certfile and --ssl-keyfile)")
    app = create_app(settings)
    live = [k for k in app.state.services.store.api_keys() if k.revoked_at is None]
    if not live:
        log.warning("no API keys yet: every request will get 401; create one with "
                    "`dreambatch keys create --name NAME --scope jobs:read --scope jobs:write --scope images`")
    uvicorn.run(app, host=host, port=port, log_level="info", proxy_headers=False, ssl_certfile=certfile,
                ssl_keyfile=keyfile)
