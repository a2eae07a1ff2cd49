"""The Celery app's configuration and the publishing side of the queues.

The control plane publishes by task *name* (jobs.keys); the worker registers the same names on an
app built by this same function, so both sides agree on serializer, queues and broker options.
"""

from __future__ import annotations

from collections.abc import Iterable

from celery import Celery
from celery.utils import uuid
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
    """Queue one run_item task per id at the job's priority (see `publish`)."""
    queue = keys.gpu_queue(model)
    return publish(app, keys.TASK_RUN_ITEM, queue, ([job_id, i] for i in item_ids), batch, keys.PRIORITIES[priority])


def send_finalize(app: Celery, job_id: str) -> None:
    publish(app, keys.TASK_FINALIZE_JOB, keys.IO_QUEUE, [[job_id]])


def send_webhook(app: Celery, job_id: str, item_id: str | None, event_id: str) -> None:
    publish(app, keys.TASK_SEND_WEBHOOK, keys.IO_QUEUE, [[job_id, item_id, event_id]])


def send_webhooks(app: Celery, events: Iterable[tuple[str, str | None, str]], batch: int = 500) -> int:
    """Queue many send_webhook tasks (job_id, item_id or None, event_id) through one pipelined producer."""
    return publish(app, keys.TASK_SEND_WEBHOOK, keys.IO_QUEUE, (list(e) for e in events), batch)


def publish(app: Celery, task: str, queue: str, arg_lists: Iterable[list], batch: int = 500, priority: int = 0) -> int:
    """Queue one `task` message per list of arguments on `queue`: one producer, Redis commands pipelined `batch`
    at a time (kombu's publish batch); an error discards what was not yet flushed. Returns the count. `priority`:
    the kombu priority (0, send_task's when it is given none: the first list a worker reads).

    Each message is the one `app.send_task` makes (Celery's task protocol 2, built by `app.amqp.as_task_v2`;
    tests/test_services.py compares them), published with the same serializer, delivery mode and retry policy,
    less send_task's per-message work that gives the same answer for every message of a batch: routing, the
    queue's declaration, option merging and the arguments' saferepr (ids and event ids: their repr is it).
    That work was ~2/3 of a large fan-out's time (bench/fanout.py: ~50 µs a message against ~155)."""
    conf, amqp = app.conf, app.amqp
    declared = amqp.queues[queue]
    parent = app.current_worker_task  # (a fan-out from inside a task: the messages name it, as send_task's do)
    root_id = parent and (parent.request.root_id or parent.request.id)
    parent_id = parent and parent.request.id
    options = {
        "exchange": "",  # (the default exchange: routed by queue name, as send_task does for a direct queue)
        "routing_key": queue,
        "serializer": conf.task_serializer,
        "compression": conf.task_compression,
        "retry": conf.task_publish_retry,
        "retry_policy": dict(conf.task_publish_retry_policy or {}),
        "delivery_mode": declared.exchange.delivery_mode or conf.task_default_delivery_mode,
        "priority": priority,
    }
    count = 0
    with app.producer_or_acquire() as producer, producer.batch(max_size=batch):
        producer.maybe_declare(declared)
        for args in arg_lists:
            task_id = uuid()
            headers, properties, body, _ = amqp.as_task_v2(
                task_id,
                task,
                args=args,
                argsrepr=repr(args),
                kwargsrepr="{}",
                reply_to=app.thread_oid,
                root_id=root_id,
                parent_id=parent_id,
                ignore_result=None,
            )
            producer.publish(body, headers=headers, **properties, **options)
            count += 1
    return count
