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
from jobs.api import fal_routes, jobs_routes, openai_routes
from jobs.api.deps import ServicesDep, require
from jobs.api.service import ApiError
from jobs.errors import ConfigError, DreambatchError, InputError, JobNotFound, JobStateError, TransientError
from jobs.models import ApiKeyRecord
from jobs.services import Services
from jobs.settings import Settings

log = logging.getLogger("dreambatch.api")


def _error(exc: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), exc.status, headers=headers)


def _validation_lines(exc: RequestValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"] if p not in ("body", "query", "path", "header", "form"))
        got = "" if err.get("type") == "missing" or "input" not in err else f" (got {err['input']!r:.80})"
        lines.append(f"{where or 'body'}: {err['msg'].lower()}{got}")
    return lines


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(title="dreambatch", version="1", max_body_size=settings.api.max_upload_bytes + 2**20,
                  description="Batch HiDream image jobs; OpenAI-compatible images and a fal-style queue. "
                              "See docs/api.md.")
    app.state.services = Services(settings)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        lines = _validation_lines(exc)
        return _error(ApiError(422, "; ".join(lines), errors=lines))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None))

    @app.exception_handler(DreambatchError)
    async def dreambatch_error(request: Request, exc: DreambatchError):
        if isinstance(exc, InputError):
            return _error(ApiError(422, str(exc), errors=list(getattr(exc, "issues", None) or [str(exc)])))
        if isinstance(exc, JobNotFound):
            return _error(ApiError(404, str(exc), code="not_found"))
        if isinstance(exc, JobStateError):
            return _error(ApiError(409, str(exc), code="job_state"))
        if isinstance(exc, TransientError):
            return _error(ApiError(503, str(exc), type_="server_error", code="unavailable"))
        if isinstance(exc, ConfigError):
            log.error("configuration: %s", exc)
            return _error(ApiError(500, str(exc), type_="server_error", code="misconfigured"))
        raise exc

    @app.get("/healthz", include_in_schema=False)
    def healthz(svc: ServicesDep) -> dict:
        """Unauthenticated liveness: the API answers and reaches Redis."""
        return {"ok": svc.store.ping()}

    @app.get("/metrics", tags=["operations"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
    def metrics(svc: ServicesDep, _key: Annotated[ApiKeyRecord, Depends(require("metrics"))]) -> Response:
        """Prometheus metrics of the control plane (jobs.metrics: items by status, queue depth per model and
        priority, live workers). Each worker serves its own (`--metrics-port`)."""
        body, content_type = job_metrics.render(svc.store)
        return Response(body, media_type=content_type)

    app.include_router(jobs_routes.router)
    app.include_router(openai_routes.router)
    app.include_router(fal_routes.router)
    return app


def serve(settings: Settings, host: str, port: int) -> None:
    import uvicorn

    app = create_app(settings)
    live = [k for k in app.state.services.store.api_keys() if k.revoked_at is None]
    if not live:
        log.warning("no API keys yet: every request will get 401; create one with "
                    "`dreambatch keys create --name NAME --scope jobs:read --scope jobs:write --scope images`")
    uvicorn.run(app, host=host, port=port, log_level="info", proxy_headers=False)
