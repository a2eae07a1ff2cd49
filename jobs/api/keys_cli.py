"""`dreambatch keys create|list|revoke`: API keys for `dreambatch api`, managed on the server side (there is no
HTTP endpoint that mints keys). A key is kept durably next to the outputs (DREAMBATCH_OUTPUT: `_keys/`), with
Redis as its cache (jobs.api.keyring), so keys survive a Redis loss."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

from jobs.api import auth

if TYPE_CHECKING:
    from jobs.services import Services


def _services() -> Services:
    from jobs.services import get_services

    return get_services()


def create(
    name: Annotated[str | None, typer.Option(help="who or what uses the key (default: its tenant)")] = None,
    scope: Annotated[
        list[str] | None, typer.Option("--scope", help=f"repeat; one of: {', '.join(auth.SCOPES)}")
    ] = None,
    tenant: Annotated[
        str | None, typer.Option(help="whose jobs the key makes and sees (default: its name); others' get 404")
    ] = None,
    prefix: Annotated[
        str | None, typer.Option(help="its jobs write under this prefix of the output location, e.g. acme")
    ] = None,
    rate: Annotated[int | None, typer.Option(help="at most this many requests a minute (then 429)")] = None,
    json_: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Mint a key; prints the token once (only its SHA-256 is stored)."""
    from jobs.api import keyring
    from jobs.submit import now_iso

    if not (name or tenant):
        typer.echo("error: --name or --tenant: say who uses the key, e.g. --tenant acme", err=True)
        raise typer.Exit(2)
    try:
        new = auth.mint(name or tenant or "", scope or [], now_iso(), tenant=tenant, prefix=prefix, rate=rate)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    record = new.record
    if not keyring.save(_services(), record):
        typer.echo(
            "warning: DREAMBATCH_OUTPUT is not set, so the key is kept in Redis only and a Redis loss loses it; "
            "set DREAMBATCH_OUTPUT as the API has it to keep keys durably",
            err=True,
        )
    if json_:
        typer.echo(
            json.dumps(
                {
                    "key_id": record.key_id,
                    "token": new.token,
                    "scopes": record.scopes,
                    "tenant": record.owner,
                    "prefix": record.prefix,
                    "rate": record.rate,
                }
            )
        )
    else:
        typer.echo(new.token)
        limits = "".join(
            [f", prefix {record.prefix}" if record.prefix else "", f", {record.rate}/min" if record.rate else ""]
        )
        typer.echo(
            f"key {record.key_id} ({record.name}, tenant {record.owner}{limits}): {', '.join(record.scopes)}; "
            "store the token now, it is not shown again",
            err=True,
        )


def list_keys(json_: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every key: id, name, tenant, scopes, prefix, rate, created, revoked (never the token)."""
    from jobs.api import keyring

    records = keyring.every(_services())
    if json_:
        typer.echo(json.dumps([{**r.model_dump(exclude={"token_sha256"}), "tenant": r.owner} for r in records]))
        return
    for r in records:
        state = f"revoked {r.revoked_at}" if r.revoked_at else "active"
        limits = f"  prefix {r.prefix}" * bool(r.prefix) + f"  {r.rate}/min" * bool(r.rate)
        typer.echo(
            f"{r.key_id}  {r.name}  tenant {r.owner}  {','.join(r.scopes)}{limits}  created {r.created_at}  {state}"
        )


def revoke(key_id: str) -> None:
    """Revoke a key by its id; requests with it get 401 from then on."""
    from jobs.api import keyring
    from jobs.submit import now_iso

    svc = _services()
    record = keyring.find(svc, key_id)
    if record is None:
        typer.echo(f"error: no key {key_id!r}; `dreambatch keys list` shows them", err=True)
        raise typer.Exit(1)
    if record.revoked_at is None:
        keyring.save(svc, record.model_copy(update={"revoked_at": now_iso()}))
    typer.echo(f"revoked {key_id}")
