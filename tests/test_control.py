"""Operating jobs with real parts: cancel a running job, retry only its failed items, resume after lost
messages, priorities on one worker, the per-job concurrency cap, deadlines, and the metrics endpoints.

Redis, S3 (moto's server), webhooks and Celery workers on tiny HiDream weights are real processes; items
use 1–2 steps except where a test needs an item that is still running when it acts."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image
from services import cli, s3_client, service_env, wait_until

from jobs.store import RedisStore

pytestmark = pytest.mark.timeout(300)

TINY_I1 = ("worker", "--model", "i1-fast", "--weights", "tiny", "--device", "cpu")


@pytest.fixture
def env(redis_server, s3_endpoint, tiny_dir):
    return service_env(redis_server.url, s3_endpoint, tiny_dir)


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def submit(manifest: Path, env, *args: str, model: str = "i1-fast") -> str:
    res = cli("submit", str(manifest), "--model", model, "--set", "steps=1", "--json", *args, env=env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)["job_id"]


def wait_job(store: RedisStore, job_id: str, timeout: float = 120):
    return wait_until(lambda: (j := store.get_job(job_id)) and j.finished_at and j, timeout, 0.1,
                      what=f"job {job_id} to end")


def results(s3_endpoint: str, bucket: str, key: str) -> dict[str, dict]:
    body = s3_client(s3_endpoint).get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    return {line["id"]: line for line in map(json.loads, body.splitlines())}


# --- cancel ------------------------------------------------------------------------------------
def test_cancel_stops_the_running_item_at_a_step_ends_queued_ones_and_keeps_written_outputs(
        env, bucket, receiver, start_worker, redis_server, s3_endpoint, tmp_path):
    io_worker = start_worker("worker", "--io")
    gpu = start_worker(*TINY_I1, "--concurrency", "1")
    gpu.wait_ready()
    io_worker.wait_ready()
    # one quick item, then a long one (150 steps) that is running when the cancel comes, then three more
    rows = [{"id": "a0", "prompt": "quick"}, {"id": "a1", "prompt": "long", "steps": 150}]
    rows += [{"id": f"a{n}", "prompt": f"later {n}"} for n in range(2, 5)]
    job_id = submit(write_rows(tmp_path / "c.jsonl", rows), env, "--output", f"s3://{bucket}/c",
                    "--webhook", receiver.url)
    store = RedisStore.from_url(redis_server.url)
    wait_until(lambda: store.step_of(job_id, "a1"), 120, 0.02, what="a1 past its first denoising step")

    res = cli("cancel", job_id, "--json", env=env)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["counts"]["cancelled"] == 3  # the queued ones, at once

    job = wait_job(store, job_id)
    assert job.status == "cancelled" and job.cancel_requested
    items = {i.item_id: i for i in store.items(job_id)}
    assert items["a0"].status == "completed"
    assert items["a1"].status == "cancelled" and items["a1"].reason == "cancelled" and items["a1"].output is None
    done, steps = map(int, store.step_of(job_id, "a1").split("/"))
    assert steps == 150 and done < 150  # stopped at a step boundary, not run to the end
    for n in range(2, 5):
        assert items[f"a{n}"].status == "cancelled" and items[f"a{n}"].attempts == 0  # never started

    # the output written before the cancel is kept and listed in the results
    lines = results(s3_endpoint, bucket, f"c/{job_id}/results.jsonl")
    assert [lines[f"a{n}"]["status"] for n in range(5)] == ["completed"] + ["cancelled"] * 4
    kept = lines["a0"]["output"]["images"][0]["s3_uri"]
    s3_client(s3_endpoint).head_object(Bucket=bucket, Key=kept.removeprefix(f"s3://{bucket}/"))
    assert lines["a1"]["reason"] == "cancelled" and lines["a1"]["output"]["images"] == []

    # webhooks: the job's cancelled event, and one per cancelled item
    wait_until(lambda: any(h["json"]["type"] == "job.cancelled" for h in receiver.delivered()), 30,
               what="job.cancelled webhook")
    wait_until(lambda: len([h for h in receiver.delivered() if h["json"]["type"] == "item.cancelled"]) == 4, 30,
               what="four item.cancelled webhooks")

    # cancelling again is a no-op
    again = cli("cancel", job_id, "--json", env=env)
    assert again.returncode == 0 and json.loads(again.stdout)["status"] == "cancelled"


# --- retry -------------------------------------------------------------------------------------
def _png(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 32), color).save(buf, "PNG")
    return buf.getvalue()


def test_retry_requeues_only_the_failed_items_in_the_same_job_and_finalizes_again(
        env, bucket, receiver, start_worker, redis_server, s3_endpoint, tmp_path):
    gpu = start_worker("worker", "--model", "e1-1", "--weights", "tiny", "--device", "cpu")
    io_worker = start_worker("worker", "--io")
    s3 = s3_client(s3_endpoint)
    s3.put_object(Bucket=bucket, Key="in/red.png", Body=_png("red"))
    rows = [{"id": "e0", "image": f"s3://{bucket}/in/red.png", "instruction": "make it blue"},
            {"id": "e1", "image": f"s3://{bucket}/in/late.png", "instruction": "make it blue"},  # not there yet
            {"id": "e2", "image": f"s3://{bucket}/in/red.png", "instruction": "make it green"},
            {"id": "bad", "image": f"s3://{bucket}/in/red.png"}]  # no instruction: rejected at submit
    gpu.wait_ready()
    io_worker.wait_ready()
    job_id = submit(write_rows(tmp_path / "e.jsonl", rows), env, "--output", f"s3://{bucket}/e", "--webhook",
                    receiver.url, "--skip-invalid", model="e1-1")
    store = RedisStore.from_url(redis_server.url)
    first = wait_job(store, job_id)
    assert first.status == "completed" and first.counts["completed"] == 2 and first.counts["failed"] == 2
    assert "no such object" in store.get_item(job_id, "e1").error
    before = {i.item_id: i for i in store.items(job_id)}

    s3.put_object(Bucket=bucket, Key="in/late.png", Body=_png("blue"))
    res = cli("retry", job_id, "--json", env=env)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["requeued"] == ["e1"]  # not the completed ones, not the rejected row

    job = wait_job(store, job_id)
    assert job.status == "completed" and job.round == 1
    assert job.counts == {**first.counts, "completed": 3, "failed": 1}
    e1 = store.get_item(job_id, "e1")
    assert e1.status == "completed" and e1.error is None and e1.attempts == 2 and e1.round == 1
    assert e1.line == 2 and e1.output.images  # the same manifest row, now with its output
    for kept in ("e0", "e2", "bad"):  # nothing else ran again
        item = store.get_item(job_id, kept)
        assert (item.status, item.attempts, item.updated_at) == (before[kept].status, before[kept].attempts,
                                                                 before[kept].updated_at)
    lines = results(s3_endpoint, bucket, f"e/{job_id}/results.jsonl")
    assert [lines[i]["status"] for i in ("e0", "e1", "e2", "bad")] == ["completed"] * 3 + ["failed"]
    assert lines["e1"]["attempts"] == 2

    # each round's terminal events have their own ids: the job ended twice, e1 failed then completed
    wait_until(lambda: len([h for h in receiver.delivered() if h["json"]["type"].startswith("job.")]) == 2, 30,
               what="the job's second terminal webhook")
    ids = {h["headers"]["webhook-id"] for h in receiver.delivered()}
    assert {f"evt_{job_id}_completed", f"evt_{job_id}_completed.r1", f"evt_{job_id}_e1_failed",
            f"evt_{job_id}_e1_completed.r1"} <= ids

    assert json.loads(cli("retry", job_id, "--json", env=env).stdout)["requeued"] == []  # nothing failed now
    refused = cli("cancel", job_id, env=env)  # a job that completed cannot be cancelled
    assert refused.returncode == 1 and "already ended completed" in refused.stderr


# --- resume ------------------------------------------------------------------------------------
def test_resume_requeues_items_whose_messages_were_lost_and_nothing_that_ended(
        env, bucket, start_worker, redis_server, s3_endpoint, tmp_path):
    rows = [{"id": f"r{n}", "prompt": f"resumed {n}"} for n in range(3)]
    job_id = submit(write_rows(tmp_path / "r.jsonl", rows), env, "--output", f"s3://{bucket}/r")
    redis = redis_server.client()
    queue = "gpu.i1-fast\x06\x163"  # the normal-priority list of the queue
    assert redis.llen(queue) == 3
    redis.delete(queue)  # the broker lost the messages (an outage, a purge)

    res = cli("resume", job_id, "--json", env=env)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["requeued"] == ["r0", "r1", "r2"]
    io_worker = start_worker("worker", "--io")
    start_worker(*TINY_I1).wait_ready()
    io_worker.wait_ready()
    store = RedisStore.from_url(redis_server.url)
    job = wait_job(store, job_id)
    assert job.status == "completed" and [i.attempts for i in store.items(job_id)] == [1, 1, 1]
    assert json.loads(cli("resume", job_id, "--json", env=env).stdout)["requeued"] == []  # it ended: nothing to do
