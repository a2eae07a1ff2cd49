"""`dreambatch keys create|list|revoke`: API keys for `dreambatch api`, managed on the server side
(they go straight to Redis; there is no HTTP endpoint that mints keys)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from jobs.api import auth
from jobs.services import get_services
from jobs.store import RedisStore
from jobs.submit import now_iso


def _store() -> RedisStore:
    return get_services().store


def create(
    name: Annotated[str, typer.Option(help="who or what uses the key")],
    scope: Annotated[list[str], typer.Option("--scope", help=f"repeat; one of: {', '.join(auth.SCOPES)}")],
    json_: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Mint a key; prints the token once (only its SHA-256 is stored)."""
    try:
        new = auth.mint(name, scope, now_iso())
    except ValueError as exc:
        typer.echo(f"error: --scope: {exc}", err=True)
        raise typer.Exit(2) from None
    _store().put_api_key(new.record)
    if json_:
        typer.echo(json.dumps({"key_id": new.record.key_id, "token": new.token, "scopes": new.record.scopes}))
    else:
        typer.echo(new.token)
        typer.echo(
            f"key {new.record.key_id} ({name}): {', '.join(new.record.scopes)}; "
            "store the token now, it is not shown again",
            err=True,
        )


def list_keys(json_: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every key: id, name, scopes, created, revoked (never the token)."""
    records = _store().api_keys()
    if json_:
        typer.echo(json.dumps([r.model_dump(exclude={"token_sha256"}) for r in records]))
        return
    for r in records:
        state = f"revoked {r.revoked_at}" if r.revoked_at else "active"
        typer.echo(f"{r.key_id}  {r.name}  {','.join(r.scopes)}  created {r.created_at}  {state}")


def revoke(key_id: str) -> None:
    """Revoke a key by its id; requests with it get 401 from then on."""
    store = _store()
    record = store.get_api_key(key_id)
    if record is None:
        typer.echo(f"error: no key {key_id!r}", err=True)
        raise typer.Exit(1)
    if record.revoked_at is None:
        store.put_api_key(record.model_copy(update={"revoked_at": now_iso()}))
    typer.echo(f"revoked {key_id}")
