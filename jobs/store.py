"""Live job and item state. The only module that talks to Redis.

Item status changes go through `transition`, one atomic Lua script that checks the move is
allowed (jobs.lifecycle), updates the item, adjusts the job's per-status counters and counts
terminal items, so the last item to end knows it is last without a chord. A job is marked
terminal once (`finish_job` uses HSETNX). `MemoryStore` is the same contract in one process,
for the local `run` mode.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from jobs import keys
from jobs.lifecycle import ItemStatus, JobStatus, allowed_sources, job_progress_status
from jobs.models import ItemRecord, JobRecord

STATUSES = [s.value for s in ItemStatus]


@dataclass(frozen=True)
class Transition:
    applied: bool  # False: the item was not in a status this move may start from
    previous: str | None  # None: no such item
    attempts: int
    done: int  # terminal items in the job after this move
    total: int

    @property
    def job_done(self) -> bool:
        return self.applied and self.total > 0 and self.done >= self.total


class Store(Protocol):
    def create_job(self, job: JobRecord) -> None: ...
    def add_items(self, items: list[ItemRecord]) -> None: ...
    def get_job(self, job_id: str) -> JobRecord | None: ...
    def get_item(self, job_id: str, item_id: str) -> ItemRecord | None: ...
    def transition(self, item: ItemRecord, to: ItemStatus, *, count_attempt: bool = False) -> Transition: ...
    def finish_job(self, job_id: str, status: JobStatus, results_uri: str | None, at: str) -> bool: ...
    def items(self, job_id: str) -> Iterator[ItemRecord]: ...
    def disable_webhook(self, job_id: str) -> None: ...
    def log_event(self, job_id: str, event_id: str, entry: dict[str, Any]) -> None: ...
    def events(self, job_id: str) -> dict[str, list[dict[str, Any]]]: ...


_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {-1, '', 0, 0, 0} end
local allowed = false
for i = 5, #ARGV do if ARGV[i] == cur then allowed = true end end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
if not allowed then return {0, cur, attempts, 0, 0} end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'record', ARGV[3]) end
if ARGV[2] == '1' then attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1) end
if cur ~= ARGV[1] then
  redis.call('HINCRBY', KEYS[2], 'n_' .. cur, -1)
  redis.call('HINCRBY', KEYS[2], 'n_' .. ARGV[1], 1)
end
local done = tonumber(redis.call('HGET', KEYS[2], 'done') or '0')
if ARGV[4] == '1' then done = redis.call('HINCRBY', KEYS[2], 'done', 1) end
local total = tonumber(redis.call('HGET', KEYS[2], 'total') or '0')
return {1, cur, attempts, done, total}
"""


def _job_from(fields: dict[str, str]) -> JobRecord:
    job = JobRecord.model_validate_json(fields["record"])
    job.total = int(fields.get("total", 0))
    job.counts = {s: int(fields.get(f"n_{s}", 0)) for s in STATUSES}
    job.status = fields.get("terminal") or job_progress_status(job.counts).value
    job.finished_at = fields.get("finished_at")
    job.results_uri = fields.get("results_uri")
    job.webhook_disabled = bool(fields.get("webhook_disabled"))
    return job


def _item_from(fields: dict[str, str]) -> ItemRecord:
    item = ItemRecord.model_validate_json(fields["record"])
    item.status = fields["status"]
    item.attempts = int(fields.get("attempts", 0))
    return item


class RedisStore:
    def __init__(self, client):
        self.r = client
        self._transition = client.register_script(_TRANSITION)

    @classmethod
    def from_url(cls, url: str) -> RedisStore:
        import redis
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        client = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=5.0, base=0.2), retries=20),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
        return cls(client)

    def create_job(self, job: JobRecord) -> None:
        fields = {"record": job.model_dump_json(), "total": job.total, "done": 0}
        fields.update({f"n_{s}": 0 for s in STATUSES})
        pipe = self.r.pipeline()
        pipe.hset(keys.job_key(job.job_id), mapping=fields)
        pipe.zadd(keys.JOBS_INDEX, {job.job_id: _epoch(job.created_at)})
        pipe.execute()

    def add_items(self, items: list[ItemRecord]) -> None:
        pipe = self.r.pipeline(transaction=False)
        for item in items:
            key = keys.ITEM.format(job_id=item.job_id, item_id=item.item_id)
            pipe.hset(key, mapping={"status": item.status, "attempts": item.attempts,
                                    "record": item.model_dump_json()})
            pipe.rpush(keys.JOB_ORDER.format(job_id=item.job_id), item.item_id)
            pipe.hincrby(keys.job_key(item.job_id), f"n_{item.status}", 1)
            if ItemStatus(item.status).terminal:
                pipe.hincrby(keys.job_key(item.job_id), "done", 1)
        pipe.execute()

    def get_job(self, job_id: str) -> JobRecord | None:
        fields = self.r.hgetall(keys.job_key(job_id))
        return _job_from(fields) if fields else None

    def get_item(self, job_id: str, item_id: str) -> ItemRecord | None:
        fields = self.r.hgetall(keys.ITEM.format(job_id=job_id, item_id=item_id))
        return _item_from(fields) if fields else None

    def transition(self, item: ItemRecord, to: ItemStatus, *, count_attempt: bool = False) -> Transition:
        record = item.model_copy(update={"status": to.value})
        res = self._transition(
            keys=[keys.ITEM.format(job_id=item.job_id, item_id=item.item_id), keys.job_key(item.job_id)],
            args=[to.value, int(count_attempt), record.model_dump_json(), int(to.terminal), *allowed_sources(to)],
        )
        applied, previous, attempts, done, total = res
        return Transition(applied == 1, previous or None, int(attempts), int(done), int(total))

    def finish_job(self, job_id: str, status: JobStatus, results_uri: str | None, at: str) -> bool:
        key = keys.job_key(job_id)
        if not self.r.hsetnx(key, "terminal", status.value):
            return False
        self.r.hset(key, mapping={"finished_at": at, "results_uri": results_uri or ""})
        return True

    def disable_webhook(self, job_id: str) -> None:
        self.r.hset(keys.job_key(job_id), "webhook_disabled", 1)

    def items(self, job_id: str, chunk: int = 500) -> Iterator[ItemRecord]:
        order = keys.JOB_ORDER.format(job_id=job_id)
        start = 0
        while ids := self.r.lrange(order, start, start + chunk - 1):
            pipe = self.r.pipeline(transaction=False)
            for item_id in ids:
                pipe.hgetall(keys.ITEM.format(job_id=job_id, item_id=item_id))
            for fields in pipe.execute():
                if fields:
                    yield _item_from(fields)
            start += chunk

    def job_ids(self, limit: int = 50) -> list[str]:
        return self.r.zrevrange(keys.JOBS_INDEX, 0, limit - 1)

    def log_event(self, job_id: str, event_id: str, entry: dict[str, Any]) -> None:
        self.r.rpush(f"{keys.JOB_EVENTS.format(job_id=job_id)}:{event_id}", json.dumps(entry))
        self.r.sadd(keys.JOB_EVENTS.format(job_id=job_id), event_id)

    def events(self, job_id: str) -> dict[str, list[dict[str, Any]]]:
        base = keys.JOB_EVENTS.format(job_id=job_id)
        return {eid: [json.loads(e) for e in self.r.lrange(f"{base}:{eid}", 0, -1)]
                for eid in sorted(self.r.smembers(base))}


class MemoryStore:
    """The same contract in one process's memory (local `run` mode)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._jobs: dict[str, dict[str, Any]] = {}
        self._items: dict[tuple[str, str], dict[str, Any]] = {}
        self._order: dict[str, list[str]] = {}
        self._events: dict[str, dict[str, list[dict[str, Any]]]] = {}

    def create_job(self, job: JobRecord) -> None:
        with self._lock:
            fields = {"record": job.model_dump_json(), "total": job.total, "done": 0}
            fields.update({f"n_{s}": 0 for s in STATUSES})
            self._jobs[job.job_id] = fields
            self._order[job.job_id] = []

    def add_items(self, items: list[ItemRecord]) -> None:
        with self._lock:
            for item in items:
                self._items[(item.job_id, item.item_id)] = {
                    "status": item.status, "attempts": item.attempts, "record": item.model_dump_json()}
                self._order[item.job_id].append(item.item_id)
                self._jobs[item.job_id][f"n_{item.status}"] += 1
                self._jobs[item.job_id]["done"] += int(ItemStatus(item.status).terminal)

    def get_job(self, job_id: str) -> JobRecord | None:
        with self._lock:
            fields = self._jobs.get(job_id)
            return _job_from(fields) if fields else None

    def get_item(self, job_id: str, item_id: str) -> ItemRecord | None:
        with self._lock:
            fields = self._items.get((job_id, item_id))
            return _item_from(fields) if fields else None

    def transition(self, item: ItemRecord, to: ItemStatus, *, count_attempt: bool = False) -> Transition:
        with self._lock:
            fields = self._items.get((item.job_id, item.item_id))
            if fields is None:
                return Transition(False, None, 0, 0, 0)
            job, cur = self._jobs[item.job_id], fields["status"]
            if cur not in allowed_sources(to):
                return Transition(False, cur, fields["attempts"], 0, 0)
            fields["status"] = to.value
            fields["record"] = item.model_copy(update={"status": to.value}).model_dump_json()
            fields["attempts"] += int(count_attempt)
            job[f"n_{cur}"] -= 1
            job[f"n_{to.value}"] += 1
            job["done"] += int(to.terminal)
            return Transition(True, cur, fields["attempts"], job["done"], job["total"])

    def finish_job(self, job_id: str, status: JobStatus, results_uri: str | None, at: str) -> bool:
        with self._lock:
            job = self._jobs[job_id]
            if job.get("terminal"):
                return False
            job.update(terminal=status.value, finished_at=at, results_uri=results_uri or "")
            return True

    def disable_webhook(self, job_id: str) -> None:
        with self._lock:
            self._jobs[job_id]["webhook_disabled"] = 1

    def items(self, job_id: str) -> Iterator[ItemRecord]:
        for item_id in list(self._order.get(job_id, [])):
            item = self.get_item(job_id, item_id)
            if item:
                yield item

    def log_event(self, job_id: str, event_id: str, entry: dict[str, Any]) -> None:
        with self._lock:
            self._events.setdefault(job_id, {}).setdefault(event_id, []).append(entry)

    def events(self, job_id: str) -> dict[str, list[dict[str, Any]]]:
        return self._events.get(job_id, {})


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


_RENEW_LOCK = """
local cur = redis.call('GET', KEYS[1])
if not cur then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
if cur == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class ScheduleState:
    """Schedule bookkeeping in Redis: the beat lock, the last slot fired, one claim per slot, a run lock
    and the last run's summary. (The durable ledger of what was edited lives in S3: jobs.catalog.)"""

    def __init__(self, client):
        self.r = client
        self._renew = client.register_script(_RENEW_LOCK)
        self._release = client.register_script(_RELEASE_LOCK)

    @classmethod
    def from_url(cls, url: str) -> ScheduleState:
        return cls(RedisStore.from_url(url).r)

    def hold_lock(self, key: str, owner: str, ttl_s: float) -> bool:
        """Take `key` for `owner`, or extend it when `owner` already holds it. False: someone else holds it."""
        return bool(self._renew(keys=[key], args=[owner, max(1, int(ttl_s * 1000))]))

    def release_lock(self, key: str, owner: str) -> None:
        self._release(keys=[key], args=[owner])

    def claim(self, key: str, ttl_s: int) -> bool:
        """True exactly once per key (until it expires)."""
        return bool(self.r.set(key, "1", nx=True, ex=ttl_s))

    def unclaim(self, key: str) -> None:
        self.r.delete(key)

    def last_fired(self, name: str) -> str | None:
        return self.r.get(keys.SCHEDULE_FIRED.format(name=name))

    def set_last_fired(self, name: str, slot: str) -> None:
        self.r.set(keys.SCHEDULE_FIRED.format(name=name), slot)

    def last_run(self, name: str) -> dict[str, Any] | None:
        raw = self.r.get(keys.SCHEDULE_LAST_RUN.format(name=name))
        return json.loads(raw) if raw else None

    def set_last_run(self, name: str, summary: dict[str, Any]) -> None:
        self.r.set(keys.SCHEDULE_LAST_RUN.format(name=name), json.dumps(summary))
