"""B of bench/compare.py: the Celery app a user writes instead of dreambatch. One task per row; the model
loaded once per worker process; render, encode the PNG, put it to S3 with boto3, POST a webhook with httpx.

    celery -A bench.minimal_celery worker -P threads -c 3

`PlainModel` is also A's loop (bench/compare.py): diffusers' HiDreamImagePipeline called as its docs show,
with the seeding and render area dreambatch uses, so the three make the same bytes.
"""

from __future__ import annotations

import io
import os
import threading

from celery import Celery

app = Celery("minimal", broker=os.environ.get("DREAMBATCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
)


class PlainModel:
    """One loaded pipeline and what a careful user does to reproduce a seed: a generator seeded per row, and
    the flash (LCM) scheduler re-noising from that generator (as dreambatch's SeededFlowMatchLCMScheduler)."""

    def __init__(self, model: str = "i1-fast"):
        import torch

        from jobs.models import MODELS
        from jobs.settings import RunnerSettings
        from worker.runners.hidream_i1 import load_pipeline
        from worker.runners.schedulers import SeededFlowMatchLCMScheduler, make_scheduler
        from worker.runners.weights import resolve_weights

        self.torch = torch
        self.defaults = MODELS[model].defaults
        options = RunnerSettings()
        # (the tiny folder's HiDreamImagePipeline.from_pretrained, plus its Llama; render area set as ours)
        self.pipe = load_pipeline(resolve_weights(model, "tiny", options), "cpu", torch.float32, options=options)
        scheduler = make_scheduler(self.defaults["scheduler"], self.defaults["shift"], self.pipe.scheduler.config)
        if self.defaults["scheduler"] == "flash_flow":
            scheduler = SeededFlowMatchLCMScheduler.from_config(scheduler.config)
        self.pipe.scheduler = scheduler
        self.lock = threading.Lock()

    def render(self, prompt: str, seed: int) -> bytes:
        """The row's image as PNG bytes."""
        with self.lock:  # one pipeline, one call at a time (its scheduler holds the call's state)
            generator = self.torch.Generator("cpu").manual_seed(seed)
            if hasattr(self.pipe.scheduler, "generator"):
                self.pipe.scheduler.generator = generator
            image = self.pipe(
                prompt=prompt,
                width=1024,
                height=1024,
                num_inference_steps=self.defaults["steps"],
                guidance_scale=self.defaults["guidance_scale"],
                generator=generator,
            ).images[0]
        buf = io.BytesIO()
        image.save(buf, "PNG", compress_level=6)
        return buf.getvalue()


_model: PlainModel | None = None
_clients: dict[str, object] = {}
_load = threading.Lock()


def _resources():
    global _model
    with _load:
        if _model is None:
            import boto3
            import httpx

            _model = PlainModel(os.environ.get("MINIMAL_MODEL", "i1-fast"))
            _clients["s3"] = boto3.client("s3")  # (endpoint: AWS_ENDPOINT_URL_S3)
            _clients["http"] = httpx.Client(timeout=30)
    return _model, _clients["s3"], _clients["http"]


@app.task(name="minimal.render")
def render(prompt: str, seed: int, bucket: str, key: str, webhook: str) -> None:
    model, s3, http = _resources()
    data = model.render(prompt, seed)
    s3.put_object(Bucket=bucket, Key=key, Body=data, ContentType="image/png")
    http.post(webhook, json={"key": key, "seed": seed, "status": "completed"}).raise_for_status()
