"""Where API keys are kept: durably in the API's output location (jobs.records: `_keys/{key_id}.json`, the
token's SHA-256 and never the token), with Redis as the cache. A key Redis has lost (FLUSHALL, a new Redis) is
read back from its record on first use and cached again, so clients keep working through a Redis loss.

Without an output location (DREAMBATCH_OUTPUT unset) keys live in Redis alone, as before.
"""

from __future__ import annotations

from jobs import records
from jobs.models import ApiKeyRecord
from jobs.services import Services
from jobs.storage import ObjectStore


def durable(svc: Services) -> ObjectStore | None:
    """The object store keys and idempotency records are kept in: the API's output location, when it has one."""
    return svc.objects(svc.settings.output) if svc.settings.output else None


def save(svc: Services, record: ApiKeyRecord) -> bool:
    """Store a key (a new one, or a revocation): its durable record first, then the cache. False when it could
    only go to Redis (no output location)."""
    objects = durable(svc)
    if objects is not None:
        records.write_api_key(objects, record)
    svc.store.put_api_key(record)
    return objects is not None


def find(svc: Services, key_id: str) -> ApiKeyRecord | None:
    """The key `key_id`: from Redis, else from its durable record (cached in Redis again)."""
    record = svc.store.get_api_key(key_id)
    if record is None and (objects := durable(svc)) is not None:
        record = records.read_api_key(objects, key_id)
        if record is not None:
            svc.store.put_api_key(record)
    return record


def every(svc: Services) -> list[ApiKeyRecord]:
    """Every key, oldest first: the durable records, and any that only Redis holds."""
    objects = durable(svc)
    found = {r.key_id: r for r in svc.store.api_keys()}
    if objects is not None:
        found.update({r.key_id: r for r in records.read_api_keys(objects)})
    return sorted(found.values(), key=lambda r: r.created_at)
