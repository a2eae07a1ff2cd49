"""Celery tasks: thin adapters from a message (ids only) to the functions in worker.process."""

from __future__ import annotations

from celery import Celery

from jobs import catalog, keys
from worker import process, webhooks
from worker.runtime import Runtime


def register(app: Celery, runtime: Runtime) -> None:
    """Register the three tasks on `app`, bound to this process's runtime."""

    @app.task(name=keys.TASK_RUN_ITEM, bind=True, max_retries=None, acks_late=True)
    def run_item(self, job_id: str, item_id: str) -> str:
        outcome = process.process_item(runtime.context(), job_id, item_id)
        if outcome.retry_in is not None:
            raise self.retry(countdown=outcome.retry_in)
        return outcome.status

    @app.task(name=keys.TASK_FINALIZE_JOB, acks_late=True)
    def finalize_job(job_id: str) -> str | None:
        return process.finalize_job(runtime.context(), job_id)

    @app.task(name=keys.TASK_SEND_WEBHOOK, bind=True, max_retries=None, acks_late=True)
    def send_webhook(self, job_id: str, item_id: str | None, event_id: str) -> str:
        cfg = runtime.settings.webhooks
        attempt = process.webhook_attempt(runtime.context(), job_id, item_id, event_id)
        if attempt is None or attempt.delivered or not attempt.retryable:
            return "done" if attempt is None or attempt.delivered else f"gave up: {attempt.error}"
        if self.request.retries + 1 >= cfg.max_attempts:
            return f"gave up after {cfg.max_attempts} attempts: {attempt.error}"
        delay = webhooks.backoff(self.request.retries + 1, cfg.backoff_base, cfg.backoff_max, attempt.retry_after)
        raise self.retry(countdown=delay)

    @app.task(name=keys.TASK_RUN_SCHEDULE, acks_late=True)
    def run_schedule(name: str, slot: str | None = None) -> dict:
        """Fired by beat: scan the schedule's source and submit what is new or changed (on an io worker)."""
        return catalog.run_named(name, runtime.settings, app, slot).summary()
