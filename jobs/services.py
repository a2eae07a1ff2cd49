"""The composition root: every collaborator a process talks to, built from Settings on first use, once,
and handed to whoever needs it.

    services = Services(settings)   one per process: the API app, a worker (worker.runtime), beat; a CLI
                                    command's is `get_services()`, over `get_settings()`
    services.store                  the live state (jobs.store) on the process's Redis client, which rides out
                                    an outage of `redis_retry_s` seconds
    services.schedule_state         the schedules' Redis state (jobs.catalog), on that same client
    services.celery                 the Celery app (jobs.broker): tasks are published on it, a worker runs them
    services.objects(location)      object storage for an output location: one per location, one S3 client
    services.publish(job, ids)      hand work on: a job's items to its model's queue at its priority,
    services.notify(events)         webhook messages, and a job's finalize (Celery messages; in-process
    services.finalize(job_id)       queues in local mode)

Nothing is built until first asked for (never at import, never before a worker forks). Local mode and
tests hand in their own parts: `Services(settings, store=MemoryStore(), objects=lambda _: LocalStore(out),
publish=…, notify=…, finalize=…)`.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any

from celery import Celery

from jobs import broker
from jobs.errors import ConfigError, JobNotFound
from jobs.models import Event, JobRecord
from jobs.settings import Settings, get_settings
from jobs.storage import ObjectStore, open_store, s3_client
from jobs.store import RedisStore, ScheduleState, Store, redis_client


class Services:
    def __init__(
        self,
        settings: Settings,
        *,
        store: Store | None = None,
        objects: Callable[[str], ObjectStore] | None = None,
        celery: Celery | None = None,
        publish: Callable[[JobRecord, list[str]], None] | None = None,
        notify: Callable[[list[Event]], None] | None = None,
        finalize: Callable[[str], None] | None = None,
    ):
        self.settings = settings
        self._lock = threading.RLock()
        self._clients: dict[float, Any] = {}  # retry window (s) → Redis client
        self._store: Any = store  # local mode: a MemoryStore (the same Store contract)
        self._state: ScheduleState | None = None
        self._celery = celery
        self._s3: Any = None
        self._stores: dict[str, ObjectStore] = {}
        self._open = objects
        self._publish, self._notify, self._finalize = publish, notify, finalize
        self._url_secret: bytes | None = None

    def output(self, given: str | None = None) -> str:
        """Where a job (or an upload) is written: `given`, else DREAMBATCH_OUTPUT; a ConfigError when neither."""
        location = given or self.settings.output
        if not location:
            raise ConfigError(
                "no output location: give one, or set DREAMBATCH_OUTPUT (s3://bucket/prefix or a "
                "folder the workers share)"
            )
        return location

    # --- clients ----------------------------------------------------------------------------------
    def redis(self, retry_s: float | None = None):
        """The process's Redis client; `retry_s`: one that gives up sooner than `settings.redis_retry_s`."""
        window = self.settings.redis_retry_s if retry_s is None else retry_s
        with self._lock:
            if window not in self._clients:
                self._clients[window] = redis_client(self.settings.redis_url, window)
            return self._clients[window]

    @property
    def store(self) -> RedisStore:
        with self._lock:
            if self._store is None:
                self._store = RedisStore(self.redis())
            return self._store

    @property
    def schedule_state(self) -> ScheduleState:
        with self._lock:
            if self._state is None:
                self._state = ScheduleState(self.redis())
            return self._state

    @property
    def celery(self) -> Celery:
        with self._lock:
            if self._celery is None:
                self._celery = broker.make_celery(self.settings)
            return self._celery

    @property
    def s3(self):
        """The process's boto3 S3 client (shared by every S3 location)."""
        with self._lock:
            if self._s3 is None:
                self._s3 = s3_client(self.settings)
            return self._s3

    def objects(self, location: str) -> ObjectStore:
        """Object storage for `location` (s3://bucket/prefix or a folder), opened once."""
        if self._open is not None:
            return self._open(location)
        with self._lock:
            if location not in self._stores:
                client = self.s3 if location.startswith("s3://") else None
                self._stores[location] = open_store(location, self.settings, client=client)
            return self._stores[location]

    @property
    def url_secret(self) -> bytes:
        """What signs the links the API serves files at (`api.url_secret`, else random per process)."""
        with self._lock:
            if self._url_secret is None:
                self._url_secret = (self.settings.api.url_secret or secrets.token_hex(32)).encode()
            return self._url_secret

    def job(self, job_id: str) -> JobRecord:
        """The job's live record; JobNotFound when the store has no such job."""
        job = self.store.get_job(job_id)
        if job is None:
            from jobs.retention import purged_message

            raise JobNotFound(purged_message(self, job_id) or f"no job {job_id!r}")
        return job

    # --- handing work on --------------------------------------------------------------------------
    def publish(self, job: JobRecord, ids: list[str]) -> None:
        """Queue the job's items `ids` on its model's queue, at its priority."""
        if self._publish is not None:
            return self._publish(job, ids)
        broker.publish_items(self.celery, job.model, job.job_id, ids, priority=job.priority)

    def notify(self, events: Iterable[Event]) -> None:
        """Queue one webhook delivery per event."""
        if self._notify is not None:
            return self._notify(list(events))
        broker.send_webhooks(self.celery, events)

    def finalize(self, job_id: str) -> None:
        """Queue the job's finalize (results.jsonl, its terminal status and event)."""
        if self._finalize is not None:
            return self._finalize(job_id)
        broker.send_finalize(self.celery, job_id)


@lru_cache(maxsize=1)
def get_services() -> Services:
    """The process-wide services over `get_settings()`, built on first use (what a CLI command uses)."""
    return Services(get_settings())
