"""Workers that die, stop or run long: SIGKILL mid-item, a poison item, SIGTERM, and an item that
outlives the broker's visibility timeout. Each scenario ends with the ledger check."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest
from ledger import check_ledger
from services import cli, s3_client, service_env, wait_until

from jobs.store import RedisStore

pytestmark = pytest.mark.timeout(300)

GPU = ("worker", "--model", "i1-fast", "--weights", "tiny", "--device", "cpu")
POISON = [sys.executable, str(Path(__file__).with_name("poison_worker.py"))]
# redeliveries within seconds: an unacked task comes back after 4 s, leases expire after 3 s
FAST_REDELIVERY = {
    "DREAMBATCH_CELERY__VISIBILITY_TIMEOUT": "4",
    "DREAMBATCH_CELERY__TASK_TIME_LIMIT": "3",
    "DREAMBATCH_CELERY__LEASE_TTL": "3",
    "DREAMBATCH_CELERY__RESTORE_INTERVAL": "1",
    "DREAMBATCH_WEBHOOKS__BACKOFF_MAX": "1",
}


def manifest(path: Path, ids: list[str], poison: str | None = None) -> Path:
    path.write_text(
        "".join(
            json.dumps({"id": i, "prompt": "poison" if i == poison else f"product {i}", "seed": n}) + "\n"
            for n, i in enumerate(ids)
        )
    )
    return path


def submit(env, path: Path, output: str, steps: int) -> str:
    res = cli(
        "submit", str(path), "--model", "i1-fast", "--set", f"steps={steps}", "--output", output, "--json", env=env
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)["job_id"]


def wait_end(store: RedisStore, job_id: str, timeout: float):
    return wait_until(
        lambda: (j := store.get_job(job_id)) and j.finished_at and j, timeout, 0.25, what=f"job {job_id} to end"
    )


def only_the_poison_failed(s3_endpoint: str, bucket: str, prefix: str, job, ids: list[str]) -> dict:
    """The ledger of a poison job: every row completed but "poison", which failed; returns its results line."""
    ledger = check_ledger(
        s3_client(s3_endpoint),
        bucket,
        prefix,
        job.job_id,
        ids,
        expect={i: "failed" if i == "poison" else "completed" for i in ids},
    )
    assert job.status == "completed" and job.counts["failed"] == 1
    return next(x for x in ledger.lines if x["id"] == "poison")


def test_worker_sigkilled_mid_item_is_redelivered_and_the_ledger_balances(
    redis_server, s3_endpoint, tiny_dir, bucket, start_worker, tmp_path
):
    env = service_env(redis_server.url, s3_endpoint, tiny_dir, **FAST_REDELIVERY)
    io = start_worker("worker", "--io", **FAST_REDELIVERY)
    first = start_worker(*GPU, "--concurrency", "1", **FAST_REDELIVERY)
    first.wait_ready()
    io.wait_ready()
    ids = [f"k{n}" for n in range(6)]
    job_id = submit(env, manifest(tmp_path / "k.jsonl", ids), f"s3://{bucket}/k", 12)
    store = RedisStore.from_url(redis_server.url)
    wait_until(lambda: store.get_job(job_id).counts["running"] >= 1, 60, 0.05, what="an item running")
    first.kill(signal.SIGKILL)
    assert store.get_job(job_id).counts["completed"] < 6

    start_worker(*GPU, **FAST_REDELIVERY).wait_ready()
    assert wait_end(store, job_id, 180).status == "completed"
    ledger = check_ledger(s3_client(s3_endpoint), bucket, "k", job_id, ids)
    assert ledger.extra_attempts >= 1  # the item in flight ran again, once more, harmlessly


def test_an_item_that_kills_its_model_process_every_time_ends_failed_and_the_worker_goes_on(
    redis_server, s3_endpoint, tiny_dir, bucket, start_worker, tmp_path
):
    cfg = {**FAST_REDELIVERY, "DREAMBATCH_CELERY__MAX_ATTEMPTS": "2"}
    env = service_env(redis_server.url, s3_endpoint, tiny_dir, **cfg)
    start_worker("worker", "--io", **cfg).wait_ready()
    gpu = start_worker(*GPU, "--concurrency", "1", program=POISON, POISON_KILLS="model", **cfg)
    gpu.wait_ready()
    ids = ["a", "poison", "b", "c"]
    job_id = submit(env, manifest(tmp_path / "m.jsonl", ids, poison="poison"), f"s3://{bucket}/m", 2)
    store = RedisStore.from_url(redis_server.url)
    job = wait_end(store, job_id, 180)
    assert gpu.proc.poll() is None  # the worker itself never went down
    assert gpu.log.read_text().count("exited with code -9") == 2  # a new model process for the second try
    poison = only_the_poison_failed(s3_endpoint, bucket, "m", job, ids)
    assert "the model process exited (code -9)" in poison["error"] and "(after 2 attempts)" in poison["error"]


def test_an_item_that_kills_its_worker_every_time_ends_failed_and_the_rest_complete(
    redis_server, s3_endpoint, tiny_dir, bucket, start_worker, tmp_path
):
    cfg = {**FAST_REDELIVERY, "DREAMBATCH_CELERY__MAX_ATTEMPTS": "2", "POISON_KILLS": "worker"}
    env = service_env(redis_server.url, s3_endpoint, tiny_dir, **cfg)
    start_worker("worker", "--io", **cfg).wait_ready()
    ids = ["a", "b", "poison", "c"]
    job_id = submit(env, manifest(tmp_path / "p.jsonl", ids, poison="poison"), f"s3://{bucket}/p", 2)
    store = RedisStore.from_url(redis_server.url)
    deaths = 0
    deadline = time.monotonic() + 200
    while not (store.get_job(job_id).finished_at) and time.monotonic() < deadline:
        w = start_worker(*GPU, "--concurrency", "1", program=POISON, **cfg)  # a supervisor restarting it
        while w.proc.poll() is None and not store.get_job(job_id).finished_at:
            time.sleep(0.2)
        if w.proc.poll() is not None:
            assert w.proc.returncode == -signal.SIGKILL, w.log.read_text()[-2000:]
            deaths += 1
        w.kill()
    job = wait_end(store, job_id, 5)
    assert deaths == 2  # it took down its worker max_attempts times, then stopped looping
    poison = only_the_poison_failed(s3_endpoint, bucket, "p", job, ids)
    assert "gave up after 2 attempts" in poison["error"]


def test_sigterm_finishes_the_running_item_and_leaves_the_rest_queued(
    redis_server, s3_endpoint, tiny_dir, bucket, start_worker, tmp_path
):
    env = service_env(redis_server.url, s3_endpoint, tiny_dir)
    start_worker("worker", "--io").wait_ready()
    gpu = start_worker(*GPU, "--concurrency", "1")
    gpu.wait_ready()
    ids = [f"t{n}" for n in range(4)]
    job_id = submit(env, manifest(tmp_path / "t.jsonl", ids), f"s3://{bucket}/t", 30)
    store = RedisStore.from_url(redis_server.url)
    running = wait_until(
        lambda: next((i for i in store.items(job_id) if i.status == "running"), None), 60, 0.05, what="an item running"
    )
    gpu.proc.send_signal(signal.SIGTERM)  # warm shutdown: the item in hand is finished first
    assert gpu.proc.wait(120) == 0, gpu.log.read_text()[-3000:]
    after = store.get_item(job_id, running.item_id)
    assert after.status == "completed" and after.attempts == 1
    statuses = {i.item_id: i.status for i in store.items(job_id)}
    assert "running" not in statuses.values(), statuses  # nothing was left half-done
    assert "queued" in statuses.values(), statuses  # it stopped taking work

    start_worker(*GPU).wait_ready()
    wait_end(store, job_id, 180)
    ledger = check_ledger(s3_client(s3_endpoint), bucket, "t", job_id, ids)
    assert ledger.extra_attempts == 0  # nothing acknowledged unfinished, nothing run twice


def test_an_item_running_past_the_visibility_timeout_is_not_run_twice_at_once(
    redis_server, s3_endpoint, tiny_dir, bucket, start_worker, tmp_path
):
    env = service_env(redis_server.url, s3_endpoint, tiny_dir, **FAST_REDELIVERY)
    start_worker("worker", "--io", **FAST_REDELIVERY).wait_ready()
    cfg = {**FAST_REDELIVERY, "DREAMBATCH_CELERY__VISIBILITY_TIMEOUT": "2", "DREAMBATCH_CELERY__TASK_TIME_LIMIT": "1"}
    gpu = start_worker(*GPU, "--concurrency", "2", **cfg)  # a free thread takes the redelivery
    gpu.wait_ready()
    path = tmp_path / "v.jsonl"
    path.write_text(
        json.dumps(
            {
                "id": "slow",
                "prompt": "a long one",
                "seed": 1,
                "width": 1024,
                "height": 1024,
                "steps": 150,
                "num_images": 3,
            }
        )
        + "\n"
    )
    job_id = submit(env, path, f"s3://{bucket}/v", 150)
    store = RedisStore.from_url(redis_server.url)
    job = wait_end(store, job_id, 240)
    assert job.status == "completed"
    ledger = check_ledger(s3_client(s3_endpoint), bucket, "v", job_id, ["slow"])
    assert ledger.extra_attempts == 0  # one execution, though…
    log = gpu.log.read_text()
    assert "is running elsewhere" in log, log[-3000:]  # …the item was delivered again while it ran
    item = store.get_item(job_id, "slow")
    assert item.timings.inference_s > 2, "the item must outlive the 2 s visibility timeout for this test to mean much"
