"""Local embedded mode: one process, no Redis, no S3, the same item code path as a worker.

Items run one after another through `worker.process`; the store is in memory, outputs and the
durable record go to a local folder, webhooks are delivered inline with the same retry rules.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from jobs.models import JobSpec
from jobs.services import Services
from jobs.settings import Settings
from jobs.storage import LocalStore
from jobs.store import MemoryStore
from jobs.submit import Submission, create_job
from worker import process, webhooks
from worker.runtime import Runtime

log = logging.getLogger("dreambatch.local")


def run_local(manifest: Path, spec: JobSpec, *, settings: Settings, weights: str | None = None, device: str = "cpu",
              on_item: Callable[[str, str], None] | None = None) -> Submission:
    """Run `manifest` as `spec` says, here; `spec.output` is the folder for images and the durable record."""
    queue: deque[str] = deque()
    finals: list[str] = []
    events: list[tuple[str, str | None, str]] = []
    objects = LocalStore(spec.output or "out")
    services = Services(settings, store=MemoryStore(), objects=lambda _loc: objects,
                        publish=lambda _job, ids: queue.extend(ids), notify=events.extend, finalize=finals.append)
    store = services.store
    runtime = Runtime(services, model=spec.model, weights=weights, device=device)
    ctx = process.Context(settings=settings, store=store, runner=runtime.runner, objects=services.objects,
                          notify=services.notify, finalize=services.finalize,
                          revision=lambda: runtime.model_revision)

    # 1. validate and create the job; queued ids land in a local queue
    sub = create_job(spec.model_copy(update={"output": objects.location}), manifest, services)

    # 2. run every item, retrying transient failures after their backoff
    job_id = sub.job.job_id
    while queue:
        item_id = queue.popleft()
        outcome = process.process_item(ctx, job_id, item_id)
        if outcome.retry_in is not None:
            time.sleep(outcome.retry_in)
            queue.appendleft(item_id)
            continue
        if on_item:
            on_item(item_id, str(outcome))
        _flush_events(ctx, events)

    # 3. finalize (results.jsonl) and send the job's event
    for job in dict.fromkeys(finals):
        process.finalize_job(ctx, job)
    _flush_events(ctx, events)
    sub.job = store.get_job(job_id)
    return sub


LOCAL_WEBHOOK_ATTEMPTS = 5  # local mode ends with the command: a few quick tries, not the worker's day-long window


def _flush_events(ctx: process.Context, events: list[tuple[str, str | None, str]]) -> None:
    cfg = ctx.settings.webhooks
    tries = min(cfg.max_attempts or LOCAL_WEBHOOK_ATTEMPTS, LOCAL_WEBHOOK_ATTEMPTS)
    while events:
        job_id, item_id, event_id = events.pop(0)
        for n in range(1, tries + 1):
            attempt = process.webhook_attempt(ctx, job_id, item_id, event_id)
            if attempt is None or attempt.delivered or not attempt.retryable:
                break
            if n < tries:
                time.sleep(webhooks.backoff(n, cfg.backoff_base, min(cfg.backoff_max, 30.0), attempt.retry_after))
            else:
                log.warning("webhook %s not delivered after %d attempts: %s", event_id, n, attempt.error)
