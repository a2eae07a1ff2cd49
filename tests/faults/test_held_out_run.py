"""The issue's acceptance run: kill -9 of a worker during a 30-item job, a webhook receiver that refuses
the first two deliveries, and every event's signature checked by an independent verifier (the
`standardwebhooks` package). All 30 items complete once in the results; every event arrives signed."""

from __future__ import annotations

import base64
import json
import os
import signal

import pytest
from ledger import check_ledger
from services import cli, s3_client, service_env, wait_until
from standardwebhooks import Webhook

from jobs.store import RedisStore

pytestmark = pytest.mark.timeout(300)
GPU = ("worker", "--model", "i1-fast", "--weights", "tiny", "--device", "cpu", "--concurrency", "1")


def test_kill_9_mid_job_with_a_refusing_receiver_ends_with_30_items_once_and_every_event_signed(
    redis_server, s3_endpoint, tiny_dir, bucket, receiver, start_worker, tmp_path
):
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    cfg = {
        "DREAMBATCH_WEBHOOK_SECRET": secret,
        # (short, so the killed worker's item comes back within seconds; loose enough that a loaded machine's
        # 2 s items are not redelivered while they run)
        "DREAMBATCH_CELERY__VISIBILITY_TIMEOUT": "8",
        "DREAMBATCH_CELERY__TASK_TIME_LIMIT": "7",
        "DREAMBATCH_CELERY__LEASE_TTL": "5",
        "DREAMBATCH_WEBHOOKS__BACKOFF_MAX": "1",
    }
    env = service_env(redis_server.url, s3_endpoint, tiny_dir, **cfg)
    receiver.script = [503, 503]  # the first two deliveries are refused
    start_worker("worker", "--io", **cfg).wait_ready()
    first = start_worker(*GPU, **cfg)
    first.wait_ready()
    ids = [f"h{n:02d}" for n in range(30)]
    path = tmp_path / "h.jsonl"
    path.write_text(
        "".join(json.dumps({"id": i, "prompt": f"catalog shot {i}", "seed": n}) + "\n" for n, i in enumerate(ids))
    )
    res = cli(
        "submit",
        str(path),
        "--model",
        "i1-fast",
        "--set",
        "steps=3",
        "--output",
        f"s3://{bucket}/h",
        "--webhook",
        receiver.url,
        "--json",
        env=env,
    )
    assert res.returncode == 0, res.stderr
    job_id = json.loads(res.stdout)["job_id"]
    store = RedisStore.from_url(redis_server.url)
    wait_until(lambda: store.get_job(job_id).counts["completed"] >= 5, 120, 0.02, what="five items completed")
    first.kill(signal.SIGKILL)  # kill -9 mid-job
    start_worker(*GPU, **cfg).wait_ready()

    job = wait_until(lambda: (j := store.get_job(job_id)) and j.finished_at and j, 240, 0.25, what="job end")
    assert job.status == "completed" and job.counts["completed"] == 30
    check_ledger(s3_client(s3_endpoint), bucket, "h", job_id, ids)

    expected = {f"evt_{job_id}_{i}_completed" for i in ids} | {f"evt_{job_id}_completed"}
    wait_until(
        lambda: {r["headers"]["webhook-id"] for r in receiver.delivered()} >= expected, 60, what="every event delivered"
    )
    assert [r["code"] for r in receiver.requests[:2]] == [503, 503]
    verifier = Webhook(secret)
    for request in receiver.delivered():
        payload = verifier.verify(request["body"], request["headers"])  # raises on a bad signature
        assert payload["status"] == "completed"
    delivered_ids = [r["headers"]["webhook-id"] for r in receiver.delivered()]
    duplicates = len(delivered_ids) - len(set(delivered_ids))
    assert duplicates <= 1  # at most the event of the item in flight at the kill, same id: harmless
