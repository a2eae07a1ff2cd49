"""Catalog scan: objects/s for a scheduled prefix scan (list, classify, template, fingerprint, diff) and the
run that follows, on a first night (every image new: queue them all) and a second (nothing changed).

    python bench/catalog_scan.py --objects 20000

Real redis-server and moto S3 server (its own process) on loopback; tasks are published to Redis and
nobody consumes them. Between the two nights the job is marked ended with every item completed (what
the GPU workers would have written: results.jsonl), so the second night folds it into the ledger and
diffs every image against it. One object in 20 is not an image (skipped with its reason).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's packages, and the test services

from services import S3_ENV, RedisServer, s3_client, start_s3_process  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", type=int, default=20_000)
    args = ap.parse_args()
    os.environ.update(S3_ENV)
    from jobs.catalog.run import run_schedule
    from jobs.catalog.schedules import load_schedules
    from jobs.lifecycle import JobStatus
    from jobs.services import Services
    from jobs.settings import CatalogSettings, S3Settings, Settings

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "redis").mkdir()
        redis_server = RedisServer(tmp / "redis")
        redis_server.start()
        s3_proc, endpoint = start_s3_process()
        try:
            s3 = s3_client(endpoint)
            s3.create_bucket(Bucket="catalog")

            def put(n: int) -> None:
                if n % 20 == 19:
                    s3.put_object(Bucket="catalog", Key=f"products/c{n % 37}/notes-{n}.txt", Body=b"notes")
                else:
                    s3.put_object(
                        Bucket="catalog",
                        Key=f"products/c{n % 37}/sub{n % 3}/{n}.jpg",
                        Body=f"jpeg bytes {n}".encode(),
                        ContentType="image/jpeg",
                    )

            t0 = time.perf_counter()
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(put, range(args.objects)))
            upload_s = time.perf_counter() - t0

            schedules = tmp / "schedules.toml"
            schedules.write_text("""
[schedules.bench]
cron = "0 2 * * *"
model = "e1-1"
preset = "white-studio"
instruction = "Put the {category} product {sku} on a seamless pure white studio background"
output = "s3://catalog/edited"
keep_format = true
[schedules.bench.source]
prefix = "s3://catalog/products/"
path = "products/{category*}/{sku}.jpg"
""")
            settings = Settings(
                redis_url=redis_server.url,
                s3=S3Settings(endpoint_url=endpoint),
                catalog=CatalogSettings(schedules_file=str(schedules)),
            )
            services = Services(settings)
            schedule = load_schedules(settings)["bench"]

            t0 = time.perf_counter()  # the listing alone (S3 server + botocore parsing), for comparison
            listed = sum(
                len(page.get("Contents", []))
                for page in s3.get_paginator("list_objects_v2").paginate(Bucket="catalog", Prefix="products/")
            )
            list_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            dry = run_schedule(schedule, services, dry_run=True)
            dry_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            first = run_schedule(schedule, services)
            first_s = time.perf_counter() - t0

            # what the workers would leave behind: every item completed, results.jsonl, the job ended
            out = services.objects("s3://catalog/edited")
            lines = [dict(item.result_line(), status="completed") for item in services.store.items(first.job_id)]
            body = "\n".join(json.dumps(x) for x in lines).encode()
            out.put(f"{first.job_id}/results.jsonl", body, "application/x-ndjson")
            services.store.finish_job(first.job_id, JobStatus.COMPLETED, None, "2026-01-01T00:00:00+00:00")

            t0 = time.perf_counter()
            second = run_schedule(schedule, services)
            second_s = time.perf_counter() - t0
        finally:
            s3_proc.terminate()
            redis_server.stop()

    n = args.objects
    print(
        json.dumps(
            {
                "objects": n,
                "images": first.images,
                "skipped": len(first.skipped),
                "upload_s": round(upload_s, 2),
                "list_only_s": round(list_s, 2),
                "listed": listed,
                "dry_run_s": round(dry_s, 2),
                "dry_run_objects_per_s": round(n / dry_s),
                "first_night": {"queued": first.queued, "s": round(first_s, 2), "objects_per_s": round(n / first_s)},
                "second_night": {
                    "queued": second.queued,
                    "unchanged": second.unchanged,
                    "folded": len(second.folded),
                    "s": round(second_s, 2),
                    "objects_per_s": round(n / second_s),
                },
                "dry_run_would_process": len(dry.new),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
