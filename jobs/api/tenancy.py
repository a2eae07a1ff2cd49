"""Tenants: whose jobs a key makes, sees and acts on, where they write, and how fast it may ask.

A job belongs to the tenant of the API key that made it (`JobRecord.tenant`; a key's tenant is its `--tenant`,
else its name). Every route that names a job, item, request, task or prediction answers 404 to a key of another
tenant, exactly as for a job that does not exist, and lists show only the caller's jobs. A key with the `admin`
scope sees and acts on every tenant's jobs (and the operator's, made by the CLI, which belong to no tenant); the
CLI on the box sees everything. A key's `prefix` puts its jobs under that prefix of the output location; its
`rate` caps its requests a minute (then 429 with Retry-After).
"""

from __future__ import annotations

import math
import time

from jobs.api.service import ApiError
from jobs.errors import JobNotFound
from jobs.models import ApiKeyRecord, JobRecord, JobSpec
from jobs.services import Services
from jobs.storage import location_under

ADMIN = "admin"


def sees(key: ApiKeyRecord, job: JobRecord) -> bool:
    """Whether `key` may read and act on `job`."""
    return ADMIN in key.scopes or (job.tenant is not None and job.tenant == key.owner)


def job_for(svc: Services, key: ApiKeyRecord, job_id: str) -> JobRecord:
    """The job's live record when `key` may see it; JobNotFound (a 404) when there is none or it is another's."""
    job = svc.job(job_id)
    if not sees(key, job):
        raise JobNotFound(f"no job {job_id!r}")
    return job


def jobs_of(svc: Services, key: ApiKeyRecord, limit: int) -> list[JobRecord]:
    """The `limit` most recent jobs `key` may see, newest first (its tenant's index; every job for `admin`)."""
    tenant = None if ADMIN in key.scopes else key.owner
    return [j for j in svc.store.get_jobs(svc.store.job_ids(limit, tenant=tenant)) if sees(key, j)]


def own(svc: Services, key: ApiKeyRecord, spec: JobSpec) -> JobSpec:
    """The spec as `key` makes it: its tenant's job, written under its prefix of the output location."""
    output = location_under(svc.output(spec.output), key.prefix)
    return spec.model_copy(update={"tenant": key.owner, "output": output})


def limit_rate(svc: Services, key: ApiKeyRecord, now: float | None = None) -> None:
    """Count one request of `key`; over its `rate` this minute, a 429 whose Retry-After is the minute's end."""
    if not key.rate:
        return
    now = time.time() if now is None else now
    window = int(now // 60)
    if svc.store.count_request(key.key_id, window) > key.rate:
        wait = max(1, math.ceil((window + 1) * 60 - now))
        raise ApiError(
            429,
            f"rate limit: this API key may make {key.rate} requests a minute; retry in {wait}s",
            type_="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(wait)},
        )
