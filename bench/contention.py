"""How much of an item's post-model work (PNG, two S3 puts, a Redis pipeline) a model call beside it pays for,
in one process as a GPU worker's item threads share it: the tiny I1 call alone, then with one thread doing
`--beside` items' worth of that work at the same time, interleaved, at each GIL switch interval given. Then,
on a machine of two or more CPUs, the call pinned to CPU 0 with another process busy on CPU 1 (a pure-Python
loop, then a loop allocating 8 MiB buffers) against CPU 1 idle: whether the CPUs are cores of their own or share
one (hyperthreads), which decides what work moved beside the model costs it.

    python bench/contention.py                         # switch intervals 5 ms (Python's default) and 0.5 ms
    python bench/contention.py --calls 10 --beside 3 --switch-ms 5,0.5

Starts its own redis-server and moto S3 server (its own process). Prints figures; never asserts.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from services import S3_ENV, RedisServer, s3_client, start_s3_process  # noqa: E402

BUSY = {  # what the other CPU runs, by name: a Python program, until killed
    "a pure-Python loop": "while True: sum(range(1000))",
    "a loop allocating 8 MiB buffers": "while True: bytearray(8 << 20)",
}


def other_cpu(call, calls: int) -> None:
    """Median `call()` pinned to CPU 0 with CPU 1 idle, then with each BUSY program pinned to CPU 1."""
    if len(os.sched_getaffinity(0)) < 2:
        print("one CPU: no other CPU to measure", flush=True)
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})
    try:
        idle = statistics.median(call(seed) for seed in range(calls))
        print(f"pinned to CPU 0, CPU 1 idle: model call {idle * 1000:.0f} ms", flush=True)
        for name, program in BUSY.items():
            busy = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{1}})\n{program}"])
            try:
                time.sleep(0.5)  # (started and pinned)
                took = statistics.median(call(seed) for seed in range(calls))
            finally:
                busy.kill()
                busy.wait()
            print(f"pinned to CPU 0, {name} on CPU 1: model call {took * 1000:.0f} ms ({took / idle:.2f}x)", flush=True)
    finally:
        os.sched_setaffinity(0, before)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=10, help="model calls per variant and switch interval")
    ap.add_argument("--beside", type=int, default=3, help="items' post-model work done beside each call")
    ap.add_argument("--switch-ms", default="5,0.5", help="GIL switch intervals to try (ms)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.update(S3_ENV)
    import redis
    import torch

    from jobs.models import MODELS
    from jobs.settings import RunnerSettings
    from worker.runners.base import GenerateRequest
    from worker.runners.hidream_i1 import HiDreamI1Runner

    torch.set_num_threads(1)  # (as bench/compare.py's --model-threads 1)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start", flush=True)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "redis").mkdir()
        redis_server = RedisServer(Path(d) / "redis")
        redis_server.start()
        s3_server, endpoint = start_s3_process()
        try:
            s3 = s3_client(endpoint)
            s3.create_bucket(Bucket="contention")
            r = redis.Redis.from_url(redis_server.url)
            runner = HiDreamI1Runner("i1-fast", "tiny", options=RunnerSettings())
            defaults = MODELS["i1-fast"].defaults

            def request(seed: int) -> GenerateRequest:
                return GenerateRequest.of(defaults, prompt=f"a product photo {seed}", seed=seed)

            image = runner.generate(request(0)).images[0]
            record = json.dumps({"timings": {f"t{n}": n / 7 for n in range(20)}, "params": defaults}).encode()

            def post_model_work(items: int) -> None:
                """What an item thread does after the model: encode, put the image, put its record, Redis."""
                for n in range(items):
                    buf = io.BytesIO()
                    image.save(buf, "PNG")
                    s3.put_object(Bucket="contention", Key=f"out/{n}.png", Body=buf.getvalue())
                    s3.put_object(Bucket="contention", Key=f"items/{n}.json", Body=record)
                    pipe = r.pipeline(transaction=False)
                    for field in range(10):
                        pipe.hset("item", str(field), field)
                    pipe.execute()

            post_model_work(3)  # (warm: the clients' connections, the encoder)
            started = time.perf_counter()
            post_model_work(20)
            work_ms = (time.perf_counter() - started) / 20 * 1000
            for switch_ms in (float(x) for x in args.switch_ms.split(",")):
                sys.setswitchinterval(switch_ms / 1000)
                alone, beside = [], []
                for seed in range(args.calls):
                    t0 = time.perf_counter()
                    runner.generate(request(seed))
                    alone.append(time.perf_counter() - t0)
                    side = threading.Thread(target=post_model_work, args=(args.beside,))
                    side.start()
                    t0 = time.perf_counter()
                    runner.generate(request(seed))
                    beside.append(time.perf_counter() - t0)
                    side.join()
                lost = (statistics.median(beside) - statistics.median(alone)) * 1000
                print(
                    f"switch interval {switch_ms:g} ms: model call alone {statistics.median(alone) * 1000:.0f} ms, "
                    f"beside {args.beside} items' post-model work ({args.beside * work_ms:.0f} ms of it) "
                    f"{statistics.median(beside) * 1000:.0f} ms: the call pays {lost:.0f} ms, "
                    f"{lost / (args.beside * work_ms):.0%} of that work's time; load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
            sys.setswitchinterval(0.005)

            def timed(seed: int) -> float:
                t0 = time.perf_counter()
                runner.generate(request(seed))
                return time.perf_counter() - t0

            other_cpu(timed, args.calls)
        finally:
            s3_server.kill()
            redis_server.stop()


if __name__ == "__main__":
    main()
