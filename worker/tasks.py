"""Celery tasks: thin adapters from a message (ids only) to the functions in worker.process."""

from __future__ import annotations

import time

from celery import Celery

from jobs import keys
from jobs.catalog.run import run_fired
from worker import process, recovery, webhooks
from worker.runtime import Runtime


def register(app: Celery, runtime: Runtime) -> None:
    """Register the four tasks on `app`, bound to this process's runtime."""

    @app.task(name=keys.TASK_RUN_ITEM, bind=True, max_retries=None, acks_late=True)
    def run_item(self, job_id: str, item_id: str) -> str:
        runtime.active.add((job_id, item_id))
        held = recovery.holding(runtime, job_id, item_id)  # this worker holds the message (worker.recovery)
        try:
            outcome = process.process_item(runtime.context(), job_id, item_id)
        finally:
            runtime.active.discard((job_id, item_id))
        if outcome.ended:
            runtime.ended += 1
        if outcome.retry_in is not None:
            held.passed_to_broker()
            raise self.retry(countdown=outcome.retry_in)
        held.done()
        return str(outcome)

    @app.task(name=keys.TASK_FINALIZE_JOB, bind=True, max_retries=10, acks_late=True)
    def finalize_job(self, job_id: str) -> str | None:
        try:
            return process.finalize_job(runtime.context(), job_id)
        except process.SendLater as later:  # a job that just ended: its finalizer may be sending the event
            raise self.retry(countdown=later.seconds) from None

    @app.task(name=keys.TASK_SEND_WEBHOOK, bind=True, max_retries=None, acks_late=True)
    def send_webhook(self, job_id: str, item_id: str | None, event_id: str, first_at: float | None = None) -> str:
        first_at = first_at or time.time()  # the retry window starts at an event's first attempt
        attempt = process.webhook_attempt(runtime.context(), job_id, item_id, event_id)
        if attempt is None or attempt.delivered or not attempt.retryable:
            return "done" if attempt is None or attempt.delivered else f"gave up: {attempt.error}"
        attempts = self.request.retries + 1
        delay = webhooks.next_retry(attempts, first_at, runtime.settings.webhooks, attempt.retry_after)
        if delay is None:
            return f"gave up after {attempts} attempts in {time.time() - first_at:.0f}s: {attempt.error}"
        raise self.retry(countdown=delay, args=[job_id, item_id, event_id, first_at])

    @app.task(name=keys.TASK_RUN_SCHEDULE, bind=True, max_retries=None, acks_late=True)
    def run_schedule(self, name: str, slot: str | None = None) -> dict:
        """Fired by beat: scan the schedule's source and submit what is new or changed (on an io worker).
        A transient failure is tried again with backoff, until shortly before the next slot."""
        fired = run_fired(name, runtime.services, slot, attempt=self.request.retries + 1)
        if fired.retry_in is not None:
            raise self.retry(countdown=fired.retry_in)
        return fired.summary
