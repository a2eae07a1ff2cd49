"""A synchronous route's wait (jobs.api.service.wait_for) answers as its job ends: finish_job announces the end
on Redis and the app's one listener wakes the waiter, whatever its poll interval; a job that does not end still
times out. On a real redis-server, the job ended from another thread as a worker would."""

from __future__ import annotations

import logging
import os
import threading
import time

import anyio
import pytest
import redis
from services import RedisServer

from jobs.api.service import Endings, StillRunning, wait_for
from jobs.lifecycle import JobStatus
from jobs.models import JobRecord
from jobs.services import Services
from jobs.settings import Settings
from jobs.store import RedisStore, listen_for_endings

pytestmark = pytest.mark.timeout(60)
LONG_POLL = 5.0  # the waits below would sleep this long between reads if nothing woke them


def _queued_job(svc: Services) -> str:
    job_id = f"w-{os.urandom(4).hex()}"
    at = "2026-12-02T00:00:00+00:00"
    svc.store.create_job(
        JobRecord(job_id=job_id, model="i1-fast", output="s3://b/p", total=1, created_at=at, updated_at=at)
    )
    return job_id


async def _listening(url: str, endings: Endings, tasks) -> None:
    """Start the listener and return once it has subscribed (Redis counts one more pattern)."""
    probe = redis.Redis.from_url(url)
    before = probe.pubsub_numpat()
    tasks.start_soon(listen_for_endings, url, endings.ended, logging.getLogger("dreambatch.api"))
    with anyio.fail_after(5):
        while probe.pubsub_numpat() <= before:
            await anyio.sleep(0.01)


async def _woken(url: str, endings: Endings) -> tuple[JobRecord, float]:
    """Wait for a fresh job that another thread ends 0.3 s in (as a worker does); the job and the seconds from
    its finish_job to the wait's return."""
    svc = Services(Settings(redis_url=url))
    job_id = _queued_job(svc)
    ended_at: list[float] = []

    def finish_as_a_worker_does() -> None:
        time.sleep(0.3)
        ended_at.append(time.monotonic())
        RedisStore.from_url(url).finish_job(job_id, JobStatus.COMPLETED, None, "2026-12-02T00:00:01+00:00")

    threading.Thread(target=finish_as_a_worker_does, daemon=True).start()
    job = await wait_for(svc, job_id, timeout=30, interval=LONG_POLL, endings=endings)
    return job, time.monotonic() - ended_at[0]


def test_a_waiter_returns_as_its_job_ends_not_at_its_next_poll(redis_server):
    async def main() -> tuple[JobRecord, float]:
        endings = Endings()
        async with anyio.create_task_group() as tasks:
            await _listening(redis_server.url, endings, tasks)
            found = await _woken(redis_server.url, endings)
            tasks.cancel_scope.cancel()
        return found

    job, late = anyio.run(main)
    assert job.status == "completed" and job.finished_at == "2026-12-02T00:00:01+00:00"
    assert late < 0.1  # not the 5 s poll


def test_an_idle_listener_leaves_redis_alone(tmp_path):
    """Between announcements the listener only waits (a PING every 15 s); it once answered its own PONG with
    the next PING, thousands a second."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        probe = server.client()

        async def main() -> int:
            async with anyio.create_task_group() as tasks:
                await _listening(server.url, Endings(), tasks)
                before = probe.info("stats")["total_commands_processed"]
                await anyio.sleep(1.0)
                during = probe.info("stats")["total_commands_processed"] - before
                tasks.cancel_scope.cancel()
            return during

        assert anyio.run(main) <= 3  # (the probe's own INFO)
    finally:
        server.stop()


def test_the_listener_hears_job_ends_again_once_a_restarted_redis_answers(tmp_path):
    server = RedisServer(tmp_path)
    server.start()

    async def main() -> float:
        endings = Endings()
        async with anyio.create_task_group() as tasks:
            await _listening(server.url, endings, tasks)
            server.stop()
            await anyio.sleep(0.5)  # the listener finds Redis gone and retries with backoff
            server.start()
            with anyio.fail_after(10):
                while not redis.Redis.from_url(server.url).pubsub_numpat():
                    await anyio.sleep(0.05)
            _, late = await _woken(server.url, endings)
            tasks.cancel_scope.cancel()
        return late

    try:
        assert anyio.run(main) < 0.1
    finally:
        server.stop()


def test_a_waiter_whose_job_never_ends_still_times_out_with_its_latest_state(redis_server):
    svc = Services(Settings(redis_url=redis_server.url))
    job_id = _queued_job(svc)

    async def main() -> pytest.ExceptionInfo[StillRunning]:
        endings = Endings()
        async with anyio.create_task_group() as tasks:
            await _listening(redis_server.url, endings, tasks)
            with pytest.raises(StillRunning) as still:
                await wait_for(svc, job_id, timeout=0.5, interval=LONG_POLL, endings=endings)
            tasks.cancel_scope.cancel()
        return still

    started = time.monotonic()
    still = anyio.run(main)
    assert 0.5 <= time.monotonic() - started < 2.0
    assert still.value.job.job_id == job_id and still.value.job.finished_at is None
    assert "keeps running" in still.value.message
