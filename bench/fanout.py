"""Fan-out: rows/s for validating and queueing a large manifest, and the peak Python memory it needs.

    python bench/fanout.py --rows 100000

Real redis-server and moto S3 server on loopback; tasks are published to Redis (nobody consumes them).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from services import S3_ENV, RedisServer, s3_client, start_s3_process  # noqa: E402

sys.path.insert(0, str(ROOT))
from jobs import keys  # noqa: E402


def queued_messages(client, queue: str) -> int:
    """Messages waiting in `queue` at every priority (kombu keeps one Redis list per priority step)."""
    return sum(client.llen(name) for name in keys.priority_lists(queue).values())


def bare_publish(settings, rows: int) -> float:
    """The floor a fan-out is measured against, as a user would write it: `rows` task messages published with
    Celery's `send_task` on one producer in kombu batches of 500, nothing else done per row."""
    from jobs.broker import make_celery

    app = make_celery(settings)
    queue, level = keys.gpu_queue("bare"), keys.PRIORITIES["normal"]
    t0 = time.perf_counter()
    with app.producer_or_acquire() as producer, producer.batch(max_size=500):
        for i in range(rows):
            app.send_task(keys.TASK_RUN_ITEM, args=["j", f"r{i}"], queue=queue, producer=producer, priority=level)
    return time.perf_counter() - t0


def our_publish(settings, rows: int) -> float:
    """The same messages through dreambatch's own publishing (jobs.broker.publish_items), nothing else."""
    from jobs.broker import make_celery, publish_items

    app = make_celery(settings)
    t0 = time.perf_counter()
    publish_items(app, "bare", "j", (f"r{i}" for i in range(rows)))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    args = ap.parse_args()
    import os

    os.environ.update(S3_ENV)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        manifest = tmp / "big.csv"
        with manifest.open("w") as fh:
            fh.write("id,prompt,seed,sku\n")
            for i in range(args.rows):
                fh.write(f'r{i},"product {i}, white background",{i},SKU{i}\n')
        (tmp / "redis").mkdir()
        redis_server = RedisServer(tmp / "redis")
        redis_server.start()
        # S3 in its own process, so the memory figure is the fan-out's alone
        s3, endpoint = start_s3_process()
        os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
        s3_client(endpoint).create_bucket(Bucket="fan")
        try:
            from jobs.models import JobSpec
            from jobs.services import Services
            from jobs.settings import Settings
            from jobs.submit import create_job

            settings = Settings(redis_url=redis_server.url)

            def fan_out() -> tuple[float, int]:
                t0 = time.perf_counter()
                sub = create_job(JobSpec(model="i1-fast", output="s3://fan/x"), manifest, Services(settings))
                return time.perf_counter() - t0, sub.queued

            wall, queued = fan_out()  # timed run
            tracemalloc.start()  # second run: peak Python allocations (tracemalloc slows it down)
            fan_out()
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            in_queue = queued_messages(redis_server.client(), keys.gpu_queue("i1-fast"))
            bare = bare_publish(settings, args.rows)
            ours = our_publish(settings, args.rows)
        finally:
            s3.kill()
            redis_server.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rows": args.rows, "queued_per_run": queued, "in_redis_queue_after_two_runs": in_queue}))
    print(f"fan-out: {args.rows} rows validated + stored + published in {wall:.1f}s = {args.rows / wall:,.0f} rows/s")
    print(
        f"bare batched publishing (one send_task per row on one producer, kombu batches of 500, no validation, "
        f"no records): {bare:.1f}s; fan-out ÷ bare = {wall / bare:.2f}x"
    )
    print(f"dreambatch's publishing alone (jobs.broker.publish_items, same messages): {ours:.1f}s")
    print(f"peak traced Python memory during fan-out: {peak / 2**20:.1f} MiB; process max RSS {rss:.0f} MiB")


if __name__ == "__main__":
    main()
