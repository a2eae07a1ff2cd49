"""S3 answering 503 SlowDown for a while: items retry and complete. S3 failing for good: the item
fails with the S3 error after its retries, and the job goes on. A loopback proxy in front of moto's
server injects the errors."""

from __future__ import annotations

import json
import threading

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
        assert lines[0]["attempts"] >= 2  # the burst outlasted one call's retries: the item ran again
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
