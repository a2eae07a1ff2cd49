"""Operating jobs with real parts: cancel a running job, retry only its failed items, resume after lost
messages, priorities on one worker, the per-job concurrency cap, deadlines, and the metrics endpoints.

Redis, S3 (moto's server), webhooks and Celery workers on tiny HiDream weights are real processes; items
use 1–2 steps except where a test needs an item that is still running when it acts."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from services import cli, free_port, item_context, s3_client, service_env, wait_until

from jobs.lifecycle import ItemStatus
from jobs.models import item_event_id
from jobs.settings import Settings
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
    return wait_until(
        lambda: (j := store.get_job(job_id)) and j.finished_at and j, timeout, 0.1, what=f"job {job_id} to end"
    )


def results(s3_endpoint: str, bucket: str, key: str) -> dict[str, dict]:
    body = s3_client(s3_endpoint).get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    return {line["id"]: line for line in map(json.loads, body.splitlines())}


# --- cancel ------------------------------------------------------------------------------------
def test_cancel_stops_the_running_item_at_a_step_ends_queued_ones_and_keeps_written_outputs(
    env, bucket, receiver, start_worker, redis_server, s3_endpoint, tmp_path
):
    io_worker = start_worker("worker", "--io")
    gpu = start_worker(*TINY_I1, "--concurrency", "1")
    gpu.wait_ready()
    io_worker.wait_ready()
    # one quick item, then a long one (150 steps) that is running when the cancel comes, then three more
    rows = [
        {"id": "a0", "prompt": "quick"},
        {"id": "a1", "prompt": "long", "steps": 150, "width": 1024, "height": 1024, "num_images": 2},
    ]
    rows += [{"id": f"a{n}", "prompt": f"later {n}"} for n in range(2, 5)]
    job_id = submit(
        write_rows(tmp_path / "c.jsonl", rows), env, "--output", f"s3://{bucket}/c", "--webhook", receiver.url
    )
    store = RedisStore.from_url(redis_server.url)
    wait_until(lambda: store.step_of(job_id, "a1"), 120, 0.02, what="a1 past its first denoising step")

    res = cli("cancel", job_id, "--json", env=env)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["counts"]["cancelled"] >= 3  # the queued ones at once (a1 may have stopped too)

    job = wait_job(store, job_id)
    assert job.status == "cancelled" and job.cancel_requested
    items = {i.item_id: i for i in store.items(job_id)}
    assert items["a0"].status == "completed"
    assert items["a1"].status == "cancelled" and items["a1"].reason == "cancelled" and items["a1"].output is None
    done, steps = map(int, store.step_of(job_id, "a1").split("/"))
    assert steps == 150 and done < 150  # stopped at a step boundary, not run to the end
    for n in range(2, 5):
        assert items[f"a{n}"].status == "cancelled" and items[f"a{n}"].attempts == 0  # never started
        # cancel noted their events as sent: a worker draining their messages does not send them again
        assert store.was_sent(job_id, item_event_id(job_id, f"a{n}", "cancelled"))

    # the output written before the cancel is kept and listed in the results
    lines = results(s3_endpoint, bucket, f"c/{job_id}/results.jsonl")
    assert [lines[f"a{n}"]["status"] for n in range(5)] == ["completed"] + ["cancelled"] * 4
    kept = lines["a0"]["output"]["images"][0]["s3_uri"]
    s3_client(s3_endpoint).head_object(Bucket=bucket, Key=kept.removeprefix(f"s3://{bucket}/"))
    assert lines["a1"]["reason"] == "cancelled" and lines["a1"]["output"]["images"] == []

    # webhooks: the job's cancelled event, and one per cancelled item
    wait_until(
        lambda: any(h["json"]["type"] == "job.cancelled" for h in receiver.delivered()),
        30,
        what="job.cancelled webhook",
    )
    wait_until(
        lambda: len([h for h in receiver.delivered() if h["json"]["type"] == "item.cancelled"]) == 4,
        30,
        what="four item.cancelled webhooks",
    )

    # cancelling again is a no-op
    again = cli("cancel", job_id, "--json", env=env)
    assert again.returncode == 0 and json.loads(again.stdout)["status"] == "cancelled"


@pytest.mark.parametrize("how", ["cancel", "expire"])
def test_an_item_a_worker_starts_while_cancel_or_expiry_ends_the_queued_ones_is_left_to_that_worker(
    how, redis_server, tmp_path
):
    """Cancel and the expiry sweep end the items they find queued; one that a worker takes (its execution lease)
    and starts in the meantime is that worker's to end, not moved to cancelled under it."""
    from jobs.control import cancel_job, expire_due
    from jobs.models import ItemRecord, JobRecord
    from jobs.services import Services

    class AWorkerStartsB(RedisStore):
        def items(self, job_id, chunk=500):
            seen = list(super().items(job_id, chunk))  # every item queued as cancel reads them; just then
            self.acquire_lease(job_id, "b", "a-worker", 60)  # a worker takes b and starts it
            self.transition(seen[1], ItemStatus.RUNNING, count_attempt=True)
            return iter(seen)

    settings = Settings(redis_url=redis_server.url)
    store = AWorkerStartsB.from_url(redis_server.url)
    job_id, at = f"race-{how}-{time.time_ns()}", "2026-01-01T00:00:00.000+00:00"
    store.create_job(
        JobRecord(
            job_id=job_id,
            model="i1-fast",
            output=str(tmp_path),
            total=3,
            created_at=at,
            updated_at=at,
            expires_at=time.time() - 1 if how == "expire" else None,
        )
    )
    store.add_items(
        [
            ItemRecord(job_id=job_id, item_id=i, line=n, params={"prompt": i}, created_at=at, updated_at=at)
            for n, i in enumerate("abc", 1)
        ]
    )
    if how == "cancel":
        cancel_job(Services(settings, store=store), job_id)
    else:
        assert expire_due(Services(settings, store=store)) == {job_id: ["a", "c"]}
    assert {i.item_id: i.status for i in RedisStore.from_url(redis_server.url).items(job_id)} == {
        "a": "cancelled",
        "b": "running",
        "c": "cancelled",
    }


# --- retry -------------------------------------------------------------------------------------
def _png(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 32), color).save(buf, "PNG")
    return buf.getvalue()


def test_retry_requeues_only_the_failed_items_in_the_same_job_and_finalizes_again(
    env, bucket, receiver, start_worker, redis_server, s3_endpoint, tmp_path
):
    gpu = start_worker("worker", "--model", "e1-1", "--weights", "tiny", "--device", "cpu")
    io_worker = start_worker("worker", "--io")
    s3 = s3_client(s3_endpoint)
    s3.put_object(Bucket=bucket, Key="in/red.png", Body=_png("red"))
    rows = [
        {"id": "e0", "image": f"s3://{bucket}/in/red.png", "instruction": "make it blue"},
        {"id": "e1", "image": f"s3://{bucket}/in/late.png", "instruction": "make it blue"},  # not there yet
        {"id": "e2", "image": f"s3://{bucket}/in/red.png", "instruction": "make it green"},
        {"id": "bad", "image": f"s3://{bucket}/in/red.png"},
    ]  # no instruction: rejected at submit
    gpu.wait_ready()
    io_worker.wait_ready()
    job_id = submit(
        write_rows(tmp_path / "e.jsonl", rows),
        env,
        "--output",
        f"s3://{bucket}/e",
        "--webhook",
        receiver.url,
        "--skip-invalid",
        "--no-remote-checks",  # e1's object is uploaded only later: the worker checks it, not submit
        model="e1-1",
    )
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
        assert (item.status, item.attempts, item.updated_at) == (
            before[kept].status,
            before[kept].attempts,
            before[kept].updated_at,
        )
    lines = results(s3_endpoint, bucket, f"e/{job_id}/results.jsonl")
    assert [lines[i]["status"] for i in ("e0", "e1", "e2", "bad")] == ["completed"] * 3 + ["failed"]
    assert lines["e1"]["attempts"] == 2

    # each round's terminal events have their own ids: the job ended twice, e1 failed then completed
    wait_until(
        lambda: len([h for h in receiver.delivered() if h["json"]["type"].startswith("job.")]) == 2,
        30,
        what="the job's second terminal webhook",
    )
    ids = {h["headers"]["webhook-id"] for h in receiver.delivered()}
    assert {
        f"evt_{job_id}_completed",
        f"evt_{job_id}_completed.r1",
        f"evt_{job_id}_e1_failed",
        f"evt_{job_id}_e1_completed.r1",
    } <= ids

    assert json.loads(cli("retry", job_id, "--json", env=env).stdout)["requeued"] == []  # nothing failed now
    refused = cli("cancel", job_id, env=env)  # a job that completed cannot be cancelled
    assert refused.returncode == 1 and "already ended completed" in refused.stderr


# --- resume ------------------------------------------------------------------------------------
def test_resume_requeues_items_whose_messages_were_lost_and_nothing_that_ended(
    env, bucket, start_worker, redis_server, s3_endpoint, tmp_path
):
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


# --- priorities, concurrency cap, deadlines -------------------------------------------------------
def _started_order(store: RedisStore, *job_ids: str) -> list[str]:
    items = [i for job_id in job_ids for i in store.items(job_id)]
    return [i.item_id for i in sorted(items, key=lambda i: i.timings.started_at)]


def test_a_single_worker_takes_high_before_normal_before_low_whatever_the_submit_order(
    env, bucket, start_worker, redis_server, tmp_path
):
    out = ("--output", f"s3://{bucket}/p")
    low = submit(
        write_rows(tmp_path / "low.jsonl", [{"id": f"low{n}", "prompt": "nightly"} for n in range(3)]),
        env,
        *out,
        "--priority",
        "low",
    )
    normal = submit(
        write_rows(tmp_path / "n.jsonl", [{"id": f"normal{n}", "prompt": "x"} for n in range(2)]), env, *out
    )
    high = submit(
        write_rows(tmp_path / "h.jsonl", [{"id": f"high{n}", "prompt": "urgent"} for n in range(2)]),
        env,
        *out,
        "--priority",
        "high",
    )
    lists = redis_server.client()
    assert [lists.llen(q) for q in ("gpu.i1-fast", "gpu.i1-fast\x06\x163", "gpu.i1-fast\x06\x166")] == [2, 2, 3]

    start_worker(*TINY_I1, "--concurrency", "1").wait_ready()
    store = RedisStore.from_url(redis_server.url)
    wait_until(
        lambda: all(store.get_job(j).counts["completed"] == store.get_job(j).total for j in (low, normal, high)),
        120,
        0.2,
        what="every item to complete",
    )
    assert _started_order(store, low, normal, high) == ["high0", "high1", "normal0", "normal1", "low0", "low1", "low2"]


def _overlaps(store: RedisStore, job_id: str) -> int:
    """How many pairs of the job's items were running at the same time (start → end)."""
    from datetime import datetime

    spans = [(i.timings.started_at, datetime.fromisoformat(i.updated_at).timestamp()) for i in store.items(job_id)]
    return sum(1 for n, a in enumerate(spans) for b in spans[n + 1 :] if a[0] < b[1] and b[0] < a[1])


def test_max_concurrency_caps_a_job_across_worker_threads(env, bucket, start_worker, redis_server, tmp_path):
    worker = start_worker(*TINY_I1, "--concurrency", "2", DREAMBATCH_CELERY__SLOT_WAIT="0.2")
    rows = [{"id": f"k{n}", "prompt": f"capped {n}"} for n in range(4)]
    worker.wait_ready()
    store = RedisStore.from_url(redis_server.url)
    capped = submit(
        write_rows(tmp_path / "k.jsonl", rows), env, "--output", f"s3://{bucket}/k", "--max-concurrency", "1"
    )
    wait_until(lambda: store.get_job(capped).counts["completed"] == 4, 120, 0.2, what="the capped job")
    assert _overlaps(store, capped) == 0
    # the same rows without a cap do overlap on this two-thread worker: the cap is what kept them apart
    free = submit(write_rows(tmp_path / "f.jsonl", rows), env, "--output", f"s3://{bucket}/k")
    wait_until(lambda: store.get_job(free).counts["completed"] == 4, 120, 0.2, what="the uncapped job")
    assert _overlaps(store, free) > 0


def test_concurrency_slots_are_taken_atomically_and_a_lost_workers_lease_runs_out(redis_server):
    store = RedisStore.from_url(redis_server.url)
    job = f"slots-{time.time_ns()}"
    assert store.acquire_slot(job, "a", 2, 30) and store.acquire_slot(job, "b", 2, 30)
    assert not store.acquire_slot(job, "c", 2, 30)
    assert store.acquire_slot(job, "a", 2, 30)  # a holder asking again keeps its slot
    store.release_slot(job, "a")
    assert store.acquire_slot(job, "c", 2, 0.3) and not store.acquire_slot(job, "d", 2, 30)
    time.sleep(0.4)  # c's worker died without releasing: its lease ends
    assert store.acquire_slot(job, "d", 2, 30)


def test_items_not_started_before_the_deadline_end_cancelled_with_reason_expired(
    env, bucket, receiver, start_worker, redis_server, s3_endpoint, tmp_path
):
    # no GPU worker at all: the I/O worker's sweep ends them
    io_worker = start_worker("worker", "--io", DREAMBATCH_CELERY__HEARTBEAT="0.3")
    io_worker.wait_ready()
    rows = [{"id": f"x{n}", "prompt": "too late"} for n in range(3)]
    job_id = submit(
        write_rows(tmp_path / "x.jsonl", rows),
        env,
        "--output",
        f"s3://{bucket}/x",
        "--webhook",
        receiver.url,
        "--expires-after",
        "1s",
    )
    store = RedisStore.from_url(redis_server.url)
    assert store.get_job(job_id).status == "queued"
    job = wait_job(store, job_id, 30)
    assert job.status == "cancelled" and job.counts["cancelled"] == 3
    lines = results(s3_endpoint, bucket, f"x/{job_id}/results.jsonl")
    assert {(line["status"], line["reason"], line["attempts"]) for line in lines.values()} == {
        ("cancelled", "expired", 0)
    }
    wait_until(
        lambda: any(h["json"]["type"] == "job.cancelled" for h in receiver.delivered()),
        30,
        what="job.cancelled webhook",
    )
    bad = cli("submit", str(tmp_path / "x.jsonl"), "--output", f"s3://{bucket}/x", "--expires-after", "soon", env=env)
    assert bad.returncode == 2 and "--expires-after" in bad.stderr and "'soon'" in bad.stderr


def test_a_worker_ends_an_expired_item_it_picks_up_without_running_it(tmp_path):
    from jobs.models import ItemRecord, JobRecord
    from jobs.storage import LocalStore
    from jobs.store import MemoryStore
    from worker import process

    def no_model():
        raise AssertionError("an expired item must not reach the model")

    store, objects, finals = MemoryStore(), LocalStore(str(tmp_path)), []
    at = "2026-01-01T00:00:00.000+00:00"
    store.create_job(
        JobRecord(
            job_id="j",
            model="i1-fast",
            output=str(tmp_path),
            total=1,
            created_at=at,
            updated_at=at,
            expires_at=time.time() - 1,
        )
    )
    store.add_items([ItemRecord(job_id="j", item_id="i", line=1, params={"prompt": "x"}, created_at=at, updated_at=at)])
    ctx = item_context(store, objects, no_model, finalize=finals.append)
    assert process.process_item(ctx, "j", "i").ended == "cancelled"
    item = store.get_item("j", "i")
    assert (item.status, item.reason, item.attempts) == ("cancelled", "expired", 0) and finals == ["j"]


# --- observability -------------------------------------------------------------------------------
def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    resp = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return _samples(resp.text)


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_workers_and_the_control_plane_export_metrics_top_shows_them_and_logs_carry_ids(
    env, bucket, receiver, start_worker, redis_server, s3_endpoint, tmp_path
):
    from jobs import metrics

    gpu_port, io_port = free_port(), free_port()
    gpu = start_worker(*TINY_I1, "--metrics-port", str(gpu_port), "--log-format", "json")
    io_worker = start_worker("worker", "--io", "--metrics-port", str(io_port), DREAMBATCH_CELERY__HEARTBEAT="0.5")
    gpu.wait_ready()
    io_worker.wait_ready()
    rows = [{"id": f"m{n}", "prompt": f"measured {n}"} for n in range(2)]
    job_id = submit(
        write_rows(tmp_path / "m.jsonl", rows), env, "--output", f"s3://{bucket}/m", "--webhook", receiver.url
    )
    store = RedisStore.from_url(redis_server.url)
    wait_job(store, job_id)
    wait_until(lambda: len(receiver.delivered()) == 3, 30, what="three webhooks")

    # each worker, over HTTP
    gpu_m = _scrape(gpu_port)
    assert gpu_m[("dreambatch_worker_items_total", (("model", "i1-fast"), ("status", "completed")))] == 2
    for name in ("inference", "upload", "queue_wait"):
        assert gpu_m[(f"dreambatch_worker_{name}_seconds_count", (("model", "i1-fast"),))] == 2
    assert gpu_m[("dreambatch_worker_queue_wait_seconds_sum", (("model", "i1-fast"),))] > 0
    busy = gpu_m[("dreambatch_worker_model_busy_seconds_total", (("model", "i1-fast"),))]
    lines = results(s3_endpoint, bucket, f"m/{job_id}/results.jsonl").values()
    ran = [line["timings"]["inference_s"] for line in lines]
    assert busy > 0 and busy == pytest.approx(sum(ran), abs=1e-3)  # the items' own model time, from their records
    io_m = wait_until(
        lambda: (
            (m := _scrape(io_port)).get(("dreambatch_worker_webhook_deliveries_total", (("outcome", "delivered"),)))
            == 3
            and m
        ),
        10,
        what="three delivered webhooks counted",
    )
    attempts = sum(v for (name, _), v in io_m.items() if name == "dreambatch_worker_webhook_deliveries_total")
    assert io_m[("dreambatch_worker_webhook_latency_seconds_count", ())] == attempts >= 3  # (earlier tests'
    # leftover webhook retries may reach this I/O worker too: every attempt is timed, whatever its outcome)

    # the control plane's gauges, as the API serves them
    body, content_type = metrics.render(RedisStore.from_url(redis_server.url))
    assert content_type.startswith("text/plain")
    cp = _samples(body.decode())
    assert cp[("dreambatch_workers", (("queue", "gpu.i1-fast"),))] >= 1  # (earlier tests' heartbeats may linger)
    assert cp[("dreambatch_workers", (("queue", "io"),))] == 1
    assert cp[("dreambatch_queue_depth", (("priority", "low"), ("queue", "gpu.i1-fast")))] == 0
    assert cp[("dreambatch_jobs", (("status", "completed"),))] >= 1
    assert cp[("dreambatch_items", (("status", "completed"),))] >= 2

    # top: one JSON snapshot, and the one-shot tables
    snap = json.loads(cli("top", "--json", env=env).stdout)
    assert {w["queue"] for w in snap["workers"]} == {"gpu.i1-fast", "io"}
    assert any(j["job_id"] == job_id and j["status"] == "completed" for j in snap["jobs"])
    tables = cli("top", "--once", env=env)
    assert tables.returncode == 0 and "gpu.i1-fast" in tables.stdout and "workers" in tables.stdout

    # structured logs: the item lines carry the job and item ids
    entries = [json.loads(line) for line in gpu.log.read_text().splitlines() if line.startswith("{")]
    ended = [e for e in entries if e.get("status") == "completed" and e.get("item_id")]
    assert {e["item_id"] for e in ended} == {"m0", "m1"} and {e["job_id"] for e in ended} == {job_id}


def _two_items_one_failed(store, objects) -> str:
    """A job of two items in `store` (its job.json in `objects`): "ok" completed, "bad" failed; its id."""
    from jobs import records
    from jobs.models import ItemRecord, JobRecord

    job_id, at = f"retried-{time.time_ns()}", "2026-01-01T00:00:00.000+00:00"
    job = JobRecord(job_id=job_id, model="e1-full", output=objects.location, total=2, created_at=at, updated_at=at)
    store.create_job(job)
    records.write_job_spec(objects, job)
    store.add_items(
        [
            ItemRecord(
                job_id=job_id,
                item_id=i,
                line=n,
                status=s,
                params={"prompt": i},
                attempts=1,
                created_at=at,
                updated_at=at,
            )
            for n, (i, s) in enumerate([("ok", "completed"), ("bad", "failed")], 1)
        ]
    )
    return job_id


def test_a_retried_job_ignores_a_late_finalize_until_its_items_end_again(redis_server, tmp_path):
    from jobs.control import retry_job
    from jobs.services import Services
    from jobs.storage import LocalStore
    from worker import process

    settings = Settings(redis_url=redis_server.url)
    store, objects = RedisStore.from_url(redis_server.url), LocalStore(str(tmp_path))
    job_id = _two_items_one_failed(store, objects)
    ctx = item_context(store, objects, lambda: None, settings=settings)
    assert process.finalize_job(ctx, job_id) == "completed"

    assert retry_job(Services(settings, store=store), job_id) == ["bad"]
    job = store.get_job(job_id)
    assert (job.status, job.finished_at, job.round, job.counts["queued"]) == ("running", None, 1, 1)
    assert process.finalize_job(ctx, job_id) is None  # a duplicate finalize of round 0 changes nothing
    bad = store.get_item(job_id, "bad")
    assert (bad.round, bad.round_start_attempts, bad.error) == (1, 1, None)
    redis_server.client().delete("gpu.e1-full\x06\x163")  # no worker here: drop the published message

    store.transition(bad, ItemStatus.RUNNING, count_attempt=True)
    move = store.transition(bad, ItemStatus.COMPLETED)
    assert move.job_done  # the last item of round 1 ends: the job is finalized once more
    assert process.finalize_job(ctx, job_id) == "completed" and store.get_job(job_id).counts["completed"] == 2


@pytest.mark.parametrize("live", ["redis", "memory"])
def test_a_retry_while_the_finalizer_writes_the_jobs_end_keeps_the_new_round_open(
    live, redis_server, tmp_path, monkeypatch
):
    """`retry JOB` lands between a finalizer's read of the job (every item ended, one failed) and its
    finish_job: the finalizer must not end the round the retry opened, and the job's record says open."""
    from jobs import records
    from jobs.control import retry_job
    from jobs.services import Services
    from jobs.storage import LocalStore
    from jobs.store import MemoryStore
    from worker import process

    settings = Settings(redis_url=redis_server.url)
    store = RedisStore.from_url(redis_server.url) if live == "redis" else MemoryStore()
    objects = LocalStore(str(tmp_path))
    job_id = _two_items_one_failed(store, objects)
    published: list[list[str]] = []
    services = Services(settings, store=store)
    monkeypatch.setattr(services, "publish", lambda _job, ids: published.append(list(ids)))
    close_job = records.close_job

    def close_job_then_retry(*args, **kwargs):
        close_job(*args, **kwargs)
        assert retry_job(services, job_id) == ["bad"]  # (the user's retry, as the end is being written)

    monkeypatch.setattr(records, "close_job", close_job_then_retry)
    ctx = item_context(store, objects, lambda: None, settings=settings)
    assert process.finalize_job(ctx, job_id) is None  # it read round 0; the job is in round 1 now

    live_job = store.get_job(job_id)
    assert (live_job.finished_at, live_job.round, live_job.counts["queued"]) == (None, 1, 1)
    assert published == [["bad"]]
    durable = records.read_job(objects, job_id)
    assert (durable.finished_at, durable.round) == (None, 1)  # not the end of round 0 the finalizer wrote

    monkeypatch.setattr(records, "close_job", close_job)
    bad = store.get_item(job_id, "bad")
    store.transition(bad, ItemStatus.RUNNING, count_attempt=True)
    assert store.transition(bad, ItemStatus.COMPLETED).job_done
    assert process.finalize_job(ctx, job_id) == "completed"
    assert store.get_job(job_id).counts["completed"] == 2
    assert records.read_job(objects, job_id).finished_at is not None


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("2h", 7200), ("1d", 86400), ("0.5h", 1800)]
)
def test_durations_read_as_seconds(text, seconds):
    from jobs.models import parse_duration

    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "0s", "-5m", "31d", "5 weeks"])
def test_bad_durations_say_what_was_expected(text):
    from jobs.errors import InputError
    from jobs.models import parse_duration

    with pytest.raises(InputError, match="duration"):
        parse_duration(text)
