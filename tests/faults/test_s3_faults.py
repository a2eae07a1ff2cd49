"""S3 answering 503 SlowDown for a while: items retry and complete. S3 failing for good: the item
fails with the S3 error after its retries, and the job goes on. A loopback proxy in front of moto's
server injects the errors."""

from __future__ import annotations

import json
import threading
import time

import pytest
from ledger import check_ledger
from services import S3Proxy, cli, s3_client, service_env, wait_until

from jobs.store import RedisStore

pytestmark = pytest.mark.timeout(240)

SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FaultyS3Proxy(S3Proxy):
    """Forwards to the real endpoint, but answers 503 SlowDown to PUTs whose key matches `match`
    while `budget` lasts (budget -1 = forever)."""

    def __init__(self, upstream: str, match: str, budget: int):
        self.match, self.budget, self.injected = match, budget, 0
        lock = threading.Lock()

        def intercept(method: str, path: str):
            with lock:
                if method != "PUT" or self.match not in path or self.budget == 0:
                    return None
                self.budget -= 1 if self.budget > 0 else 0
                self.injected += 1
            return 503, SLOWDOWN

        super().__init__(upstream, intercept)


def test_a_503_burst_is_retried_and_a_persistent_failure_fails_only_its_item(
    redis_server, s3_endpoint, tiny_dir, bucket, start_worker, tmp_path
):
    # outputs of p00 get a burst longer than one boto3 call's own retries; p01's outputs never get through
    burst = FaultyS3Proxy(s3_endpoint, "/p00.png", budget=7)
    forever = FaultyS3Proxy(burst.url, "/p01.png", budget=-1)
    try:
        env = service_env(
            redis_server.url,
            forever.url,
            tiny_dir,
            DREAMBATCH_CELERY__MAX_ATTEMPTS="3",
            DREAMBATCH_S3__MAX_ATTEMPTS="3",
        )
        io = start_worker("worker", "--io", **{k: v for k, v in env.items() if k.startswith("AWS_")})
        gpu = start_worker(
            "worker",
            "--model",
            "i1-fast",
            "--weights",
            "tiny",
            "--device",
            "cpu",
            AWS_ENDPOINT_URL_S3=forever.url,
            DREAMBATCH_CELERY__MAX_ATTEMPTS="3",
            DREAMBATCH_S3__MAX_ATTEMPTS="3",
            # S3 errors count as attempts at once (no outage is waited out): a failure for good fails its item
            DREAMBATCH_S3__OUTAGE_WAIT="0",
            DREAMBATCH_S3__OUTAGE_LIMIT="0",
        )
        gpu.wait_ready()
        io.wait_ready()
        manifest = tmp_path / "m.jsonl"
        manifest.write_text(
            "".join(json.dumps({"id": f"p{n:02d}", "prompt": f"x {n}", "seed": n}) + "\n" for n in range(4))
        )
        direct = service_env(redis_server.url, s3_endpoint, tiny_dir)
        res = cli("submit", str(manifest), "--output", f"s3://{bucket}/f", "--set", "steps=1", "--json", env=direct)
        job_id = json.loads(res.stdout)["job_id"]
        store = RedisStore.from_url(redis_server.url)
        job = wait_until(lambda: (j := store.get_job(job_id)) and j.finished_at and j, 180, 0.2, what="job end")
        assert burst.injected == 7 and forever.injected >= 3
        lines = [
            json.loads(x)
            for x in s3_client(s3_endpoint)
            .get_object(Bucket=bucket, Key=f"f/{job_id}/results.jsonl")["Body"]
            .read()
            .decode()
            .splitlines()
        ]
        assert [(x["id"], x["status"]) for x in lines] == [
            ("p00", "completed"),
            ("p01", "failed"),
            ("p02", "completed"),
            ("p03", "completed"),
        ]
        # the burst outlasted one call's retries: the item ran again, and its first try, cut short by S3, was
        # not counted (later ones are: DREAMBATCH_S3__OUTAGE_LIMIT=0)
        assert gpu.log.read_text().count(f"item {job_id}/p00 started") >= 2
        assert lines[0]["attempts"] >= 1
        assert "SlowDown" in lines[1]["error"] and "after 3 attempts" in lines[1]["error"]
        assert job.status == "completed" and job.counts["completed"] == 3 and job.counts["failed"] == 1
        keys = {
            o["Key"] for o in s3_client(s3_endpoint).list_objects_v2(Bucket=bucket, Prefix=f"f/{job_id}/")["Contents"]
        }
        assert f"f/{job_id}/p00.png" in keys and f"f/{job_id}/p01.png" not in keys
        check_ledger(
            s3_client(s3_endpoint),
            bucket,
            "f",
            job_id,
            ["p00", "p01", "p02", "p03"],
            expect={"p00": "completed", "p01": "failed", "p02": "completed", "p03": "completed"},
        )
    finally:
        forever.close()
        burst.close()


class OutageProxy(S3Proxy):
    """Forwards to the real endpoint, but answers every request 503 ServiceUnavailable while `down` is set."""

    UNAVAILABLE = (
        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable</Code>'
        b"<Message>Service is unable to handle request.</Message></Error>"
    )

    def __init__(self, upstream: str):
        self.down = threading.Event()
        self.refused = 0

        def intercept(method: str, path: str):
            if not self.down.is_set():
                return None
            self.refused += 1
            return 503, self.UNAVAILABLE

        super().__init__(upstream, intercept)


def test_an_s3_outage_is_waited_out_without_spending_attempts_or_dropping_a_message(
    redis_server, s3_endpoint, tiny_dir, bucket, start_worker, tmp_path
):
    """S3 answers nothing but 503 for 20 s while items upload and end (and the job would finalize): every
    item completes once S3 is back, on its first counted attempt, and the job's ledger balances."""
    proxy = OutageProxy(s3_endpoint)
    try:
        cfg = {
            "AWS_ENDPOINT_URL_S3": proxy.url,
            "DREAMBATCH_S3__MAX_ATTEMPTS": "2",
            "DREAMBATCH_S3__OUTAGE_WAIT": "2",  # hand the message back after 2 s in the thread
            "DREAMBATCH_CELERY__MAX_ATTEMPTS": "2",  # …which, counted, would fail every item twice over
            # the default visibility timeout: nothing here is rescued by Redis redelivering an acknowledged-late task
            "DREAMBATCH_CELERY__VISIBILITY_TIMEOUT": "4200",
            "DREAMBATCH_CELERY__TASK_TIME_LIMIT": "3000",
        }
        io = start_worker("worker", "--io", **cfg)
        gpu = start_worker("worker", "--model", "i1-fast", "--weights", "tiny", "--device", "cpu", **cfg)
        gpu.wait_ready()
        io.wait_ready()
        ids = [f"o{n}" for n in range(6)]
        manifest = tmp_path / "o.jsonl"
        manifest.write_text(
            "".join(json.dumps({"id": i, "prompt": f"x {i}", "seed": n}) + "\n" for n, i in enumerate(ids))
        )
        direct = service_env(redis_server.url, s3_endpoint, tiny_dir)
        res = cli("submit", str(manifest), "--output", f"s3://{bucket}/o", "--set", "steps=1", "--json", env=direct)
        job_id = json.loads(res.stdout)["job_id"]
        proxy.down.set()  # from the first item on, S3 is away
        store = RedisStore.from_url(redis_server.url)
        wait_until(lambda: proxy.refused >= 10, 60, 0.1, what="S3 refusing the workers")
        outage_end = time.monotonic() + 20
        while time.monotonic() < outage_end:
            assert not store.get_job(job_id).finished_at
            time.sleep(0.5)
        proxy.down.clear()
        job = wait_until(lambda: (j := store.get_job(job_id)) and j.finished_at and j, 180, 0.2, what="job end")
        assert job.status == "completed", job.counts
        ledger = check_ledger(s3_client(s3_endpoint), bucket, "o", job_id, ids)
        assert all(line["attempts"] == 1 for line in ledger.lines), [x["attempts"] for x in ledger.lines]
        assert "waits for object storage" in gpu.log.read_text()
    finally:
        proxy.close()
