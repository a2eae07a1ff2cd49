"""Cancel: how long `cancel JOB` takes to end a job's queued items, each with its durable record first.

    python bench/cancel.py --items 1000 [--put-delay-ms 20]

Real redis-server and moto S3 server (its own process) on loopback; `--put-delay-ms` puts an S3Proxy in
front of it that holds each PUT that long (a remote S3's round trip). Nothing consumes the queues.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from services import S3_ENV, RedisServer, S3Proxy, s3_client, start_s3_process  # noqa: E402

AT = "2026-01-01T00:00:00.000+00:00"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--put-delay-ms", type=float, default=0.0)
    args = ap.parse_args()
    os.environ.update(S3_ENV)
    with tempfile.TemporaryDirectory() as d:
        redis_server = RedisServer(Path(d))
        redis_server.start()
        s3, endpoint = start_s3_process()
        proxy = None
        try:
            s3_client(endpoint).create_bucket(Bucket="cancel")
            if args.put_delay_ms:

                def slow_puts(method: str, path: str):
                    if method == "PUT":
                        time.sleep(args.put_delay_ms / 1000)

                proxy = S3Proxy(endpoint, slow_puts)
                endpoint = proxy.url
            os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
            from jobs.control import cancel_job
            from jobs.models import ItemRecord, JobRecord
            from jobs.services import Services
            from jobs.settings import Settings
            from jobs.store import RedisStore

            settings = Settings(redis_url=redis_server.url)
            store, output = RedisStore.from_url(redis_server.url), "s3://cancel/x"
            store.create_job(
                JobRecord(job_id="J", model="i1-fast", output=output, total=args.items, created_at=AT, updated_at=AT)
            )
            store.add_items(
                [
                    ItemRecord(
                        job_id="J", item_id=f"i{n}", line=n, params={"prompt": "x"}, created_at=AT, updated_at=AT
                    )
                    for n in range(args.items)
                ]
            )
            t0 = time.perf_counter()
            job = cancel_job(Services(settings, store=store), "J")
            wall = time.perf_counter() - t0
        finally:
            if proxy is not None:
                proxy.close()
            s3.kill()
            redis_server.stop()
    print(
        json.dumps(
            {
                "items": args.items,
                "put_delay_ms": args.put_delay_ms,
                "cancelled": job.counts["cancelled"],
                "s": round(wall, 2),
                "items_per_s": round(args.items / wall),
            }
        )
    )


if __name__ == "__main__":
    main()
