"""A GPU worker that dies (SIGKILL, the OOM killer, a SIGTERM past its grace) leaves its items' messages
unacknowledged for the broker's visibility timeout, an hour by default. worker.recovery queues them again
once their execution leases expired and their worker's heartbeat stopped: here within seconds (short lease
and heartbeat settings), with the default visibility timeout left as it is."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from ledger import check_ledger
from services import cli, s3_client, service_env, wait_until

from jobs.lifecycle import ItemStatus
from jobs.models import ItemRecord, JobRecord
from jobs.store import RedisStore
from worker.recovery import Recovery

pytestmark = pytest.mark.timeout(300)

GPU = ("worker", "--model", "i1-fast", "--weights", "tiny", "--device", "cpu")
# leases expire 3 s after their worker dies, heartbeats every 0.5 s, a scan every second; the visibility
# timeout keeps its default (4,200 s): nothing here waits for Redis to restore a message
# (DREAMBATCH_TEST_DEFAULT_RECOVERY=1 runs them with the default settings instead, to measure them: ~2 min)
DEFAULT_VISIBILITY = {  # the settings' defaults, over tests/services.py's short test values
    "DREAMBATCH_CELERY__VISIBILITY_TIMEOUT": "4200",
    "DREAMBATCH_CELERY__TASK_TIME_LIMIT": "3000",
}
QUICK_RECOVERY = (
    DEFAULT_VISIBILITY
    if os.environ.get("DREAMBATCH_TEST_DEFAULT_RECOVERY")
    else {
        **DEFAULT_VISIBILITY,
        "DREAMBATCH_CELERY__LEASE_TTL": "3",
        "DREAMBATCH_CELERY__HEARTBEAT": "0.5",
        "DREAMBATCH_CELERY__RECOVERY_INTERVAL": "1",
    }
)


def submit(env, ids: list[str], path: Path, output: str, steps: int) -> str:
    path.write_text(
        "".join(json.dumps({"id": i, "prompt": f"product {i}", "seed": n}) + "\n" for n, i in enumerate(ids))
    )
    res = cli(
        "submit", str(path), "--model", "i1-fast", "--set", f"steps={steps}", "--output", output, "--json", env=env
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)["job_id"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm-past-grace"])
def test_a_dead_workers_items_run_again_long_before_the_visibility_timeout(
    redis_server, s3_endpoint, tiny_dir, bucket, start_worker, tmp_path, sig
):
    env = service_env(redis_server.url, s3_endpoint, tiny_dir, **QUICK_RECOVERY)
    io = start_worker("worker", "--io", **QUICK_RECOVERY)
    doomed = start_worker(*GPU, "--concurrency", "2", **QUICK_RECOVERY)
    doomed.wait_ready()
    io.wait_ready()
    ids = [f"r{n}" for n in range(6)]
    job_id = submit(env, ids, tmp_path / "r.jsonl", f"s3://{bucket}/r", 40)
    store = RedisStore.from_url(redis_server.url)
    wait_until(lambda: store.get_job(job_id).counts["running"] >= 1, 90, 0.05, what="an item running")
    if sig == signal.SIGTERM:  # warm shutdown begins; the supervisor's grace runs out and it SIGKILLs it
        doomed.proc.send_signal(signal.SIGTERM)
    doomed.kill(signal.SIGKILL)
    killed_at = time.monotonic()
    stranded = [i.item_id for i in store.items(job_id) if i.status == "running"]
    assert stranded, "the test needs an item left running by the dead worker"

    replacement = start_worker(*GPU, "--concurrency", "2", **QUICK_RECOVERY)
    wait_until(
        lambda: all(store.get_item(job_id, i).status.terminal for i in stranded), 240, 0.25, what="stranded items"
    )
    print(f"\n{len(stranded)} stranded item(s) ended {time.monotonic() - killed_at:.0f}s after the kill")
    job = wait_until(lambda: (j := store.get_job(job_id)).finished_at and j, 150, 0.25, what="the job to end")
    assert job.status == "completed", job.counts
    ledger = check_ledger(s3_client(s3_endpoint), bucket, "r", job_id, ids)
    assert ledger.extra_attempts >= 1  # the stranded items ran again, once each
    logs = io.log.read_text() + replacement.log.read_text()
    for item_id in stranded:
        assert f"item {job_id}/{item_id} was running on worker gpu-i1-fast." in logs, logs[-4000:]
    assert "lost the lease" not in logs  # no execution ever ran without its lease: never two at once
    assert store.r.hlen("db:executions") == 0  # every message that was held is accounted for


def _job(job_id: str) -> JobRecord:
    return JobRecord(
        job_id=job_id,
        model="i1-fast",
        output="s3://b/x",
        total=1,
        created_at="2026-12-01T00:00:00+00:00",
        updated_at="2026-12-01T00:00:00+00:00",
    )


def test_an_item_is_queued_again_only_when_its_lease_is_gone_its_worker_silent_and_it_has_not_ended(redis_server):
    """The scan's rules, one at a time, against a real Redis: a held lease or a live heartbeat keeps an item
    where it is; a dead worker's item waits `settle` seconds, then goes back to the queue once; an ended item's
    entry is dropped."""
    store = RedisStore.from_url(redis_server.url)  # the test's own database
    store.r.flushdb()
    published: list[tuple[str, list[str]]] = []
    recovery = Recovery(store, lambda job, ids: published.append((job.job_id, ids)), settle=5.0)
    job = _job("jr")
    store.create_job(job)
    item = ItemRecord(job_id="jr", item_id="a", line=1, params={}, created_at=job.created_at, updated_at=job.created_at)
    store.add_items([item])
    store.transition(item, ItemStatus.RUNNING, count_attempt=True)
    store.note_execution("jr", "a", "gpu-1")

    store.acquire_lease("jr", "a", "tok", 30)  # 1. a live execution: left alone, however long
    assert recovery.scan(now=0) == [] and recovery.scan(now=100) == []
    store.release_lease("jr", "a", "tok")
    store.beat("gpu-1", {"name": "gpu-1"}, ttl=30)  # 2. its worker is alive (it holds the message): left alone
    assert recovery.scan(now=200) == []
    store.r.delete("db:worker:gpu-1")  # 3. lease gone, worker silent: it waits out `settle`, then goes back once
    assert recovery.scan(now=300) == []
    assert recovery.scan(now=304) == []
    assert recovery.scan(now=306) == [("jr", "a")]
    assert published == [("jr", ["a"])]
    assert store.executions() == {("jr", "a"): ""}  # the broker holds its message now: not published again
    assert recovery.scan(now=400) == [] and len(published) == 1

    store.note_execution("jr", "a", "gpu-2")  # 4. the new message ran on gpu-2, which ended it, then died
    store.transition(item, ItemStatus.COMPLETED)
    assert recovery.scan(now=500) == [] and store.executions() == {}
    store.note_execution("jr", "a", "")  # a message the broker held for it, once the item ended, is forgotten too
    assert recovery.scan(now=600) == [] and store.executions() == {}
    assert len(published) == 1
