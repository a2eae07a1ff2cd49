"""Webhook payloads and one delivery attempt.

Payloads follow the seeds' shape (`id`, `job_id`, `status`, `output`, `error`, `metadata`,
`created_at`, `updated_at`; item events add `error_kind`, job events `counts`). Every event has a stable id, sent as the
`webhook-id` header on every retry, and is signed like the Standard Webhooks spec when a
`whsec_` secret is configured. Retrying is the caller's job (a Celery retry with backoff).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import threading
import time
from dataclasses import asdict, dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from jobs import netclient, netguard, pace
from jobs.errors import TransientError
from jobs.lifecycle import JobStatus
from jobs.models import ItemRecord, JobRecord

USER_AGENT = "dreambatch-webhooks/1"


def item_payload(job: JobRecord, item: ItemRecord) -> dict[str, Any]:
    return {
        "type": f"item.{item.status}",
        "id": item.item_id,
        "job_id": job.job_id,
        "model": job.model,
        "status": item.status,
        "line": item.line,
        "output": item.output.model_dump() if item.output else None,
        "seed": item.seed,
        "error": item.error,
        "error_kind": item.error_kind,
        "metadata": item.metadata,
        "timings": item.timings.model_dump(),
        "created_at": item.created_at,
        "updated_at": item.updated_at,
    }


def job_payload(job: JobRecord, started: bool = False) -> dict[str, Any]:
    """The job's end (or, `started`, its job.running event, whatever it is by the time it is sent)."""
    status = JobStatus.RUNNING if started else job.status
    return {
        "type": f"job.{status}",
        "id": job.job_id,
        "job_id": job.job_id,
        "model": job.model,
        "status": status,
        "counts": {"total": job.total, **job.counts},
        "gpu_s": job.gpu_s,  # seconds its items held the model, every attempt counted
        "output": {"results": job.results_uri},
        "error": None if status != JobStatus.FAILED else "every item failed",
        "metadata": {},
        "created_at": job.created_at,
        "updated_at": job.finished_at or job.updated_at,
    }


def progress_payload(job: JobRecord, steps: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """job.progress: the job's counts, rate and ETA (jobs.pace) and its running items' steps, as it is now."""
    return {
        **job_payload(job),
        "type": "job.progress",
        **pace.since(job).as_dict(),
        "running": pace.running(steps),
    }


def sign(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256 of id.timestamp.body>` with a `whsec_<base64>` secret."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{event_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signature_header(secrets: list[str], event_id: str, timestamp: int, body: bytes) -> str:
    """One space-separated signature per secret, as Standard Webhooks allows during a key rotation."""
    return " ".join(sign(secret, event_id, timestamp, body) for secret in secrets)


@dataclass
class Attempt:
    at: float
    status_code: int | None
    latency_s: float
    error: str | None
    retry_after: float | None = None
    refused: bool = False  # the address policy refused the URL: retrying cannot help

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    @property
    def retryable(self) -> bool:
        if self.status_code is None:
            return not self.refused  # network error or timeout
        return self.status_code == 429 or self.status_code >= 500

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def deliver(
    url: str,
    event_id: str,
    payload: dict[str, Any],
    *,
    secrets: list[str],
    timeout: float,
    policy: netguard.Policy,
    client: httpx.Client | None = None,
) -> Attempt:
    """POST once to the checked address of the URL's host (redirects are not followed), within `timeout` seconds
    in all, on this process's pooled client unless `client` is given; never raises for HTTP, network or
    address-policy failures, it reports them. A refused address is not retried."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    ts = int(time.time())
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": event_id,
        "webhook-timestamp": str(ts),
    }
    if secrets:
        headers["webhook-signature"] = signature_header(secrets, event_id, ts, body)
    start = time.monotonic()
    client = client or netclient.shared()
    try:
        with netclient.deadline(timeout):  # `timeout` is the whole attempt's: a receiver trickling bytes is cut off
            with netguard.pinned_request(
                client, "POST", url, policy, content=body, headers=headers, timeout=timeout
            ) as resp:
                status, retry_after = resp.status_code, resp.headers.get("retry-after")
    except netguard.BlockedAddress as exc:
        return Attempt(time.time(), None, 0.0, f"blocked: {exc}", refused=True)
    except httpx.TimeoutException as exc:
        took = time.monotonic() - start
        return Attempt(time.time(), None, took, f"{type(exc).__name__}: no answer within {timeout}s ({exc})")
    except (httpx.HTTPError, TransientError) as exc:
        return Attempt(time.time(), None, time.monotonic() - start, f"{type(exc).__name__}: {exc}")
    latency = time.monotonic() - start
    error = None if 200 <= status < 300 else f"HTTP {status}"
    return Attempt(time.time(), status, latency, error, _retry_after(retry_after))


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def next_retry(
    attempts: int, first_at: float, cfg, retry_after: float | None, now: float | None = None
) -> float | None:
    """Seconds to wait before the next attempt of an event, or None when its retry window (or the optional
    attempt cap) is spent. A wait that would end after the window is cut to end at it, so the window's
    last moment still gets an attempt."""
    now = time.time() if now is None else now
    if cfg.max_attempts and attempts >= cfg.max_attempts:
        return None
    left = first_at + cfg.retry_window - now
    if left <= 0:
        return None
    return min(backoff(attempts, cfg.backoff_base, cfg.backoff_max, retry_after), left, cfg.backoff_max)


def backoff(attempt: int, base: float, cap: float, retry_after: float | None = None) -> float:
    """Exponential backoff with full jitter; a server's Retry-After wins when it asks for longer."""
    delay = random.uniform(0, min(cap, base * (2 ** max(0, attempt - 1))))
    return max(delay, retry_after or 0.0)


class DeliverySlots:
    """How many deliveries an I/O worker makes at once: `total` in all, so threads stay free for finalizing
    jobs, and `per_host` to one receiver (its host and port), so a slow receiver cannot take every slot."""

    def __init__(self, total: int, per_host: int):
        self.total, self.per_host = total, per_host
        self._busy: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, host: str) -> bool:
        with self._lock:
            if sum(self._busy.values()) >= self.total or self._busy.get(host, 0) >= self.per_host:
                return False
            self._busy[host] = self._busy.get(host, 0) + 1
            return True

    def give(self, host: str) -> None:
        with self._lock:
            self._busy[host] -= 1
            if not self._busy[host]:
                del self._busy[host]

    @classmethod
    def for_threads(cls, threads: int, free: int) -> DeliverySlots:
        total = max(1, threads - free)
        return cls(total, max(1, total // 3))
