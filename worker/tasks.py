"""Celery tasks: thin adapters from a message (ids only) to the functions in worker.process."""

from __future__ import annotations

import random
import time
from urllib.parse import urlsplit

from celery import Celery

from jobs import keys
from jobs.catalog.run import run_fired
from jobs.errors import StorageUnavailable
from worker import process, recovery, webhooks
from worker.runtime import Runtime


def register(app: Celery, runtime: Runtime) -> None:
    """Register the four tasks on `app`, bound to this process's runtime."""

    @app.task(name=keys.TASK_RUN_ITEM, bind=True, max_retries=None, acks_late=True)
    def run_item(self, job_id: str, item_id: str, outage_since: float | None = None) -> str:
        runtime.active.add((job_id, item_id))
        held = recovery.holding(runtime, job_id, item_id)  # this worker holds the message (worker.recovery)
        ctx = runtime.context()
        ctx.outage_since = outage_since  # (set on the retries of an item waiting for object storage)
        try:
            outcome = process.process_item(ctx, job_id, item_id)
        finally:
            runtime.active.discard((job_id, item_id))
        if outcome.ended:
            runtime.ended += 1
        if outcome.retry_in is not None:
            held.passed_to_broker()
            since = {"outage_since": outcome.outage_since} if outcome.outage_since else {}
            raise self.retry(countdown=outcome.retry_in, args=[job_id, item_id], kwargs=since)
        held.done()
        return str(outcome)

    @app.task(name=keys.TASK_FINALIZE_JOB, bind=True, max_retries=10, acks_late=True)
    def finalize_job(self, job_id: str) -> str | None:
        try:
            return process.finalize_job(runtime.context(), job_id)
        except process.SendLater as later:  # a job that just ended: its finalizer may be sending the event
            raise self.retry(countdown=later.seconds) from None
        except StorageUnavailable as exc:  # results.jsonl waits for S3, however long it is away
            raise self.retry(countdown=random.uniform(2.0, 15.0), max_retries=None, exc=exc) from None

    @app.task(name=keys.TASK_SEND_WEBHOOK, bind=True, max_retries=None, acks_late=True)
    def send_webhook(
        self, job_id: str, item_id: str | None, event_id: str, first_at: float | None = None, tries: int | None = None
    ) -> str:
        first_at = first_at or time.time()  # the retry window starts at an event's first attempt
        tries = self.request.retries if tries is None else tries  # attempts made before this one
        job = runtime.store.get_job(job_id)
        host = urlsplit(job.webhook).netloc if job and job.webhook else ""  # the receiver: host and port
        if not runtime.deliveries.take(host):  # the delivery slots (or this host's) are busy: free this thread
            raise self.retry(countdown=random.uniform(0.5, 2.0), args=[job_id, item_id, event_id, first_at, tries])
        try:
            attempt = process.webhook_attempt(runtime.context(), job_id, item_id, event_id)
        finally:
            runtime.deliveries.give(host)
        if attempt is None or attempt.delivered or not attempt.retryable:
            return "done" if attempt is None or attempt.delivered else f"gave up: {attempt.error}"
        attempts = tries + 1
        delay = webhooks.next_retry(attempts, first_at, runtime.settings.webhooks, attempt.retry_after)
        if delay is None:
            return f"gave up after {attempts} attempts in {time.time() - first_at:.0f}s: {attempt.error}"
        raise self.retry(countdown=delay, args=[job_id, item_id, event_id, first_at, attempts])

    @app.task(name=keys.TASK_RUN_SCHEDULE, bind=True, max_retries=None, acks_late=True)
    def run_schedule(self, name: str, slot: str | None = None) -> dict:
        """Fired by beat: scan the schedule's source and submit what is new or changed (on an io worker).
        A transient failure is tried again with backoff, until shortly before the next slot."""
        fired = run_fired(name, runtime.services, slot, attempt=self.request.retries + 1)
        if fired.retry_in is not None:
            raise self.retry(countdown=fired.retry_in)
        return fired.summary
