"""The baseline for the overhead ratio: plain Celery on the same Redis with an empty task."""

from __future__ import annotations

import os

from celery import Celery

app = Celery("plain", broker=os.environ.get("DREAMBATCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
)


@app.task(name="plain.empty")
def empty(job_id: str, item_id: str) -> None:
    return None
