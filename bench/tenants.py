"""Tenants: what the key check and the tenant filter cost per request.

    python bench/tenants.py [--others 20000]

Real redis-server and moto S3 on loopback, the API in this process. Prints the median of GET /v1/jobs with a
key cached in Redis, with a rate limit counted, and the first request after FLUSHALL (the key read back from
S3); then how long a tenant's listing takes behind `--others` jobs of another tenant (its own index).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import httpx  # noqa: E402
from services import S3_ENV, ApiServer, RedisServer, s3_client, start_s3  # noqa: E402

from jobs.api import tenancy  # noqa: E402
from jobs.models import JobRecord  # noqa: E402
from jobs.settings import Settings  # noqa: E402


def medians(client: httpx.Client, n: int) -> float:
    took = []
    for _ in range(n):
        start = time.perf_counter()
        assert client.get("/v1/jobs").status_code == 200
        took.append((time.perf_counter() - start) * 1000)
    return statistics.median(took)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--others", type=int, default=20000)
    args = parser.parse_args()
    for k, v in S3_ENV.items():
        os.environ.setdefault(k, v)
    s3, endpoint = start_s3()
    redis = RedisServer(Path(tempfile.mkdtemp()))
    redis.start()
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    s3_client(endpoint).create_bucket(Bucket=bucket)
    api = ApiServer(Settings(redis_url=redis.url, output=f"s3://{bucket}/api", s3={"endpoint_url": endpoint}))
    try:
        plain, rated = api.key("jobs:read", tenant="a"), api.key("jobs:read", tenant="b", rate=10**6)
        with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {plain}"}) as c:
            medians(c, 20)
            print(f"GET /v1/jobs, key cached in Redis:          {medians(c, 200):6.1f} ms median of 200")
            with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {rated}"}) as r:
                medians(r, 20)
                print(f"GET /v1/jobs, with its rate limit counted:  {medians(r, 200):6.1f} ms median of 200")
            cold = []
            for _ in range(20):
                redis.client().flushall()
                cold.append(medians(c, 1))
            print(f"GET /v1/jobs, first after FLUSHALL (S3):    {statistics.median(cold):6.1f} ms median of 20")
        svc, at = api.app.state.services, "2026-01-01T00:00:00+00:00"
        svc.store.create_job(
            JobRecord(job_id="mine", model="i1-fast", output="x", created_at=at, updated_at=at, tenant="a")
        )
        for n in range(args.others):
            svc.store.create_job(
                JobRecord(job_id=f"o{n}", model="i1-fast", output="x", created_at=at, updated_at=at, tenant="o")
            )
        key = svc.store.get_api_key(plain.split("_")[1])
        start = time.perf_counter()
        found = tenancy.jobs_of(svc, key, 50)
        took = (time.perf_counter() - start) * 1000
        print(f"a tenant's listing behind {args.others} others' jobs: {took:6.1f} ms ({len(found)} found)")
    finally:
        api.stop()
        redis.stop()
        s3.stop()


if __name__ == "__main__":
    main()
