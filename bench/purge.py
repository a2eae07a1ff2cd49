"""Purge: the Redis memory an ended job's live state holds, and how long `purge` (what DREAMBATCH_RETENTION runs)
takes to give it back.

    python bench/purge.py --items 100000

A real redis-server on loopback. The job's items are added as submit adds them (a normalized generate row each),
moved through running to completed with an output, one webhook event logged and marked sent per item, then the
job is finished and purged (its output location is a temporary folder: no S3 is involved).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's packages, and the test services

from services import RedisServer  # noqa: E402

AT = "2026-01-01T00:00:00.000+00:00"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=100_000)
    args = ap.parse_args()

    from jobs.lifecycle import ItemStatus, JobStatus
    from jobs.models import ItemOutput, ItemRecord, JobRecord, OutputImage, item_event_id
    from jobs.retention import purge
    from jobs.services import Services
    from jobs.settings import Settings
    from jobs.storage import LocalStore

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "redis").mkdir()
        server = RedisServer(Path(tmp) / "redis")
        server.start()
        try:
            objects = LocalStore(str(Path(tmp) / "out"))
            services = Services(Settings(redis_url=server.url), objects=lambda _: objects)
            store = services.store
            base = store.r.info("memory")["used_memory"]
            job = JobRecord(
                job_id="bench", model="i1-fast", output=objects.location, webhook="https://example.com/h",
                total=args.items, created_at=AT, updated_at=AT,
            )  # fmt: skip
            store.create_job(job)
            params = {"prompt": "a studio photo of a ceramic mug, soft light", "negative_prompt": "", "width": 1024,
                      "height": 1024, "steps": 16, "guidance_scale": 0.0, "shift": 3.0, "scheduler": "flash_flow",
                      "num_images": 1, "output_format": "png", "output_quality": 90}  # fmt: skip
            for start in range(0, args.items, 1000):
                batch = [
                    ItemRecord(
                        job_id="bench",
                        item_id=f"r{n}",
                        line=n + 1,
                        params={**params, "seed": n},
                        seed=n,
                        created_at=AT,
                        updated_at=AT,
                    )  # fmt: skip
                    for n in range(start, min(start + 1000, args.items))
                ]
                store.add_items(batch)
                for item in batch:
                    store.transition(item, ItemStatus.RUNNING, count_attempt=True)
                    image = OutputImage(s3_uri=f"s3://b/bench/{item.item_id}.png", width=1024, height=1024,
                                        content_type="image/png")  # fmt: skip
                    item.output = ItemOutput(seed=item.seed, images=[image])
                    store.transition(item, ItemStatus.COMPLETED)
                    event = item_event_id("bench", item.item_id, "completed")
                    store.log_event("bench", event, {"at": time.time(), "status_code": 200, "latency_s": 0.01})
                    store.mark_sent("bench", event)
            store.finish_job("bench", JobStatus.COMPLETED, "results", AT)
            held = store.r.info("memory")["used_memory"] - base
            keys_before = store.r.dbsize()
            t0 = time.perf_counter()
            report = purge(services, "bench")
            took = time.perf_counter() - t0
            left = store.r.info("memory")["used_memory"] - base
            print(
                json.dumps(
                    {
                        "items": args.items,
                        "live_state_mb": round(held / 2**20, 1),
                        "keys_before": keys_before,
                        "keys_deleted": report.keys_deleted,
                        "keys_after": store.r.dbsize(),
                        "mb_after_purge": round(left / 2**20, 2),
                        "purge_s": round(took, 2),
                        "keys_per_s": round(report.keys_deleted / took),
                    }
                )
            )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
