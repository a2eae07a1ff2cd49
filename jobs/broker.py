"""The Celery app's configuration and the publishing side of the queues.

The control plane publishes by task *name* (jobs.keys); the worker registers the same names on an
app built by this same function, so both sides agree on serializer, queues and broker options.
"""

from __future__ import annotations

from collections.abc import Iterable

from celery import Celery
from kombu import Queue

from jobs import keys
from jobs.models import MODELS
from jobs.settings import Settings


def make_celery(settings: Settings) -> Celery:
    app = Celery("dreambatch", broker=settings.redis_url, set_as_current=False)
    c = settings.celery
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,  # ack after the item ran, so a lost worker's item is redelivered
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_priority=keys.PRIORITIES["normal"],  # kombu's default (0) would be "high"
        task_time_limit=c.task_time_limit,
        task_queues=[Queue(keys.gpu_queue(m)) for m in MODELS] + [Queue(keys.IO_QUEUE)],
        task_default_queue=keys.IO_QUEUE,
        task_routes={
            keys.TASK_FINALIZE_JOB: {"queue": keys.IO_QUEUE},
            keys.TASK_SEND_WEBHOOK: {"queue": keys.IO_QUEUE},
        },
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_transport_options={
            "visibility_timeout": c.visibility_timeout,  # must exceed task_time_limit
            "unacked_restore_interval": c.restore_interval,
            "unacked_restore_throttle": 1,
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
            # one Redis list per step; a worker's BRPOP names them lowest step first, so with prefetch 1
            # a worker always takes a queued high item before any normal one, and normal before low
            "priority_steps": keys.PRIORITY_STEPS,
        },
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_channel_error_retry=True,
    )
    return app


def publish_items(
    app: Celery, model: str, job_id: str, item_ids: Iterable[str], batch: int = 500, priority: str = "normal"
) -> int:
    """Queue one run_item task per id at the job's priority: one producer, Redis commands pipelined
    `batch` at a time (kombu's publish batch); an error discards what was not yet flushed."""
    count = 0
    queue = keys.gpu_queue(model)
    level = keys.PRIORITIES[priority]
    with app.producer_or_acquire() as producer, producer.batch(max_size=batch):
        for item_id in item_ids:
            app.send_task(keys.TASK_RUN_ITEM, args=[job_id, item_id], queue=queue, producer=producer, priority=level)
            count += 1
    return count


def send_finalize(app: Celery, job_id: str) -> None:
    app.send_task(keys.TASK_FINALIZE_JOB, args=[job_id], queue=keys.IO_QUEUE)


def send_webhook(app: Celery, job_id: str, item_id: str | None, event_id: str) -> None:
    app.send_task(keys.TASK_SEND_WEBHOOK, args=[job_id, item_id, event_id], queue=keys.IO_QUEUE)


def send_webhooks(app: Celery, events: Iterable[tuple[str, str | None, str]], batch: int = 500) -> int:
    """Queue many send_webhook tasks (job_id, item_id or None, event_id) through one pipelined producer."""
    count = 0
    with app.producer_or_acquire() as producer, producer.batch(max_size=batch):
        for job_id, item_id, event_id in events:
            app.send_task(
                keys.TASK_SEND_WEBHOOK, args=[job_id, item_id, event_id], queue=keys.IO_QUEUE, producer=producer
            )
            count += 1
    return count
