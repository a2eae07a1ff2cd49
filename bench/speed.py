"""One run, side by side: the model's duty cycle with and without pipelining, the prompt-cache gain, the
micro-batching gain, and the dreambatch-vs-plain-Celery overhead ratio, on tiny weights on the CPU.

    python bench/speed.py --items 40 --steps 4 --io-ms 40

Duty cycle: items go through `worker.process.process_item` — the function the Celery task calls — from N
threads, as the worker's threads pool calls it, on a real redis-server and moto's S3 server; only the
Celery consumer is left out (its cost is the overhead figure below). Each S3 PUT (the image, the item
record) is delayed by `--io-ms`, standing in for a real S3 upload and a real-size image's encode, which
the tiny model's 64² images do not have. The runner's busy intervals are recorded around every model call:
duty cycle = busy time ÷ wall time from the first model call to the last (after `--warmup` items); gap =
from one model call's end to the next one's start.

Prompt cache: `--items` images from one prompt and negative prompt (I1-Full tiny, CFG) with the cache
on and off. Micro-batching: the same items from as many threads as the batch size, through `MicroBatcher`.

Prints figures; never asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from services import RedisServer, s3_client, service_env, start_s3  # noqa: E402


class Timeline:
    """Wraps a runner; records (start, end) of every model call."""

    def __init__(self, runner):
        self.runner = runner
        self.model = runner.model
        self.spans: list[tuple[float, float]] = []

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def _timed(self, call, *args):
        started = time.perf_counter()
        try:
            return call(*args)
        finally:
            self.spans.append((started, time.perf_counter()))

    def generate(self, request):
        return self._timed(self.runner.generate, request)

    def generate_batch(self, requests):
        return self._timed(self.runner.generate_batch, requests)


class SlowPuts:
    """An object store whose every put takes `delay` seconds longer (a remote S3, a big image's encode)."""

    def __init__(self, objects, delay: float):
        self.objects, self.delay = objects, delay

    def __getattr__(self, name):
        return getattr(self.objects, name)

    def put(self, *args, **kwargs):
        time.sleep(self.delay)
        return self.objects.put(*args, **kwargs)


def duty_cycle(spans: list[tuple[float, float]], warmup: int) -> dict:
    spans = sorted(spans)[warmup:]
    busy = sum(end - start for start, end in spans)
    wall = spans[-1][1] - spans[0][0]
    gaps = [b[0] - a[1] for a, b in zip(spans, spans[1:], strict=False)]
    return {"duty": busy / wall, "gap_median_ms": statistics.median(gaps) * 1000,
            "gap_p90_ms": sorted(gaps)[int(0.9 * (len(gaps) - 1))] * 1000, "calls": len(spans)}


def run_items(settings, store, runner, objects, manifest: Path, steps: int, threads: int, batching: bool) -> dict:
    """Submit the manifest (no broker: ids go to a local queue) and run its items from `threads` threads."""
    from jobs.manifest import input_policy
    from jobs.submit import create_job
    from worker import process

    ids: queue.Queue[str] = queue.Queue()
    sub = create_job(manifest, model="i1-fast", defaults={"steps": steps}, output="s3://bench/duty", webhook=None,
                     store=store, objects=objects, dispatch=lambda batch: [ids.put(i) for i in batch],
                     policy=input_policy(manifest, settings))
    ctx = process.Context(settings=settings, store=store, runner=lambda: runner, objects=lambda _loc: objects,
                          notify=lambda *_: None, finalize=lambda _job: None,
                          gpu_lock=contextlib.nullcontext() if batching else threading.Lock())
    statuses: list[str] = []

    def pool_thread() -> None:
        while True:
            try:
                item_id = ids.get_nowait()
            except queue.Empty:
                return
            statuses.append(process.process_item(ctx, sub.job.job_id, item_id).status)

    started = time.perf_counter()
    workers = [threading.Thread(target=pool_thread) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    wall = time.perf_counter() - started
    return {"wall_s": wall, "items_per_s": len(statuses) / wall, "completed": statuses.count("completed")}


def pipelining(args, tmp: Path) -> list[str]:
    from jobs.settings import RunnerSettings, Settings
    from jobs.storage import open_store
    from jobs.store import RedisStore
    from worker.runners.batching import MicroBatcher
    from worker.runtime import build_runner

    redis_server = RedisServer(tmp / "redis")
    (tmp / "redis").mkdir()
    redis_server.start()
    s3, endpoint = start_s3()
    saved = dict(os.environ)
    os.environ.update(service_env(redis_server.url, endpoint, tmp / "tiny"))
    lines = []
    try:
        settings = Settings(redis_url=redis_server.url)
        s3_client(endpoint).create_bucket(Bucket="bench")
        store = RedisStore.from_url(redis_server.url)
        objects = SlowPuts(open_store("s3://bench/duty", settings), args.io_ms / 1000)
        manifest = tmp / "duty.jsonl"
        manifest.write_text("".join(json.dumps({"prompt": f"a photo of a cat, take {i}", "seed": i}) + "\n"
                                    for i in range(args.items)))
        inner = build_runner("i1-fast", "tiny", "cpu", RunnerSettings())
        inner.load()
        cases = [("no pipelining (1 thread)", 1, 1), ("pipelining (2 threads)", 2, 1), ("pipelining (3 threads)", 3, 1)]
        cases += [(f"pipelining + micro-batches of {b} ({b + 1} threads)", b + 1, b) for b in args.batches]
        for name, threads, batch in cases:
            timed = Timeline(inner)
            runner = MicroBatcher(timed, batch, args.window_ms / 1000) if batch > 1 else timed
            result = run_items(settings, store, runner, objects, manifest, args.steps, threads, batching=batch > 1)
            cycle = duty_cycle(timed.spans, args.warmup)
            lines.append(f"  {name}: {result['items_per_s']:.2f} items/s ({result['completed']}/{args.items} "
                         f"completed), duty cycle {cycle['duty']:.1%}, gap between model calls median "
                         f"{cycle['gap_median_ms']:.1f} ms, p90 {cycle['gap_p90_ms']:.1f} ms "
                         f"({cycle['calls']} model calls)")
            print(lines[-1], flush=True)
    finally:
        s3.stop()
        redis_server.stop()
        os.environ.clear()
        os.environ.update(saved)
    return lines


def prompt_cache(args, tmp: Path) -> list[str]:
    from jobs.settings import RunnerSettings
    from worker.runners.base import GenerateRequest
    from worker.runners.hidream_i1 import HiDreamI1Runner

    lines = []
    for label, megabytes in [("off", 0), ("on", 64)]:
        runner = HiDreamI1Runner("i1-full", "tiny", options=RunnerSettings(prompt_cache_mb=megabytes))
        runner.load()
        request = GenerateRequest(prompt="a watercolor painting of a lighthouse at dusk", negative_prompt="blurry",
                                  guidance_scale=5.0, scheduler="flow_unipc", steps=args.steps, width=64, height=64)
        runner.generate(request)  # warm-up
        started = time.perf_counter()
        for seed in range(args.items):
            runner.generate(GenerateRequest(**{**request.__dict__, "seed": seed}))
        per_item = (time.perf_counter() - started) / args.items
        lines.append(f"  cache {label}: {per_item * 1000:.1f} ms per image (i1-full tiny, CFG, {args.steps} steps), "
                     f"{runner.prompts.hits} hits / {runner.prompts.misses} misses")
        print(lines[-1], flush=True)
    return lines


def micro_batching(args) -> list[str]:
    from jobs.settings import RunnerSettings
    from worker.runners.base import GenerateRequest
    from worker.runners.batching import MicroBatcher
    from worker.runners.hidream_i1 import HiDreamI1Runner

    runner = HiDreamI1Runner("i1-fast", "tiny", options=RunnerSettings())
    runner.load()
    requests = [GenerateRequest(prompt=f"a photo of a cat, take {i}", seed=i, steps=args.steps, width=64, height=64,
                                scheduler="flash_flow") for i in range(args.items)]
    lines = []
    for batch in [1, *args.batches]:
        batcher = MicroBatcher(runner, batch, args.window_ms / 1000)
        batcher.generate(requests[0])  # warm-up, and the model thread started
        batcher.batch_sizes.clear()
        pending: queue.Queue = queue.Queue()
        for request in requests:
            pending.put(request)

        def feed(batcher=batcher, pending=pending) -> None:
            while True:
                try:
                    batcher.generate(pending.get_nowait())
                except queue.Empty:
                    return

        started = time.perf_counter()
        feeders = [threading.Thread(target=feed) for _ in range(batch)]
        for feeder in feeders:
            feeder.start()
        for feeder in feeders:
            feeder.join()
        wall = time.perf_counter() - started
        sizes = batcher.batch_sizes
        lines.append(f"  batch ≤{batch}: {args.items / wall:.2f} images/s, mean batch {statistics.mean(sizes):.1f} "
                     f"(i1-fast tiny, {args.steps} steps, 64², model calls only)")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=40)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--io-ms", type=float, default=40.0, help="added to every S3 PUT (2 per item)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--window-ms", type=float, default=20.0)
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4])
    ap.add_argument("--overhead-items", type=int, default=200, help="0 skips the Celery overhead ratio")
    ap.add_argument("--model-threads", type=int, default=1,
                    help="torch intra-op threads: 1 leaves the other core to I/O, as a GPU leaves the host's cores")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.model_threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at start", flush=True)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print(f"duty cycle, {args.items} items, {args.steps} steps, +{args.io_ms:.0f} ms per S3 PUT:", flush=True)
        pipelining(args, tmp)
        print(f"prompt cache, {args.items} images of one prompt:", flush=True)
        prompt_cache(args, tmp)
        print(f"micro-batching, {args.items} images:", flush=True)
        micro_batching(args)
    if args.overhead_items:
        print(f"end to end through Celery, {args.overhead_items} items (bench/queue_throughput.py's runs):",
              flush=True)
        overhead(args)


def overhead(args) -> None:
    """queue_throughput's dreambatch run (plain, then micro-batching) and plain Celery, on one Redis and S3."""
    from bench.queue_throughput import dreambatch_run, plain_celery_run

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "redis").mkdir()
        redis_server = RedisServer(tmp / "redis")
        redis_server.start()
        s3, endpoint = start_s3()
        # the worker's torch on as many threads as the in-process parts above: with more OpenMP threads than
        # free cores, a batch's items encoding and uploading at once stall the model's spinning OpenMP threads
        env = service_env(redis_server.url, endpoint, tmp / "tiny", OMP_NUM_THREADS=str(args.model_threads))
        try:
            runs = {"dreambatch, 2 threads": dreambatch_run(args.overhead_items, env, tmp, endpoint, 2)}
            batch = max(args.batches)
            batched_env = {**env, "DREAMBATCH_RUNNER__BATCH_MAX": str(batch)}
            name = f"dreambatch, micro-batches of {batch}, {batch + 1} threads"
            runs[name] = dreambatch_run(args.overhead_items, batched_env, tmp, endpoint, batch + 1)
            # 10x the items: 200 empty tasks drain in ~0.3 s, too short a span to time steadily
            plain = plain_celery_run(10 * args.overhead_items, env, tmp, 2)
        finally:
            s3.stop()
            redis_server.stop()
    for name, run in runs.items():
        print(f"  {name}: {run['items_per_s']:.1f} items/s ({run['completed']}/{run['items']} completed, "
              f"submit {run['submit_s']:.2f} s), per item: wall {run['per_item_wall_s'] * 1000:.1f} ms, "
              f"model call {run['mean_inference_s'] * 1000:.1f} ms, encode+upload {run['mean_upload_s'] * 1000:.1f} ms",
              flush=True)
    print(f"  plain Celery, empty task, 2 threads: {plain['items_per_s']:.1f} items/s ({plain['items']} tasks)",
          flush=True)
    first = next(iter(runs.values()))
    print(f"  overhead ratio (plain items/s ÷ dreambatch items/s, 2 threads): "
          f"{plain['items_per_s'] / first['items_per_s']:.1f}x", flush=True)


if __name__ == "__main__":
    main()
