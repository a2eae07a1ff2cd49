"""API keys: bearer tokens that are stored only as a hash, each with its own scopes.

A token is `dbk_<key_id>_<secret>`: the key id finds the stored record, the 256-bit random secret
makes the token unguessable, so one SHA-256 of the whole token is a safe digest (no salt or slow
hash needed for a high-entropy secret). The digest is compared in constant time. The token is shown
once, when it is created; an operator mints the first one with `dreambatch keys create`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (imported where a key is minted: `dreambatch --help` names the scopes without pydantic)
    from jobs.models import ApiKeyRecord

SCOPES = {
    "jobs:read": "list jobs, read status, items, results and events",
    "jobs:write": "submit manifest jobs, cancel and retry them",
    "images": "the OpenAI-compatible /v1/images and the fal, inference.sh and WaveSpeed routes (with uploads)",
    "metrics": "read /metrics",
    "admin": "every scope, over every tenant's jobs (and the operator's)",
}
PREFIX = "dbk"
PREFIX_TEXT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}(?:/[A-Za-z0-9][A-Za-z0-9._-]{0,63}){0,7}$")
TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
TOKEN = re.compile(r"^dbk_(?P<key_id>[0-9a-f]{12})_(?P<secret>[A-Za-z0-9_-]{43})$")


@dataclass(frozen=True)
class NewKey:
    record: ApiKeyRecord
    token: str  # shown once; only its digest is stored


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def mint(
    name: str,
    scopes: list[str],
    at: str,
    *,
    tenant: str | None = None,
    prefix: str | None = None,
    rate: int | None = None,
) -> NewKey:
    """A new key. `tenant`: whose jobs it makes and sees (default: `name`); `prefix`: where under the output
    location its jobs write; `rate`: at most that many requests a minute. A ValueError names the bad field."""
    from jobs.models import ApiKeyRecord

    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise ValueError(f"--scope: must be among {', '.join(SCOPES)} (got {', '.join(unknown) or 'none'})")
    if not name.strip():
        raise ValueError("--name: give who or what uses the key (got nothing)")
    if tenant is not None and not TENANT.match(tenant):
        raise ValueError(f"--tenant: 1..64 letters, digits, '.', '_' or '-' (got {tenant!r})")
    if prefix is not None and not PREFIX_TEXT.match(prefix.strip("/")):
        raise ValueError(f"--prefix: segments of letters, digits, '.', '_' or '-', such as acme/out (got {prefix!r})")
    if rate is not None and not 1 <= rate <= 1_000_000:
        raise ValueError(f"--rate: requests a minute, 1..1000000 (got {rate})")
    key_id = secrets.token_hex(6)
    token = f"{PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
    record = ApiKeyRecord(
        key_id=key_id,
        name=name,
        token_sha256=digest(token),
        scopes=sorted(set(scopes)),
        created_at=at,
        tenant=tenant or name,
        prefix=prefix.strip("/") if prefix else None,
        rate=rate,
    )
    return NewKey(record, token)


def key_id_of(token: str) -> str | None:
    match = TOKEN.match(token)
    return match["key_id"] if match else None


def matches(record: ApiKeyRecord | None, token: str) -> bool:
    """True when `token` is the live key `record` was minted for (constant-time on the digest)."""
    if record is None or record.revoked_at is not None:
        return False
    return hmac.compare_digest(record.token_sha256, digest(token))
