"""The control plane's view of the system: Prometheus gauges read from Redis at scrape time, and the
same numbers as one `Overview` for `dreambatch top`.

    dreambatch_queue_depth{queue,priority}     messages waiting per model queue (and io) and priority
    dreambatch_items{status}                   items of the most recent jobs, by status
    dreambatch_jobs{status}                    the most recent jobs, by status
    dreambatch_workers{queue}                  workers whose heartbeat is current, by queue
    dreambatch_worker_active_items{worker}     items each live worker is running
    dreambatch_job_gpu_seconds{job_id,model}   model seconds each recent job's items used, every attempt counted

Per-item histograms (inference, upload, queue wait), webhook outcomes and GPU memory are counted where
they happen, on each worker (`dreambatch worker --metrics-port P`, see worker/metrics.py).
`render(store)` is what the API serves at /metrics.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from jobs import keys
from jobs.lifecycle import ItemStatus, JobStatus
from jobs.models import MODELS
from jobs.store import RedisStore

RECENT_JOBS = 1000  # jobs counted by the item/job gauges and listed by `top`, newest first


@dataclass
class Overview:
    at: float
    queues: dict[str, dict[str, int]]  # queue → priority → waiting messages
    workers: list[dict[str, Any]]  # live heartbeats
    jobs: list[dict[str, Any]] = field(default_factory=list)  # recent jobs, newest first
    items: dict[str, int] = field(default_factory=dict)  # items of those jobs by status
    job_counts: dict[str, int] = field(default_factory=dict)  # those jobs by status

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def queue_names() -> list[str]:
    return [keys.gpu_queue(m) for m in MODELS] + [keys.IO_QUEUE]


def overview(store: RedisStore, recent: int = RECENT_JOBS) -> Overview:
    """Queues, workers and the most recent jobs, read from Redis in a few pipelined round trips."""
    lists = {q: keys.priority_lists(q) for q in queue_names()}
    lengths = store.list_lengths([name for by_pri in lists.values() for name in by_pri.values()])
    queues = {q: {pri: lengths[name] for pri, name in by_pri.items()} for q, by_pri in lists.items()}
    items = {s.value: 0 for s in ItemStatus}
    job_counts = {s.value: 0 for s in JobStatus}
    jobs = []
    for job in store.get_jobs(store.job_ids(recent)):
        job_counts[job.status] = job_counts.get(job.status, 0) + 1
        for status in items:
            items[status] += job.counts.get(status, 0)
        jobs.append(
            {
                "job_id": job.job_id,
                "model": job.model,
                "status": job.status,
                "priority": job.priority,
                "total": job.total,
                "counts": job.counts,
                "cancel_requested": job.cancel_requested,
                "submit_aborted": job.submit_aborted,
                "round": job.round,
                "gpu_s": job.gpu_s,
                "created_at": job.created_at,
                "finished_at": job.finished_at,
            }
        )
    return Overview(
        at=time.time(), queues=queues, workers=store.workers(), jobs=jobs, items=items, job_counts=job_counts
    )


def unserved(workers: list[dict[str, Any]], model: str) -> list[str]:
    """The queues a job of `model` needs that no live worker (a current heartbeat) serves: its model's queue,
    where its items run, and io, where it is finalized and its webhooks go."""
    live = {w.get("queue") for w in workers}
    return [q for q in (keys.gpu_queue(model), keys.IO_QUEUE) if q not in live]


def no_worker_warning(workers: list[dict[str, Any]], model: str) -> str | None:
    """What to tell a person whose job of `model` nobody will run (None when every queue it needs is served)."""
    missing = unserved(workers, model)
    if not missing:
        return None
    start = {keys.gpu_queue(model): f"dreambatch worker --model {model}", keys.IO_QUEUE: "dreambatch worker --io"}
    return (
        f"no live worker serves {' or '.join(missing)} (none has a current heartbeat), so the job waits until "
        f"one starts: {'; '.join(start[q] for q in missing)}"
    )


class ControlPlaneCollector:
    def __init__(self, store: RedisStore, recent: int = RECENT_JOBS):
        self.store, self.recent = store, recent

    def collect(self):
        view = overview(self.store, self.recent)
        depth = GaugeMetricFamily(
            "dreambatch_queue_depth", "messages waiting in a queue, by priority", labels=["queue", "priority"]
        )
        for queue, by_pri in view.queues.items():
            for pri, n in by_pri.items():
                depth.add_metric([queue, pri], n)
        items = GaugeMetricFamily(
            "dreambatch_items", f"items of the {self.recent} most recent jobs, by status", labels=["status"]
        )
        for status, n in view.items.items():
            items.add_metric([status], n)
        jobs = GaugeMetricFamily("dreambatch_jobs", f"the {self.recent} most recent jobs, by status", labels=["status"])
        for status, n in view.job_counts.items():
            jobs.add_metric([status], n)
        workers = GaugeMetricFamily("dreambatch_workers", "workers with a current heartbeat", labels=["queue"])
        by_queue: dict[str, int] = {q: 0 for q in view.queues}
        for w in view.workers:
            by_queue[w["queue"]] = by_queue.get(w["queue"], 0) + 1
        for queue, n in by_queue.items():
            workers.add_metric([queue], n)
        active = GaugeMetricFamily(
            "dreambatch_worker_active_items", "items a live worker is running", labels=["worker"]
        )
        for w in view.workers:
            active.add_metric([w["name"]], len(w.get("active", [])))
        gpu = GaugeMetricFamily(
            "dreambatch_job_gpu_seconds",
            f"model seconds the items of the {self.recent} most recent jobs used (every attempt counted)",
            labels=["job_id", "model"],
        )
        for job in view.jobs:
            gpu.add_metric([job["job_id"], job["model"]], job.get("gpu_s", 0.0))
        yield from (depth, items, jobs, workers, active, gpu)


def render(store: RedisStore, recent: int = RECENT_JOBS) -> tuple[bytes, str]:
    """The control-plane metrics in Prometheus' text format: (body, content type)."""
    registry = CollectorRegistry()
    registry.register(ControlPlaneCollector(store, recent))
    return generate_latest(registry), CONTENT_TYPE_LATEST
