"""What the routes depend on: the shared services and the API-key check (FastAPI dependencies).

The routers and the application import this module; it imports neither, so the routers can be imported
by the application at its top.
"""

from __future__ import annotations

from typing import Annotated

import anyio
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from jobs.api import auth, keyring, tenancy
from jobs.api.service import ApiError, Endings
from jobs.models import ApiKeyRecord
from jobs.services import Services

bearer = HTTPBearer(auto_error=False, description="an API key from `dreambatch keys create`")


def services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(services)]


def endings(request: Request) -> Endings:
    """Where a synchronous route's wait_for hears its job end (the app's one listener)."""
    return request.app.state.endings


def require(scope: str):
    """A dependency: the caller's API key, which must hold `scope`."""

    async def check(
        request: Request, cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
    ) -> ApiKeyRecord:
        if cred is None or cred.scheme.lower() != "bearer":
            raise ApiError(
                401,
                "missing API key: send Authorization: Bearer <key>",
                type_="authentication_error",
                code="missing_api_key",
            )
        key_id = auth.key_id_of(cred.credentials)
        svc: Services = request.app.state.services
        record = await anyio.to_thread.run_sync(keyring.find, svc, key_id) if key_id else None
        if record is None or not auth.matches(record, cred.credentials):
            raise ApiError(401, "invalid or revoked API key", type_="authentication_error", code="invalid_api_key")
        if scope not in record.scopes and tenancy.ADMIN not in record.scopes:
            raise ApiError(
                403, f"this API key lacks the {scope!r} scope", type_="permission_error", code="insufficient_scope"
            )
        await anyio.to_thread.run_sync(tenancy.limit_rate, svc, record)
        return record

    return check
