"""A retried request attaches to the job its first attempt made; a long wait ends before the client gives up.

Clients retry POSTs on their own, and a retry that makes a second job renders the same images twice (one OpenAI
`images.edit` on a busy queue made three jobs: a 504 after the server's wait, then the SDK's two retries). So:

- An explicit `Idempotency-Key` wins: the same key and body are the same job (jobs.api.service.idempotent).
- The OpenAI SDK marks each attempt with `X-Stainless-Retry-Count`: attempt 0 always makes its own job and
  remembers it under a digest of the API key and the request; attempt 1, 2, … with the same digest attach to it.
- Clients that re-POST the same body unmarked (fal-client, and any other): the same key and body within
  `DREAMBATCH_API__RETRY_WINDOW` seconds (30) of the last such request attach to its job. Send a different body
  (a seed) or an `Idempotency-Key` per request to make identical requests on purpose.
- A waiting request (OpenAI images, fal's run, WaveSpeed's sync mode) ends before the client's read timeout
  (`X-Stainless-Read-Timeout`), so the client never times out into a retry that the server did not see coming.
  The OpenAI routes then answer 504 with `x-should-retry: true`: the SDK's retry attaches and waits again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import anyio
from fastapi import Request

from jobs.api.service import Services, idempotent

RETRY_COUNT = "x-stainless-retry-count"
READ_TIMEOUT = "x-stainless-read-timeout"
PENDING_WAIT = 30.0  # s a retry waits for its first attempt to finish making its job


@dataclass(frozen=True)
class Attempt:
    """What a request says about itself: the client's retry count (None: it does not count) and read timeout."""

    retry: int | None = None
    read_timeout: float | None = None

    @classmethod
    def of(cls, request: Request) -> Attempt:
        return cls(_number(request.headers.get(RETRY_COUNT), int), _number(request.headers.get(READ_TIMEOUT), float))


def _number(text: str | None, kind):
    try:
        value = kind(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and 0 <= value < 10**9 else None


def wait_budget(configured: float, attempt: Attempt) -> float:
    """Seconds a request may wait for its job: the configured wait, ending (by 5%, at least 1 s) before the
    client's own read timeout when it sent one."""
    if attempt.read_timeout:
        timeout = attempt.read_timeout
        return max(0.2, min(configured, timeout - max(1.0, 0.05 * timeout)))
    return configured


async def once(
    svc: Services,
    key_id: str,
    idempotency_key: str | None,
    fingerprint: str,
    create: Callable[[], str],
    attempt: Attempt,
) -> tuple[str, bool]:
    """Run `create()` (sync, returns a job id) unless this request is a retry of one that already made a job.
    Returns (job_id, attached)."""
    if idempotency_key is not None:
        return await idempotent(svc, key_id, idempotency_key, fingerprint, create)
    window = svc.settings.api.retry_window
    digest = hashlib.sha256(f"{key_id}\n{fingerprint}".encode()).hexdigest()
    if attempt.retry == 0:  # a first attempt: its own job, remembered for the retries that may follow
        ttl = max(window, 3 * svc.settings.api.wait_timeout + 60)
        await anyio.to_thread.run_sync(lambda: svc.store.claim_recent_request(key_id, digest, ttl, replace=True))
        return await _create(svc, key_id, digest, create, ttl), False
    if attempt.retry is None and window <= 0:
        return await anyio.to_thread.run_sync(create), False
    ttl = window if attempt.retry is None else max(window, 3 * svc.settings.api.wait_timeout + 60)
    waited = 0.0
    while True:
        if await anyio.to_thread.run_sync(lambda: svc.store.claim_recent_request(key_id, digest, ttl)):
            return await _create(svc, key_id, digest, create, ttl), False
        job_id = await anyio.to_thread.run_sync(svc.store.recent_request, key_id, digest)
        if job_id:
            await anyio.to_thread.run_sync(svc.store.remember_request, key_id, digest, job_id, ttl)
            return job_id, True
        if job_id == "" and waited >= PENDING_WAIT:  # its first attempt is stuck: make one of our own
            return await anyio.to_thread.run_sync(create), False
        await anyio.sleep(0.05)
        waited += 0.05


async def _create(svc: Services, key_id: str, digest: str, create: Callable[[], str], ttl: float) -> str:
    job_id = None
    try:
        job_id = await anyio.to_thread.run_sync(create)
        return job_id
    finally:  # a request that failed (a 422) is forgotten: its retry is checked afresh
        await anyio.to_thread.run_sync(lambda: svc.store.remember_request(key_id, digest, job_id, ttl))
