"""Sync wait: how long after `finish_job` a synchronous route's wait (jobs.api.service.wait_for) returns, polling
alone (its 0.1 s interval growing ×1.5 to 1 s) against woken by the app's listener of job ends.

    python bench/sync_wait.py --rounds 15

A real redis-server on loopback. Each round queues a job, waits for it, and ends it from another thread (as a
worker does) after a random 0.1..1.5 s, so the end falls anywhere between two polls.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's packages, and the test services

from services import RedisServer  # noqa: E402

AT = "2026-01-01T00:00:00+00:00"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()

    import anyio

    from jobs.api.service import Endings, wait_for
    from jobs.lifecycle import JobStatus
    from jobs.models import JobRecord
    from jobs.services import Services
    from jobs.settings import Settings
    from jobs.store import RedisStore, listen_for_endings

    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        try:
            svc = Services(Settings(redis_url=server.url))
            worker_store = RedisStore.from_url(server.url)
            rng = random.Random(0)

            async def one(n: int, endings: Endings | None) -> float:
                job_id = f"bench-{n}"
                svc.store.create_job(
                    JobRecord(job_id=job_id, model="i1-fast", output="s3://b/p", total=1, created_at=AT, updated_at=AT)
                )
                ended_at: list[float] = []
                delay = rng.uniform(0.1, 1.5)

                def end() -> None:
                    time.sleep(delay)
                    ended_at.append(time.monotonic())
                    worker_store.finish_job(job_id, JobStatus.COMPLETED, None, AT)

                threading.Thread(target=end, daemon=True).start()
                await wait_for(svc, job_id, timeout=30, endings=endings)
                return time.monotonic() - ended_at[0]

            async def run() -> dict[str, list[float]]:
                found: dict[str, list[float]] = {"poll": [], "notify": []}
                for n in range(args.rounds):
                    found["poll"].append(await one(n, None))
                endings = Endings()
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(listen_for_endings, server.url, endings.ended, logging.getLogger("bench"))
                    while worker_store.r.pubsub_numpat() < 1:
                        await anyio.sleep(0.01)
                    for n in range(args.rounds):
                        found["notify"].append(await one(args.rounds + n, endings))
                    tasks.cancel_scope.cancel()
                return found

            for mode, latencies in anyio.run(run).items():
                ms = sorted(1000 * s for s in latencies)
                print(
                    f"{mode:>6}: finish_job → wait_for returns, {len(ms)} rounds: median {statistics.median(ms):.1f} ms"
                    f", p90 {ms[int(0.9 * (len(ms) - 1))]:.1f} ms, max {ms[-1]:.1f} ms"
                )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
