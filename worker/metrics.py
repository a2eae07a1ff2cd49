"""A worker's Prometheus metrics, in a registry of its own, served by `dreambatch worker --metrics-port P`.

    dreambatch_worker_items_total{model,status}              items this process ended
    dreambatch_worker_inference_seconds{model}               model time per item (histogram)
    dreambatch_worker_model_busy_seconds_total{model}        model time in all; its rate() is the duty cycle
    dreambatch_worker_upload_seconds{model}                  encode + upload time per item (histogram)
    dreambatch_worker_stage_seconds_total{model,stage}       item time by stage (fetch, text_encode, image_encode,
                                                             denoise, refine, vae_decode, encode, upload)
    dreambatch_worker_queue_wait_seconds{model}              submit → first start (histogram)
    dreambatch_worker_webhook_deliveries_total{outcome}      delivered | http_error | network_error | refused
    dreambatch_worker_webhook_latency_seconds                per delivery attempt (histogram)
    dreambatch_worker_gpu_memory_bytes{device,kind}          allocated | reserved, when torch sees CUDA

The control plane's gauges (queues, items by status, workers) are `jobs.metrics.render`.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from jobs.models import Timings

SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
STAGES = ("fetch", "text_encode", "image_encode", "denoise", "refine", "vae_decode", "encode", "upload")
WAIT_SECONDS = (0.1, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 24 * 3600)


def cuda_memory() -> list[tuple[str, int, int]]:
    """(device, allocated, reserved) bytes of this process's CUDA memory; empty when CUDA is not in use."""
    import sys

    torch = sys.modules.get("torch")  # never import torch just for a reading (an --io worker has none)
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    n = torch.cuda.device_count()
    return [(f"cuda:{d}", torch.cuda.memory_allocated(d), torch.cuda.memory_reserved(d)) for d in range(n)]


class GpuMemoryCollector:
    """CUDA memory per device, read at scrape time (`read`: this process's, or its model process's);
    nothing when CUDA is not in use."""

    def __init__(self):
        self.read: Callable[[], list[tuple[str, int, int]]] = cuda_memory

    def collect(self):
        family = GaugeMetricFamily(
            "dreambatch_worker_gpu_memory_bytes", "CUDA memory held by this worker's model", labels=["device", "kind"]
        )
        for device, allocated, reserved in self.read():
            family.add_metric([device, "allocated"], allocated)
            family.add_metric([device, "reserved"], reserved)
        yield family


class WorkerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.items = Counter("dreambatch_worker_items", "items this worker ended", ["model", "status"], registry=r)
        self.inference = Histogram(
            "dreambatch_worker_inference_seconds", "model time per item", ["model"], buckets=SECONDS, registry=r
        )
        self.busy = Counter(
            "dreambatch_worker_model_busy_seconds",
            "seconds the model worked on items (a micro-batch counted once); rate() = the model's duty cycle",
            ["model"],
            registry=r,
        )
        self.upload = Histogram(
            "dreambatch_worker_upload_seconds", "encode + upload time per item", ["model"], buckets=SECONDS, registry=r
        )
        self.stages = Counter(
            "dreambatch_worker_stage_seconds",
            "seconds items spent in each stage (the model's stages add up to model_busy_seconds)",
            ["model", "stage"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "dreambatch_worker_queue_wait_seconds",
            "submit to first start per item",
            ["model"],
            buckets=WAIT_SECONDS,
            registry=r,
        )
        self.webhooks = Counter(
            "dreambatch_worker_webhook_deliveries", "webhook delivery attempts by outcome", ["outcome"], registry=r
        )
        self.webhook_latency = Histogram(
            "dreambatch_worker_webhook_latency_seconds", "per delivery attempt", buckets=SECONDS, registry=r
        )
        self.gpu_memory = GpuMemoryCollector()
        r.register(self.gpu_memory)

    def item_ended(self, model: str, status: str, timings: Timings) -> None:
        self.items.labels(model, status).inc()
        if timings.inference_s is not None:
            self.inference.labels(model).observe(timings.inference_s)
            self.busy.labels(model).inc(timings.inference_s)
        if timings.upload_s is not None:
            self.upload.labels(model).observe(timings.upload_s + (timings.encode_s or 0.0))
        for stage in STAGES:
            seconds = getattr(timings, f"{stage}_s")
            if seconds is not None:
                self.stages.labels(model, stage).inc(seconds)
        if timings.queue_wait_s is not None:
            self.queue_wait.labels(model).observe(timings.queue_wait_s)

    def webhook_attempt(self, attempt) -> None:
        """One `worker.webhooks.Attempt`."""
        if attempt.delivered:
            outcome = "delivered"
        elif attempt.refused:
            outcome = "refused"
        elif attempt.status_code is not None:
            outcome = "http_error"
        else:
            outcome = "network_error"
        self.webhooks.labels(outcome).inc()
        self.webhook_latency.observe(attempt.latency_s)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Serve /metrics on `port` from a daemon thread."""
        start_http_server(port, addr=addr, registry=self.registry)
