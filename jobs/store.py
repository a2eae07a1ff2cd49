"""Live job and item state. The only module that talks to Redis.

Item status changes go through `transition`, one atomic Lua script that checks the move is
allowed (jobs.lifecycle), updates the item, adjusts the job's per-status counters and counts
terminal items, so the last item to end knows it is last without a chord. A job is marked
terminal once per round (`finish_job` uses HSETNX; `reopen_job`, for `retry JOB`, clears the mark
after its failed items were moved back to queued, so a finalize in between finds the job still
ended and leaves it alone; a finalizer names the round it read, so one that read the job before a
`retry` of a job not yet ended does not end the new round). `MemoryStore` is the same contract in one
process, for the local `run` mode.

`reach` and `unreachable` are how a command a person runs finds out, in a few seconds, that Redis is not
there, and what it then prints (an `Unreachable` naming the address, the cause and the fix); long-running
processes use `problem` to say so in their logs and ride the outage out with `RedisStore.from_url`'s retries.

Job control lives here too: the cancel flag (a field of the job hash, read by workers between
denoising steps), per-job concurrency slots (a sorted set of leases, taken atomically), queue
depths and worker heartbeats (for metrics and `top`).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from jobs import keys
from jobs.errors import ConfigError, Unreachable
from jobs.lifecycle import TERMINAL_ITEM, ItemStatus, JobStatus, allowed_sources, job_progress_status
from jobs.models import ApiKeyRecord, ItemRecord, JobRecord

STATUSES = [s.value for s in ItemStatus]
_TERMINAL = " ".join(s.value for s in TERMINAL_ITEM)


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
    def commit_job(self, job_id: str) -> None: ...
    def abort_submission(self, job_id: str) -> None: ...
    def get_job(self, job_id: str) -> JobRecord | None: ...
    def get_item(self, job_id: str, item_id: str) -> ItemRecord | None: ...
    def transition(self, item: ItemRecord, to: ItemStatus, *, count_attempt: bool = False) -> Transition: ...
    def refund_attempt(self, job_id: str, item_id: str) -> None: ...
    def finish_job(
        self, job_id: str, status: JobStatus, results_uri: str | None, at: str, round_: int | None = None
    ) -> bool: ...
    def items(self, job_id: str) -> Iterator[ItemRecord]: ...
    def disable_webhook(self, job_id: str) -> None: ...
    def beat(self, name: str, info: dict[str, Any], ttl: float) -> None: ...
    def workers(self) -> list[dict[str, Any]]: ...
    def log_event(self, job_id: str, event_id: str, entry: dict[str, Any]) -> None: ...
    def events(self, job_id: str) -> dict[str, list[dict[str, Any]]]: ...
    def mark_sent(self, job_id: str, *event_ids: str) -> None: ...
    def was_sent(self, job_id: str, event_id: str) -> bool: ...
    def nudge_finalize(self, job_id: str, ttl: float) -> bool: ...
    def acquire_lease(self, job_id: str, item_id: str, token: str, ttl: float) -> float: ...
    def renew_lease(self, job_id: str, item_id: str, token: str, ttl: float) -> bool: ...
    def release_lease(self, job_id: str, item_id: str, token: str) -> None: ...
    def request_cancel(self, job_id: str, at: str) -> bool: ...
    def cancel_requested(self, job_id: str) -> bool: ...
    def reopen_job(self, job_id: str, round_: int) -> None: ...
    def acquire_slot(self, job_id: str, item_id: str, cap: int, lease_s: float) -> bool: ...
    def release_slot(self, job_id: str, item_id: str) -> None: ...
    def record_step(self, job_id: str, item_id: str, step: int, steps: int) -> bool: ...
    def request_item_stop(self, job_id: str, item_id: str) -> None: ...
    def clear_item_stop(self, job_id: str, item_ids: list[str]) -> None: ...
    def running_steps(self, job_id: str) -> dict[str, tuple[int, int]]: ...
    def add_gpu_seconds(self, job_id: str, seconds: float) -> None: ...
    def progress_due(self, job_id: str, every: float) -> bool: ...
    def purged(self, job_id: str) -> dict[str, Any] | None: ...


# An item's execution lease: one token at a time; only its holder renews or releases it. A holder whose lease
# expired while nobody else took it (Redis was away for longer than the TTL) takes it back as it renews.
_LEASE_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 2 end
return 0
"""
# The executions registry (keys.EXECUTIONS): change an entry only while it still names ARGV[2].
_EXECUTION_SWAP = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
if ARGV[4] == '1' then return redis.call('HDEL', KEYS[1], ARGV[1]) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""
_REFUND_ATTEMPT = """
if tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0') > 0 then redis.call('HINCRBY', KEYS[1], 'attempts', -1) end
return 0
"""
_LEASE_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Add items that are not there yet (a batch retried after a dropped connection adds nothing twice).
# KEYS: job hash, order list. ARGV: item key prefix, then (id, status, record, terminal, attempts) per item.
_ADD_ITEMS = """
local added = 0
for i = 2, #ARGV, 5 do
  local key = ARGV[1] .. ARGV[i]
  if redis.call('EXISTS', key) == 0 then
    redis.call('HSET', key, 'status', ARGV[i + 1], 'attempts', ARGV[i + 4], 'record', ARGV[i + 2])
    redis.call('RPUSH', KEYS[2], ARGV[i])
    redis.call('HINCRBY', KEYS[1], 'n_' .. ARGV[i + 1], 1)
    if ARGV[i + 3] == '1' then redis.call('HINCRBY', KEYS[1], 'done', 1) end
    added = added + 1
  end
end
return added
"""

_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {-1, '', 0, 0, 0} end
local allowed = false
for i = 6, #ARGV do if ARGV[i] == cur then allowed = true end end
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
local was_terminal = string.find(' ' .. ARGV[5] .. ' ', ' ' .. cur .. ' ', 1, true) ~= nil
if ARGV[4] == '1' and not was_terminal then done = redis.call('HINCRBY', KEYS[2], 'done', 1) end
if ARGV[4] ~= '1' and was_terminal then done = redis.call('HINCRBY', KEYS[2], 'done', -1) end
local total = tonumber(redis.call('HGET', KEYS[2], 'total') or '0')
return {1, cur, attempts, done, total}
"""


# --- reaching Redis -----------------------------------------------------------------------------
REDIS_FIX = "start it (docker compose up -d redis, or redis-server) or point DREAMBATCH_REDIS_URL at yours"


def redis_errors() -> tuple[type[Exception], ...]:
    """What a client raises when Redis cannot be reached or used (redis-py's, and kombu's when publishing)."""
    import redis
    from kombu.exceptions import OperationalError

    return redis.ConnectionError, redis.TimeoutError, OperationalError


def shown_url(url: str) -> str:
    """`url` without its password, fit to print."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{netloc}").geturl()


def unreachable(url: str, exc: BaseException) -> Unreachable:
    """The one line a person reads when Redis at `url` cannot be used: where, why, and what to do."""
    import redis

    cause = str(exc).strip().rstrip(".") or type(exc).__name__
    if isinstance(exc, redis.AuthenticationError) or "NOAUTH" in cause or "WRONGPASS" in cause:
        fix = "put its password in DREAMBATCH_REDIS_URL (redis://:PASSWORD@HOST:6379/0)"
    else:
        fix = REDIS_FIX
    return Unreachable(f"cannot reach Redis at {shown_url(url)} ({cause}); {fix}")


def problem(url: str, timeout: float = 2.0) -> Unreachable | ConfigError | None:
    """None when Redis at `url` answers a PING within `timeout` s (one try, no retries); else what is wrong."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    try:
        client = redis.Redis.from_url(
            url, socket_connect_timeout=timeout, socket_timeout=timeout, retry=Retry(NoBackoff(), 0)
        )
    except ValueError as exc:
        return ConfigError(
            f"DREAMBATCH_REDIS_URL={shown_url(url)!r} is not a Redis URL ({exc}); set it to redis://HOST:6379/0"
        )
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        return unreachable(url, exc)
    finally:
        client.close()
    return None


def reach(url: str, wait_s: float) -> None:
    """Return once Redis at `url` answers; raise what `problem` found if it has not within `wait_s` s."""
    deadline = time.monotonic() + wait_s
    while True:
        left = deadline - time.monotonic()
        found = problem(url, timeout=min(2.0, max(left, 0.2)))
        if found is None:
            return
        if isinstance(found, ConfigError) or time.monotonic() + 0.25 >= deadline:
            raise found
        time.sleep(0.25)


def say_if_unreachable(url: str, log, who: str, meanwhile: str = "") -> bool:
    """For a long-running process at its start: log, in one line, that Redis at `url` does not answer and that
    `who` ("This worker") waits for it (its clients retry), doing `meanwhile`; True when it answers."""
    found = problem(url)
    if found is not None:
        log.warning("%s. %s keeps trying%s and carries on once Redis answers", found, who, meanwhile)
    return found is None


async def listen_for_endings(url: str, ended: Callable[[str], None], log) -> None:
    """Forever, on one pub/sub connection: `ended(job_id)` for every job `finish_job` ends (keys.JOB_ENDED, any
    database: a stray id only wakes nobody). While Redis is away it reconnects with backoff and says so once;
    announcements made meanwhile are lost, so whoever waits on them also polls."""
    import anyio
    import redis
    import redis.asyncio as aioredis

    pattern, start = keys.JOB_ENDED.format(job_id="*"), len(keys.JOB_ENDED.format(job_id=""))
    delay, said = 0.2, False
    while True:
        client = aioredis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=5)
        try:
            async with client.pubsub() as pubsub:
                await pubsub.psubscribe(pattern)
                delay, said = 0.2, False
                while True:  # a timeout, not a blocking read: each idle turn PINGs, so a dead link is noticed
                    # (every message is taken, its PONG included: filtered out, a PONG read as "nothing came"
                    # and was answered by the next PING at once, ~17,000 a second from an idle API)
                    message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=15.0)
                    if message is None:
                        await pubsub.ping()
                    elif message["type"] == "pmessage":
                        ended(message["channel"][start:])
        except (redis.RedisError, OSError) as exc:
            if not said:
                log.warning("%s; waiting API requests poll for job ends until it answers", unreachable(url, exc))
                said = True
        finally:
            await client.aclose()
        await anyio.sleep(delay)
        delay = min(delay * 2, 5.0)


def _retries_for(window: float, cap: float, base: float) -> int:
    """How many exponential-backoff retries (doubling from `base`, at most `cap` apart) span `window` s."""
    n, spent, delay = 0, 0.0, base
    while spent < window:
        delay = min(cap, base * 2 ** (n + 1))
        spent += delay
        n += 1
    return max(n, 1)


def _job_fields(job: JobRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {"record": job.model_dump_json(), "total": job.total, "done": 0}
    fields.update({f"n_{s}": 0 for s in STATUSES})
    if job.submitting:
        fields["submitting"] = 1
    if job.gpu_s:  # (a job rebuilt from its durable record keeps the model time it had used)
        fields[keys.JOB_GPU] = job.gpu_s
    return fields


def _job_from(fields: dict[str, str]) -> JobRecord:
    job = JobRecord.model_validate_json(fields["record"])
    job.total = int(fields.get("total", 0))
    job.counts = {s: int(fields.get(f"n_{s}", 0)) for s in STATUSES}
    if fields.get("terminal"):
        job.status = JobStatus(fields["terminal"])
    elif fields.get("submit_aborted"):  # its submission failed: nothing of it runs, it never ends otherwise
        job.status = JobStatus.CANCELLED
    else:
        job.status = job_progress_status(job.counts)
    job.finished_at = fields.get("finished_at")
    job.results_uri = fields.get("results_uri")
    job.webhook_disabled = bool(fields.get("webhook_disabled"))
    job.submitting = bool(fields.get("submitting"))
    job.submit_aborted = bool(fields.get("submit_aborted"))
    job.cancel_requested = bool(fields.get("cancel_requested"))
    job.round = int(fields.get("round", 0))
    job.gpu_s = round(float(fields.get(keys.JOB_GPU, 0) or 0), 4)
    return job


def _step_pair(step: str) -> tuple[int, int]:
    done, _, total = step.partition("/")
    return int(done), int(total or 0)


def _item_from(fields: dict[str, str]) -> ItemRecord:
    item = ItemRecord.model_validate_json(fields["record"])
    item.status = ItemStatus(fields["status"])
    item.attempts = int(fields.get("attempts", 0))
    return item


# End a job once per round (the HSETNX of its terminal status), then tell the API's waiters (keys.JOB_ENDED).
# KEYS: job hash. ARGV: status, finished_at, results_uri, channel, the round it ends ('' for whichever).
_FINISH_JOB = """
if ARGV[5] ~= '' and (redis.call('HGET', KEYS[1], 'round') or '0') ~= ARGV[5] then return 0 end
if redis.call('HSETNX', KEYS[1], 'terminal', ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'finished_at', ARGV[2], 'results_uri', ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[1])
return 1
"""

# Take a concurrency slot: drop expired leases, keep (and extend) one this item holds, else take a free one.
_ACQUIRE_SLOT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZSCORE', KEYS[1], ARGV[2]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], ARGV[4], ARGV[2])
  redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[5])) + 60)
  return 1
end
return 0
"""


def redis_client(url: str, retry_s: float):
    """A Redis client that rides out an outage of about `retry_s` seconds before a call fails (jobs.services
    builds one per process, from Settings)."""
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=10,
        socket_connect_timeout=5,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=5.0, base=0.2), retries=_retries_for(retry_s, cap=5.0, base=0.2)),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


class RedisStore:
    def __init__(self, client):
        self.r = client
        self._transition = client.register_script(_TRANSITION)
        self._add_items = client.register_script(_ADD_ITEMS)
        self._renew = client.register_script(_LEASE_RENEW)
        self._release = client.register_script(_LEASE_RELEASE)
        self._execution_swap = client.register_script(_EXECUTION_SWAP)
        self._refund = client.register_script(_REFUND_ATTEMPT)
        self._acquire_slot = client.register_script(_ACQUIRE_SLOT)
        self._finish_job = client.register_script(_FINISH_JOB)

    @classmethod
    def from_url(cls, url: str, retry_s: float = 120.0) -> RedisStore:
        """A store on a client of its own (tests and scripts; a process gets its store from jobs.services)."""
        return cls(redis_client(url, retry_s))

    def create_job(self, job: JobRecord) -> None:
        fields = _job_fields(job)
        pipe = self.r.pipeline()
        pipe.hset(keys.job_key(job.job_id), mapping=fields)
        pipe.zadd(keys.JOBS_INDEX, {job.job_id: _epoch(job.created_at)})
        if job.tenant is not None:
            pipe.zadd(keys.TENANT_JOBS.format(tenant=job.tenant), {job.job_id: _epoch(job.created_at)})
        pipe.execute()

    def add_items(self, items: list[ItemRecord]) -> None:
        by_job: dict[str, list[str | int]] = {}
        for item in items:
            terminal = int(item.status.terminal)
            by_job.setdefault(item.job_id, []).extend(
                [item.item_id, item.status, item.model_dump_json(), terminal, item.attempts]
            )
        for job_id, args in by_job.items():
            self._add_items(
                keys=[keys.job_key(job_id), keys.JOB_ORDER.format(job_id=job_id)],
                args=[keys.ITEM.format(job_id=job_id, item_id=""), *args],
            )

    def commit_job(self, job_id: str) -> None:
        self.r.hdel(keys.job_key(job_id), "submitting")

    def abort_submission(self, job_id: str) -> None:
        self.r.hset(keys.job_key(job_id), mapping={"submit_aborted": 1, "webhook_disabled": 1})

    def get_job(self, job_id: str) -> JobRecord | None:
        fields = self.r.hgetall(keys.job_key(job_id))
        return _job_from(fields) if fields else None

    def get_item(self, job_id: str, item_id: str) -> ItemRecord | None:
        fields = self.r.hgetall(keys.ITEM.format(job_id=job_id, item_id=item_id))
        return _item_from(fields) if fields else None

    def transition(self, item: ItemRecord, to: ItemStatus, *, count_attempt: bool = False) -> Transition:
        record = item.model_copy(update={"status": to})
        res = self._transition(
            keys=[keys.ITEM.format(job_id=item.job_id, item_id=item.item_id), keys.job_key(item.job_id)],
            args=[
                to.value,
                int(count_attempt),
                record.model_dump_json(),
                int(to.terminal),
                _TERMINAL,
                *allowed_sources(to),
            ],
        )
        applied, previous, attempts, done, total = res
        return Transition(applied == 1, previous or None, int(attempts), int(done), int(total))

    def refund_attempt(self, job_id: str, item_id: str) -> None:
        """Take back an attempt that object storage's outage cut short: it does not count toward max_attempts."""
        self._refund(keys=[keys.ITEM.format(job_id=job_id, item_id=item_id)])

    def finish_job(
        self, job_id: str, status: JobStatus, results_uri: str | None, at: str, round_: int | None = None
    ) -> bool:
        """Mark the job ended, once per round (False: it already was, or with `round_`, it is no longer in that
        round: a `retry` re-opened it), and publish that on keys.JOB_ENDED: one round trip, so its end is
        announced only once its fields are written."""
        channel = keys.JOB_ENDED.format(job_id=job_id)
        args = [status.value, at, results_uri or "", channel, "" if round_ is None else str(round_)]
        return self._finish_job(keys=[keys.job_key(job_id)], args=args) == 1

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

    def job_ids(self, limit: int = 50, tenant: str | None = None) -> list[str]:
        """The most recent job ids, newest first; `tenant`: only that tenant's."""
        index = keys.JOBS_INDEX if tenant is None else keys.TENANT_JOBS.format(tenant=tenant)
        return self.r.zrevrange(index, 0, limit - 1)

    def log_event(self, job_id: str, event_id: str, entry: dict[str, Any]) -> None:
        self.r.rpush(f"{keys.JOB_EVENTS.format(job_id=job_id)}:{event_id}", json.dumps(entry))
        self.r.sadd(keys.JOB_EVENTS.format(job_id=job_id), event_id)

    def events(self, job_id: str) -> dict[str, list[dict[str, Any]]]:
        base = keys.JOB_EVENTS.format(job_id=job_id)
        return {
            eid: [json.loads(e) for e in self.r.lrange(f"{base}:{eid}", 0, -1)] for eid in sorted(self.r.smembers(base))
        }

    def mark_sent(self, job_id: str, *event_ids: str) -> None:
        """Note that these events' webhook messages were published (after publishing them)."""
        if event_ids:
            self.r.sadd(keys.JOB_SENT.format(job_id=job_id), *event_ids)

    def was_sent(self, job_id: str, event_id: str) -> bool:
        return bool(self.r.sismember(keys.JOB_SENT.format(job_id=job_id), event_id))

    def sent_events(self, job_id: str) -> set[str]:
        """The events whose webhook messages were published (delivered, tried, or still on their way)."""
        return set(self.r.smembers(keys.JOB_SENT.format(job_id=job_id)))

    def nudge_finalize(self, job_id: str, ttl: float) -> bool:
        """True for one caller per `ttl` s: the one that may send the job a finalize on others' behalf."""
        return self.claim(keys.JOB_FINALIZE_NUDGE.format(job_id=job_id), ttl)

    def claim(self, key: str, ttl: float) -> bool:
        """True for the one caller that sets `key` until it expires (a periodic duty done by one process)."""
        return bool(self.r.set(key, "1", nx=True, px=int(ttl * 1000)))

    def acquire_lease(self, job_id: str, item_id: str, token: str, ttl: float) -> float:
        """0 when `token` now holds the item's lease; otherwise the seconds left on the holder's lease."""
        key = keys.ITEM_LEASE.format(job_id=job_id, item_id=item_id)
        if self.r.set(key, token, nx=True, px=int(ttl * 1000)) or self.r.get(key) == token:
            return 0.0
        return max(self.r.pttl(key), 1) / 1000

    def renew_lease(self, job_id: str, item_id: str, token: str, ttl: float) -> bool:
        key = keys.ITEM_LEASE.format(job_id=job_id, item_id=item_id)
        return bool(self._renew(keys=[key], args=[token, int(ttl * 1000)]))

    def release_lease(self, job_id: str, item_id: str, token: str) -> None:
        self._release(keys=[keys.ITEM_LEASE.format(job_id=job_id, item_id=item_id)], args=[token])

    # --- executions: which worker holds each item's message (worker.recovery) ------------------------
    def lease_held(self, job_id: str, item_id: str) -> bool:
        return bool(self.r.exists(keys.ITEM_LEASE.format(job_id=job_id, item_id=item_id)))

    def note_execution(self, job_id: str, item_id: str, worker: str) -> None:
        """`worker` holds the item's message now (it is running it, or about to)."""
        self.r.hset(keys.EXECUTIONS, keys.EXECUTION.format(job_id=job_id, item_id=item_id), worker)

    def pass_execution(self, job_id: str, item_id: str, worker: str, to: str | None) -> bool:
        """Hand the entry `worker` holds on to `to` ("": a message for the item is in the broker), or drop it
        (None); False when the entry no longer names `worker`."""
        args = [keys.EXECUTION.format(job_id=job_id, item_id=item_id), worker, to or "", "1" if to is None else "0"]
        return bool(self._execution_swap(keys=[keys.EXECUTIONS], args=args))

    def executions(self) -> dict[tuple[str, str], str]:
        """(job_id, item_id) → the worker holding its message ("": the broker holds it)."""
        out = {}
        for field, worker in self.r.hgetall(keys.EXECUTIONS).items():
            job_id, _, item_id = field.partition("/")
            out[(job_id, item_id)] = worker
        return out

    def worker_alive(self, name: str) -> bool:
        """Whether `name` sent a heartbeat within its TTL."""
        return bool(self.r.exists(keys.WORKER.format(name=name)))

    # --- the HTTP API: keys and idempotency records ---------------------------------------------
    def ping(self) -> bool:
        return bool(self.r.ping())

    def put_api_key(self, key: ApiKeyRecord) -> None:
        pipe = self.r.pipeline()
        pipe.set(keys.API_KEY.format(key_id=key.key_id), key.model_dump_json())
        pipe.zadd(keys.API_KEYS, {key.key_id: _epoch(key.created_at)})
        pipe.execute()

    def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        raw = self.r.get(keys.API_KEY.format(key_id=key_id))
        return ApiKeyRecord.model_validate_json(raw) if raw else None

    def api_keys(self) -> list[ApiKeyRecord]:
        ids = self.r.zrange(keys.API_KEYS, 0, -1)
        raws = self.r.mget([keys.API_KEY.format(key_id=i) for i in ids]) if ids else []
        return [ApiKeyRecord.model_validate_json(raw) for raw in raws if raw]

    def claim_idempotency(self, key_id: str, digest: str, fingerprint: str, ttl: int) -> dict[str, Any] | None:
        """Claim an Idempotency-Key for one request body. None: claimed now (go ahead); otherwise the
        record already there: {"fingerprint", "job_id"} (job_id None while the first request runs)."""
        key = keys.IDEMPOTENCY.format(key_id=key_id, digest=digest)
        if self.r.set(key, json.dumps({"fingerprint": fingerprint, "job_id": None}), nx=True, ex=ttl):
            return None
        raw = self.r.get(key)
        return json.loads(raw) if raw else {"fingerprint": fingerprint, "job_id": None}

    def settle_idempotency(self, key_id: str, digest: str, fingerprint: str, job_id: str | None, ttl: int) -> None:
        """Record the job a claimed key created; job_id None releases the claim (the request failed)."""
        key = keys.IDEMPOTENCY.format(key_id=key_id, digest=digest)
        if job_id is None:
            self.r.delete(key)
        else:
            self.r.set(key, json.dumps({"fingerprint": fingerprint, "job_id": job_id}), ex=ttl)

    def recent_request(self, key_id: str, digest: str) -> str | None:
        """The job a recent request with this digest made; "" while it is being made; None: none."""
        return self.r.get(keys.RECENT_REQUEST.format(key_id=key_id, digest=digest))

    def claim_recent_request(self, key_id: str, digest: str, ttl: float, *, replace: bool = False) -> bool:
        """Mark a request as being made ("" for `ttl` s). True when this caller holds the mark (always, with
        `replace`: a request that is no retry starts its own job whatever came before)."""
        key = keys.RECENT_REQUEST.format(key_id=key_id, digest=digest)
        return bool(self.r.set(key, "", nx=not replace, px=max(1, int(ttl * 1000))))

    def remember_request(self, key_id: str, digest: str, job_id: str | None, ttl: float) -> None:
        """Record the job a request made, for `ttl` s (a retry within it attaches); None forgets the request."""
        key = keys.RECENT_REQUEST.format(key_id=key_id, digest=digest)
        if job_id is None:
            self.r.delete(key)
        else:
            self.r.set(key, job_id, px=max(1, int(ttl * 1000)))

    def count_request(self, key_id: str, window: int) -> int:
        """Count one request of an API key in minute `window` (epoch s // 60); returns the count so far."""
        key = keys.RATE.format(key_id=key_id, window=window)
        pipe = self.r.pipeline()
        pipe.incr(key)
        pipe.expire(key, 120)
        return int(pipe.execute()[0])

    def put_upload(self, upload_id: str, record: dict[str, Any], ttl: int) -> None:
        self.r.set(keys.UPLOAD.format(upload_id=upload_id), json.dumps(record), ex=ttl)

    def get_upload(self, upload_id: str) -> dict[str, Any] | None:
        raw = self.r.get(keys.UPLOAD.format(upload_id=upload_id))
        return json.loads(raw) if raw else None

    # --- job control -----------------------------------------------------------------------
    def request_cancel(self, job_id: str, at: str) -> bool:
        """Raise the job's cancel flag; False when it was already raised."""
        return bool(self.r.hsetnx(keys.job_key(job_id), "cancel_requested", at))

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.r.hexists(keys.job_key(job_id), "cancel_requested"))

    def reopen_job(self, job_id: str, round_: int) -> None:
        """Clear the terminal mark (and any cancel flag) of a job whose failed items were re-queued."""
        key = keys.job_key(job_id)
        pipe = self.r.pipeline()
        pipe.hdel(key, "terminal", "finished_at", "results_uri", "cancel_requested")
        pipe.hset(key, "round", round_)
        pipe.execute()

    def acquire_slot(self, job_id: str, item_id: str, cap: int, lease_s: float) -> bool:
        """Take one of the job's `cap` running slots for `lease_s` seconds (a lost worker's lease runs out)."""
        now = time.time()
        return (
            self._acquire_slot(
                keys=[keys.JOB_SLOTS.format(job_id=job_id)], args=[now, item_id, cap, now + lease_s, lease_s]
            )
            == 1
        )

    def release_slot(self, job_id: str, item_id: str) -> None:
        self.r.zrem(keys.JOB_SLOTS.format(job_id=job_id), item_id)

    def record_step(self, job_id: str, item_id: str, step: int, steps: int) -> bool:
        """Note a running item's denoising progress; returns whether its job, or the item alone, was asked to
        cancel."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hexists(keys.job_key(job_id), "cancel_requested")
        pipe.hexists(keys.ITEM.format(job_id=job_id, item_id=item_id), "stop")
        pipe.hset(keys.JOB_STEPS.format(job_id=job_id), item_id, f"{step}/{steps}")  # (the one place steps live)
        if step <= 1:  # the first step of a run: the job's step record outlives a job nobody purges by a day
            pipe.expire(keys.JOB_STEPS.format(job_id=job_id), 86400)
        job_cancelled, item_stopped, *_ = pipe.execute()
        return bool(job_cancelled or item_stopped)

    def request_item_stop(self, job_id: str, item_id: str) -> None:
        """Ask a running item to stop at its next denoising step (`cancel` of that item alone)."""
        self.r.hset(keys.ITEM.format(job_id=job_id, item_id=item_id), "stop", 1)

    def clear_item_stop(self, job_id: str, item_ids: list[str]) -> None:
        pipe = self.r.pipeline(transaction=False)
        for item_id in item_ids:
            pipe.hdel(keys.ITEM.format(job_id=job_id, item_id=item_id), "stop")
        pipe.execute()

    def running_steps(self, job_id: str) -> dict[str, tuple[int, int]]:
        """Running items' denoising progress, {item id: (step, steps)}, in two round trips; items that have
        ended since they recorded a step are dropped from the record here."""
        key = keys.JOB_STEPS.format(job_id=job_id)
        recorded = self.r.hgetall(key)
        if not recorded:
            return {}
        pipe = self.r.pipeline(transaction=False)
        for item_id in recorded:
            pipe.hget(keys.ITEM.format(job_id=job_id, item_id=item_id), "status")
        running, gone = {}, []
        for (item_id, step), status in zip(recorded.items(), pipe.execute(), strict=True):
            if status == ItemStatus.RUNNING:
                running[item_id] = _step_pair(step)
            elif status != ItemStatus.QUEUED:  # (queued: retried, its next run records anew)
                gone.append(item_id)
        if gone:
            self.r.hdel(key, *gone)
        return running

    def add_gpu_seconds(self, job_id: str, seconds: float) -> None:
        """Count `seconds` of model time to the job (JobRecord.gpu_s)."""
        self.r.hincrbyfloat(keys.job_key(job_id), keys.JOB_GPU, round(seconds, 4))

    def progress_due(self, job_id: str, every: float) -> bool:
        """True for one caller per `every` s: the one that sends the job's next job.progress webhook event."""
        return self.claim(keys.JOB_PROGRESS_SENT.format(job_id=job_id), every)

    def step_of(self, job_id: str, item_id: str) -> str | None:
        """The last "step/steps" the item's run recorded (a running item's; see running_steps for a job's)."""
        return self.r.hget(keys.JOB_STEPS.format(job_id=job_id), item_id)

    # --- observability ------------------------------------------------------------------------
    def get_jobs(self, job_ids: list[str]) -> list[JobRecord]:
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(keys.job_key(job_id))
        return [_job_from(fields) for fields in pipe.execute() if fields]

    def list_lengths(self, names: list[str]) -> dict[str, int]:
        pipe = self.r.pipeline(transaction=False)
        for name in names:
            pipe.llen(name)
        return dict(zip(names, pipe.execute(), strict=True))

    def beat(self, name: str, info: dict[str, Any], ttl: float) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.set(keys.WORKER.format(name=name), json.dumps(info), px=int(ttl * 1000))
        pipe.sadd(keys.WORKERS, name)
        pipe.execute()

    def workers(self) -> list[dict[str, Any]]:
        """Live workers' last heartbeats; names whose heartbeat expired are forgotten."""
        names = sorted(self.r.smembers(keys.WORKERS))
        beats = self.r.mget([keys.WORKER.format(name=n) for n in names]) if names else []
        gone = [n for n, b in zip(names, beats, strict=True) if b is None]
        if gone:
            self.r.srem(keys.WORKERS, *gone)
        return [json.loads(b) for b in beats if b is not None]

    # --- retention: dropping an ended job's live state (jobs.retention) -------------------------------
    def jobs_created_before(self, epoch: float, start: int = 0, count: int = 1000) -> list[str]:
        """Ids of the jobs created before `epoch`, oldest first, `count` from `start`: those that may have ended
        long enough ago."""
        return self.r.zrangebyscore(keys.JOBS_INDEX, "-inf", epoch, start=start, num=count)

    def purge_job(self, job_id: str, note: dict[str, Any], note_ttl: float, chunk: int = 500) -> int:
        """Delete every live key of the job (its hash, items, leases, order, delivery log, sent set, slots) and
        leave `note` (what a read of it then says) for `note_ttl` s. Returns how many keys were deleted."""
        order, events = keys.JOB_ORDER.format(job_id=job_id), keys.JOB_EVENTS.format(job_id=job_id)
        job = self.get_job(job_id)  # (its tenant's job index lists it too)
        deleted, start = 0, 0
        while ids := self.r.lrange(order, start, start + chunk - 1):
            names = [keys.ITEM.format(job_id=job_id, item_id=i) for i in ids]
            deleted += self.r.unlink(*names, *(f"{n}:lease" for n in names))
            start += chunk
        logged = [f"{events}:{e}" for e in self.r.smembers(events)]
        for at in range(0, len(logged), chunk):
            deleted += self.r.unlink(*logged[at : at + chunk])
        pipe = self.r.pipeline()
        pipe.set(keys.PURGED.format(job_id=job_id), json.dumps(note), px=max(1, int(note_ttl * 1000)))
        pipe.zrem(keys.JOBS_INDEX, job_id)
        if job is not None and job.tenant is not None:
            pipe.zrem(keys.TENANT_JOBS.format(tenant=job.tenant), job_id)
        pipe.unlink(
            keys.job_key(job_id),
            order,
            events,
            keys.JOB_SENT.format(job_id=job_id),
            keys.JOB_SLOTS.format(job_id=job_id),
            keys.JOB_FINALIZE_NUDGE.format(job_id=job_id),
            keys.JOB_STEPS.format(job_id=job_id),
            keys.JOB_PROGRESS_SENT.format(job_id=job_id),
        )
        return deleted + int(pipe.execute()[-1])

    def purged(self, job_id: str) -> dict[str, Any] | None:
        """The note `purge_job` left for the job, or None."""
        raw = self.r.get(keys.PURGED.format(job_id=job_id))
        return json.loads(raw) if raw else None


class MemoryStore:
    """The same contract in one process's memory (local `run` mode). `on_step(job_id, item_id, step, steps)` hears
    each denoising step a running item reports (the local run's progress bar; it may raise to stop the item)."""

    def __init__(self, on_step: Callable[[str, str, int, int], None] | None = None):
        self.on_step = on_step
        self._lock = threading.Lock()
        self._jobs: dict[str, dict[str, Any]] = {}
        self._items: dict[tuple[str, str], dict[str, Any]] = {}
        self._order: dict[str, list[str]] = {}
        self._events: dict[str, dict[str, list[dict[str, Any]]]] = {}
        self._leases: dict[tuple[str, str], tuple[str, float]] = {}
        self._slots: dict[str, dict[str, float]] = {}
        self._sent: set[tuple[str, str]] = set()
        self._nudges: dict[str, float] = {}  # job id → when another finalize nudge may go
        self._beats: dict[str, tuple[dict[str, Any], float]] = {}  # worker name → (heartbeat, expiry)
        self._steps: dict[str, dict[str, tuple[int, int]]] = {}  # job id → item id → (step, steps)
        self._progress: dict[str, float] = {}  # job id → when its next job.progress event may go

    def beat(self, name: str, info: dict[str, Any], ttl: float) -> None:
        with self._lock:
            self._beats[name] = (info, time.monotonic() + ttl)

    def workers(self) -> list[dict[str, Any]]:
        with self._lock:
            now = time.monotonic()
            return [info for _, (info, until) in sorted(self._beats.items()) if until > now]

    def create_job(self, job: JobRecord) -> None:
        with self._lock:
            self._jobs[job.job_id] = _job_fields(job)
            self._order[job.job_id] = []

    def commit_job(self, job_id: str) -> None:
        with self._lock:
            self._jobs[job_id].pop("submitting", None)

    def abort_submission(self, job_id: str) -> None:
        with self._lock:
            self._jobs[job_id].update(submit_aborted=1, webhook_disabled=1)

    def add_items(self, items: list[ItemRecord]) -> None:
        with self._lock:
            for item in items:
                if (item.job_id, item.item_id) in self._items:
                    continue
                self._items[(item.job_id, item.item_id)] = {
                    "status": item.status,
                    "attempts": item.attempts,
                    "record": item.model_dump_json(),
                }
                self._order[item.job_id].append(item.item_id)
                self._jobs[item.job_id][f"n_{item.status}"] += 1
                self._jobs[item.job_id]["done"] += int(item.status.terminal)

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
            fields["record"] = item.model_copy(update={"status": to}).model_dump_json()
            fields["attempts"] += int(count_attempt)
            job[f"n_{cur}"] -= 1
            job[f"n_{to.value}"] += 1
            job["done"] += int(to.terminal) - int(ItemStatus(cur).terminal)
            return Transition(True, cur, fields["attempts"], job["done"], job["total"])

    def refund_attempt(self, job_id: str, item_id: str) -> None:
        with self._lock:
            fields = self._items.get((job_id, item_id))
            if fields is not None and fields["attempts"] > 0:
                fields["attempts"] -= 1

    def finish_job(
        self, job_id: str, status: JobStatus, results_uri: str | None, at: str, round_: int | None = None
    ) -> bool:
        with self._lock:
            job = self._jobs[job_id]
            if job.get("terminal") or (round_ is not None and int(job.get("round", 0)) != round_):
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

    def mark_sent(self, job_id: str, *event_ids: str) -> None:
        with self._lock:
            self._sent.update((job_id, e) for e in event_ids)

    def was_sent(self, job_id: str, event_id: str) -> bool:
        return (job_id, event_id) in self._sent

    def nudge_finalize(self, job_id: str, ttl: float) -> bool:
        with self._lock:
            now = time.monotonic()
            if self._nudges.get(job_id, 0.0) > now:
                return False
            self._nudges[job_id] = now + ttl
            return True

    def acquire_lease(self, job_id: str, item_id: str, token: str, ttl: float) -> float:
        with self._lock:
            holder, until = self._leases.get((job_id, item_id), (None, 0.0))
            now = time.monotonic()
            if holder in (None, token) or until <= now:
                self._leases[(job_id, item_id)] = (token, now + ttl)
                return 0.0
            return until - now

    def renew_lease(self, job_id: str, item_id: str, token: str, ttl: float) -> bool:
        with self._lock:
            holder, until = self._leases.get((job_id, item_id), (None, 0.0))
            if holder != token or until <= time.monotonic():
                return False
            self._leases[(job_id, item_id)] = (token, time.monotonic() + ttl)
            return True

    def release_lease(self, job_id: str, item_id: str, token: str) -> None:
        with self._lock:
            if self._leases.get((job_id, item_id), (None,))[0] == token:
                del self._leases[(job_id, item_id)]

    def request_cancel(self, job_id: str, at: str) -> bool:
        with self._lock:
            job = self._jobs[job_id]
            if job.get("cancel_requested"):
                return False
            job["cancel_requested"] = at
            return True

    def cancel_requested(self, job_id: str) -> bool:
        with self._lock:
            return bool(self._jobs.get(job_id, {}).get("cancel_requested"))

    def reopen_job(self, job_id: str, round_: int) -> None:
        with self._lock:
            job = self._jobs[job_id]
            for field in ("terminal", "finished_at", "results_uri", "cancel_requested"):
                job.pop(field, None)
            job["round"] = round_

    def acquire_slot(self, job_id: str, item_id: str, cap: int, lease_s: float) -> bool:
        with self._lock:
            now = time.time()
            slots = {i: t for i, t in self._slots.get(job_id, {}).items() if t > now}
            if item_id not in slots and len(slots) >= cap:
                return False
            slots[item_id] = now + lease_s
            self._slots[job_id] = slots
            return True

    def release_slot(self, job_id: str, item_id: str) -> None:
        with self._lock:
            self._slots.get(job_id, {}).pop(item_id, None)

    def record_step(self, job_id: str, item_id: str, step: int, steps: int) -> bool:
        with self._lock:
            self._steps.setdefault(job_id, {})[item_id] = (step, steps)
        if self.on_step is not None:
            self.on_step(job_id, item_id, step, steps)
        with self._lock:
            stopped = bool(self._items.get((job_id, item_id), {}).get("stop"))
        return self.cancel_requested(job_id) or stopped

    def request_item_stop(self, job_id: str, item_id: str) -> None:
        with self._lock:
            self._items[(job_id, item_id)]["stop"] = True

    def clear_item_stop(self, job_id: str, item_ids: list[str]) -> None:
        with self._lock:
            for item_id in item_ids:
                self._items.get((job_id, item_id), {}).pop("stop", None)

    def running_steps(self, job_id: str) -> dict[str, tuple[int, int]]:
        with self._lock:
            steps = self._steps.get(job_id, {})
            running = {
                i: s for i, s in steps.items() if self._items.get((job_id, i), {}).get("status") == ItemStatus.RUNNING
            }
            self._steps[job_id] = {
                i: s
                for i, s in steps.items()
                if self._items.get((job_id, i), {}).get("status") in (ItemStatus.RUNNING, ItemStatus.QUEUED)
            }
            return running

    def add_gpu_seconds(self, job_id: str, seconds: float) -> None:
        with self._lock:
            job = self._jobs[job_id]
            job[keys.JOB_GPU] = float(job.get(keys.JOB_GPU, 0)) + round(seconds, 4)

    def progress_due(self, job_id: str, every: float) -> bool:
        with self._lock:
            now = time.monotonic()
            if self._progress.get(job_id, 0.0) > now:
                return False
            self._progress[job_id] = now + every
            return True

    def purged(self, job_id: str) -> dict[str, Any] | None:
        return None  # (a local run's jobs live as long as the run: nothing purges them)


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
    and the last run's summary. (The durable ledger of what was edited lives in S3: jobs.catalog.ledger.)"""

    def __init__(self, client):
        self.r = client
        self._renew = client.register_script(_RENEW_LOCK)
        self._release = client.register_script(_RELEASE_LOCK)

    @classmethod
    def from_url(cls, url: str, retry_s: float = 120.0) -> ScheduleState:
        """Schedule state on a client of its own (tests and scripts; a process's comes from jobs.services)."""
        return cls(redis_client(url, retry_s))

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
