"""One run, side by side: the model's duty cycle with and without pipelining, the prompt-cache gain, the
micro-batching gain, and the dreambatch-vs-plain-Celery overhead ratio, on tiny weights on the CPU.

    python bench/speed.py --items 40 --steps 4 --io-ms 40,100

Duty cycle: real worker processes (`dreambatch worker`, one GPU worker and one I/O worker) on a real
redis-server, with moto's S3 server behind a loopback proxy that delays every PUT by `--io-ms` (each value
in turn; standing in
for a real S3 upload and a real-size image's encode, which the tiny model's 64² images do not have; an item
makes 2 PUTs: its image and its record). Each item's record says when its model call started and how long it
took (`timings.model_started_at`, `inference_s`); a micro-batch's items share one span. Duty cycle = model
busy time ÷ wall time from the first model call after `--warmup` to the last; gap = one model call's end to
the next one's start.

Prompt cache: `--items` images from one prompt and negative prompt (I1-Full tiny, CFG) with the cache
on and off. Micro-batching: the same items from as many threads as the batch size, through `MicroBatcher`.

Prints figures; never asserts.
"""

from __future__ import annotations

import argparse
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

from services import RedisServer, S3Proxy, service_env, start_s3  # noqa: E402


def duty_cycle(spans: list[tuple[float, float]], warmup: int) -> dict:
    spans = sorted(spans)[warmup:]
    busy = sum(end - start for start, end in spans)
    wall = spans[-1][1] - spans[0][0]
    gaps = [b[0] - a[1] for a, b in zip(spans, spans[1:], strict=False)]
    return {
        "duty": busy / wall,
        "gap_median_ms": statistics.median(gaps) * 1000,
        "gap_p90_ms": sorted(gaps)[int(0.9 * (len(gaps) - 1))] * 1000,
        "calls": len(spans),
    }


def model_spans(timings: list[dict]) -> list[tuple[float, float]]:
    """(start, end) of every model call from the items' timings (`queue_throughput.model_calls`)."""
    from bench.queue_throughput import model_calls

    return [(start, start + took) for start, took in sorted(model_calls(timings).items())]


def pipelining(args, tmp: Path) -> list[str]:

    (tmp / "redis").mkdir()
    redis_server = RedisServer(tmp / "redis")
    redis_server.start()
    s3, endpoint = start_s3()
    delay = {"s": 0.0}
    proxy = S3Proxy(endpoint, lambda method, path: time.sleep(delay["s"]) if method == "PUT" else None)
    env = service_env(redis_server.url, proxy.url, tmp / "tiny", OMP_NUM_THREADS=str(args.model_threads))
    cases = [("no pipelining (1 thread)", 1, {}), ("2 threads", 2, {}), ("default (3 threads)", None, {})]
    cases += [
        (f"micro-batches ≤{b} (default {3 * b} threads)", None, {"DREAMBATCH_RUNNER__BATCH_MAX": str(b)})
        for b in args.batches
    ]
    lines = []
    try:
        for io_ms in args.io_ms:
            delay["s"] = io_ms / 1000
            print(f" +{io_ms:.0f} ms per S3 PUT:", flush=True)
            lines += _pipelining_cases(args, cases, env, tmp, endpoint)
    finally:
        proxy.close()
        s3.stop()
        redis_server.stop()
    return lines


def _pipelining_cases(args, cases, env, tmp: Path, endpoint: str) -> list[str]:
    from bench.queue_throughput import dreambatch_run

    lines = []
    for name, threads, extra in cases:
        run = dreambatch_run(args.items, {**env, **extra}, tmp, endpoint, threads, steps=args.steps)
        cycle = duty_cycle(model_spans(run["timings"]), args.warmup)
        lines.append(
            f"  {name}: {run['items_per_s']:.2f} items/s ({run['completed']}/{args.items} completed), "
            f"duty cycle {cycle['duty']:.1%}, gap between model calls median "
            f"{cycle['gap_median_ms']:.1f} ms, p90 {cycle['gap_p90_ms']:.1f} ms ({cycle['calls']} "
            f"model calls of {run['mean_inference_s'] * 1000:.0f} ms; per item outside the model "
            f"{run['mean_outside_model_s'] * 1000:.0f} ms)"
        )
        print(lines[-1], flush=True)
    return lines


def prompt_cache(args, tmp: Path) -> list[str]:
    """Cache off and on, alternately `--repeats` times (the tiny model's figures move between runs): per image,
    the whole call and the part of it spent getting the text embeddings (encoding, or a cache hit)."""
    from jobs.settings import RunnerSettings
    from worker.runners.base import GenerateRequest
    from worker.runners.hidream_i1 import HiDreamI1Runner

    request = GenerateRequest(
        prompt="a watercolor painting of a lighthouse at dusk",
        negative_prompt="blurry",
        guidance_scale=5.0,
        scheduler="flow_unipc",
        steps=args.steps,
        width=64,
        height=64,
    )
    runners, text_s = {}, {}
    for label, megabytes in [("off", 0), ("on", 64)]:
        runner = HiDreamI1Runner("i1-full", "tiny", options=RunnerSettings(prompt_cache_mb=megabytes))
        runner.load()
        runner.generate(request)  # warm-up
        text_s[label] = [0.0]
        runner.embeds = _timed(runner.embeds, text_s[label])  # the runner's own call, timed
        runners[label] = runner
    per_image: dict[str, list[float]] = {"off": [], "on": []}
    per_text: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(args.repeats):
        for label, runner in runners.items():
            text_s[label][0] = 0.0
            started = time.perf_counter()
            for seed in range(args.items):
                runner.generate(GenerateRequest(**{**request.__dict__, "seed": seed}))
            per_image[label].append((time.perf_counter() - started) / args.items)
            per_text[label].append(text_s[label][0] / args.items)
    lines = []
    for label, runner in runners.items():
        lines.append(
            f"  cache {label}: {statistics.median(per_image[label]) * 1000:.1f} ms per image, of which "
            f"text embeddings {statistics.median(per_text[label]) * 1000:.2f} ms (median of "
            f"{args.repeats}; i1-full tiny, CFG, {args.steps} steps), {runner.prompts.hits} hits / "
            f"{runner.prompts.misses} misses"
        )
        print(lines[-1], flush=True)
    gain = 1 - statistics.median(per_image["on"]) / statistics.median(per_image["off"])
    lines.append(
        f"  gain per image {gain:.1%}; text embeddings "
        f"{statistics.median(per_text['off']) / max(statistics.median(per_text['on']), 1e-9):.0f}x faster"
    )
    print(lines[-1], flush=True)
    return lines


def _timed(call, total: list[float]):
    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - started

    return timed


def micro_batching(args) -> list[str]:
    from jobs.settings import RunnerSettings
    from worker.runners.base import GenerateRequest
    from worker.runners.batching import MicroBatcher
    from worker.runners.hidream_i1 import HiDreamI1Runner

    runner = HiDreamI1Runner("i1-fast", "tiny", options=RunnerSettings())
    runner.load()
    requests = [
        GenerateRequest(
            prompt=f"a photo of a cat, take {i}", seed=i, steps=args.steps, width=64, height=64, scheduler="flash_flow"
        )
        for i in range(args.items)
    ]
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
        lines.append(
            f"  batch ≤{batch}: {args.items / wall:.2f} images/s, mean batch {statistics.mean(sizes):.1f} "
            f"(i1-fast tiny, {args.steps} steps, 64², model calls only)"
        )
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=40)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument(
        "--io-ms",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[40.0, 100.0],
        help="added to every S3 PUT (2 per item); a comma-separated list runs each in turn",
    )
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="prompt cache: off/on rounds, alternating")
    ap.add_argument("--window-ms", type=float, default=20.0)
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4])
    ap.add_argument("--overhead-items", type=int, default=200, help="0 skips the Celery overhead ratio")
    ap.add_argument(
        "--model-threads",
        type=int,
        default=1,
        help="torch intra-op threads: 1 leaves the other core to I/O, as a GPU leaves the host's cores",
    )
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.model_threads)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} at start",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print(f"duty cycle, {args.items} items, {args.steps} steps:", flush=True)
        pipelining(args, tmp)
        print(f"prompt cache, {args.items} images of one prompt:", flush=True)
        prompt_cache(args, tmp)
        print(f"micro-batching, {args.items} images:", flush=True)
        micro_batching(args)
    if args.overhead_items:
        print(f"end to end through Celery, {args.overhead_items} items (bench/queue_throughput.py's runs):", flush=True)
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
            runs = {"dreambatch, default 3 threads": dreambatch_run(args.overhead_items, env, tmp, endpoint)}
            batch = max(args.batches)
            batched_env = {**env, "DREAMBATCH_RUNNER__BATCH_MAX": str(batch)}
            name = f"dreambatch, micro-batches of {batch}, default {3 * batch} threads"
            runs[name] = dreambatch_run(args.overhead_items, batched_env, tmp, endpoint)
            # 10x the items: 200 empty tasks drain in ~0.3 s, too short a span to time steadily
            plain = plain_celery_run(10 * args.overhead_items, env, tmp, 3)
        finally:
            s3.stop()
            redis_server.stop()
    for name, run in runs.items():
        print(
            f"  {name}: {run['items_per_s']:.1f} items/s ({run['completed']}/{run['items']} completed, "
            f"submit {run['submit_s']:.2f} s), per item: wall {run['per_item_wall_s'] * 1000:.1f} ms, "
            f"model call {run['mean_inference_s'] * 1000:.1f} ms, "
            f"encode+upload {run['mean_upload_s'] * 1000:.1f} ms, the item's own time outside the model "
            f"{run['mean_outside_model_s'] * 1000:.1f} ms",
            flush=True,
        )
    print(
        f"  plain Celery, empty task, 3 threads: {plain['items_per_s']:.1f} items/s ({plain['items']} tasks)",
        flush=True,
    )
    first = next(iter(runs.values()))
    print(
        f"  overhead ratio (plain items/s ÷ dreambatch items/s, default threads): "
        f"{plain['items_per_s'] / first['items_per_s']:.1f}x",
        flush=True,
    )


if __name__ == "__main__":
    main()
