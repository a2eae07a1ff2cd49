"""Items/s through submit → Redis → worker → S3 → results with tiny weights, the per-item time spent
outside the model call, and plain Celery with an empty task on the same Redis, in the same run.

    python bench/queue_throughput.py --items 200

Prints figures; never asserts. Starts its own redis-server, moto S3 server and worker processes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from services import RedisServer, Worker, cli, s3_client, service_env, start_s3, wait_until  # noqa: E402


def model_calls(timings: list[dict]) -> dict[float, float]:
    """Model start → that call's seconds, from item timings: a micro-batch's items share their start, and
    their `inference_s` shares add up to the batch's time."""
    calls: dict[float, float] = {}
    for t in timings:
        calls[t["model_started_at"]] = calls.get(t["model_started_at"], 0.0) + t["inference_s"]
    return calls


def dreambatch_run(n: int, env: dict, tmp: Path, s3: str, concurrency: int | None = None, steps: int = 1) -> dict:
    """`n` rows of tiny i1-fast through one I/O and one GPU worker process (`concurrency` None: the worker's
    default threads); timed from submit to the job's end. `s3` is the endpoint this process reads results
    from (the workers' is in `env`)."""
    bucket = "bench"
    s3_client(s3).create_bucket(Bucket=bucket)
    io = Worker(["worker", "--io"], env, tmp / "io.log")
    threads = [] if concurrency is None else ["--concurrency", str(concurrency)]
    gpu = Worker(
        ["worker", "--model", "i1-fast", "--weights", "tiny", "--device", "cpu", *threads], env, tmp / "gpu.log"
    )
    try:
        gpu.wait_ready()
        io.wait_ready()
        manifest = tmp / "bench.jsonl"
        manifest.write_text("".join(json.dumps({"prompt": f"item {i}", "seed": i}) + "\n" for i in range(n)))
        t0 = time.perf_counter()
        res = cli(
            "submit",
            str(manifest),
            "--model",
            "i1-fast",
            "--set",
            f"steps={steps}",
            "--output",
            f"s3://{bucket}/b",
            "--json",
            env=env,
        )
        submitted = time.perf_counter()
        job_id = json.loads(res.stdout)["job_id"]
        from jobs.store import RedisStore

        store = RedisStore.from_url(env["DREAMBATCH_REDIS_URL"])
        wait_until(lambda: store.get_job(job_id).finished_at, 1800, 0.05, what="bench job")
        wall = time.perf_counter() - t0
        lines = [
            json.loads(x)
            for x in s3_client(s3)
            .get_object(Bucket=bucket, Key=f"b/{job_id}/results.jsonl")["Body"]
            .read()
            .decode()
            .splitlines()
        ]
        timings = [x["timings"] for x in lines if x["status"] == "completed" and x["timings"].get("model_started_at")]
        model_call = model_calls(timings)
        return {
            "items": n,
            "wall_s": wall,
            "submit_s": submitted - t0,
            "items_per_s": n / wall,
            "mean_inference_s": statistics.mean(t["inference_s"] for t in timings),
            "mean_upload_s": statistics.mean(t["upload_s"] for t in timings),
            # each item's own work outside the model call (state writes, encode + upload, records), not
            # counting its wait for the model while another item had it
            "mean_outside_model_s": statistics.mean(
                t["total_s"] - model_call[t["model_started_at"]] - t["model_wait_s"] for t in timings
            ),
            "mean_model_wait_s": statistics.mean(t["model_wait_s"] for t in timings),
            "per_item_wall_s": wall / n,
            "timings": timings,
            "completed": sum(x["status"] == "completed" for x in lines),
        }
    finally:
        gpu.kill()
        io.kill()


def plain_celery_run(n: int, env: dict, tmp: Path, concurrency: int) -> dict:
    log = (tmp / "plain.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.plain_celery",
            "worker",
            "-P",
            "threads",
            "-c",
            str(concurrency),
            "-l",
            "INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until(lambda: " ready." in (tmp / "plain.log").read_text(), 60, what="plain celery worker")
        sys.path.insert(0, str(ROOT))
        import redis

        from bench.plain_celery import app

        # this process's producer must publish to the bench's Redis, which its environment does not name
        app.conf.broker_url = env["DREAMBATCH_REDIS_URL"]
        r = redis.Redis.from_url(env["DREAMBATCH_REDIS_URL"])
        t0 = time.perf_counter()
        with app.producer_or_acquire() as producer:
            for i in range(n):
                app.send_task("plain.empty", args=["j", str(i)], producer=producer)
        wait_until(lambda: r.llen("celery") == 0 and not r.hlen("unacked"), 600, 0.01, what="plain drain")
        wall = time.perf_counter() - t0
        return {"items": n, "wall_s": wall, "items_per_s": n / wall}
    finally:
        proc.kill()
        log.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=None, help="GPU worker threads (default: the worker's)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "redis").mkdir()
        redis_server = RedisServer(tmp / "redis")
        redis_server.start()
        s3, endpoint = start_s3()
        env = service_env(redis_server.url, endpoint, tmp / "tiny")
        try:
            ours = dreambatch_run(args.items, env, tmp, endpoint, args.concurrency)
            plain = plain_celery_run(args.items, env, tmp, args.concurrency or 3)
        finally:
            s3.stop()
            redis_server.stop()
    threads = args.concurrency or "default"
    print(
        f"dreambatch (tiny i1-fast, steps=1, {threads} threads): {ours['items']} items in "
        f"{ours['wall_s']:.2f}s = {ours['items_per_s']:.1f} items/s (submit {ours['submit_s']:.2f}s, "
        f"{ours['completed']} completed)"
    )
    print(
        f"  per item: wall {ours['per_item_wall_s'] * 1000:.1f} ms, "
        f"model call {ours['mean_inference_s'] * 1000:.1f} ms, "
        f"encode+upload {ours['mean_upload_s'] * 1000:.1f} ms, the item's own time outside the model call "
        f"{ours['mean_outside_model_s'] * 1000:.1f} ms"
    )
    print(
        f"plain celery (empty task, same redis, {args.concurrency or 3} threads): {plain['items']} in "
        f"{plain['wall_s']:.2f}s = {plain['items_per_s']:.1f} items/s"
    )
    print(f"overhead ratio (plain items/s ÷ dreambatch items/s): {plain['items_per_s'] / ours['items_per_s']:.1f}x")


if __name__ == "__main__":
    main()
