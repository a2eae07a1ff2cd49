"""B of bench/compare.py: the Celery app a user writes instead of dreambatch. One task per row; the model
loaded once per worker process; render (or fetch the input from S3 with boto3 and edit it), encode the PNG,
put it to S3 with boto3, POST a webhook with httpx.

    celery -A bench.minimal_celery worker -P threads -c 3                        # minimal.render (i1-*)
    MINIMAL_MODEL=e1-1 celery -A bench.minimal_celery worker -P threads -c 3     # minimal.edit

`PlainModel` and `PlainEditModel` are also A's loop (bench/compare.py): a generation model's diffusers
HiDreamImagePipeline called as its docs show, an edit model's pipeline called as HiDream's published E1
script calls its own, with the seeding, render area and canvas dreambatch uses, so the three make the same
bytes.
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
        return png(image)


class PlainEditModel:
    """An E1 model as a user runs HiDream's published E1 script, one row at a time.

    diffusers ships no E1 pipeline, so the pipeline is dreambatch's `HiDreamE1Pipeline` (written from
    HiDream's published method), loaded the one way it can be: through dreambatch's runner
    (`HiDreamE1Runner.load`: the E1 transformer on the I1 components, the token budget), with the prompt
    cache off, as a script encodes every text on every call. It is then called with the script's arguments:
    the model's published defaults, the instruction as the prompt (the refine steps on it too: there is no
    target description), a generator seeded per row. The input is fitted to the model's canvas and the
    result brought back to the input's size as dreambatch does by default (worker/geometry.py, "pad"; the
    identity for an input already at the canvas size)."""

    def __init__(self, model: str = "e1-1"):
        import torch

        from jobs.models import MODELS
        from jobs.settings import RunnerSettings
        from worker.runners.hidream_e1 import HiDreamE1Runner

        self.torch = torch
        self.defaults = MODELS[model].defaults
        self.runner = HiDreamE1Runner(model, "tiny", options=RunnerSettings(prompt_cache_mb=0))
        self.pipe = self.runner.load()
        self.lock = threading.Lock()

    def edit(self, data: bytes, instruction: str, seed: int) -> bytes:
        """The input image's bytes edited by `instruction`, as PNG bytes."""
        from PIL import Image

        from worker import geometry

        source = Image.open(io.BytesIO(data)).convert("RGB")
        canvas, box = geometry.fit(source, self.runner.canvas_size(*source.size), "pad")
        d = self.defaults
        with self.lock:  # one pipeline, one call at a time (its scheduler holds the call's state)
            [image] = self.pipe(
                image=canvas,
                prompt=instruction,
                negative_prompt=d["negative_prompt"],
                steps=d["steps"],
                guidance_scale=d["guidance_scale"],
                image_guidance_scale=d["image_guidance_scale"],
                clip_cfg_norm=d["clip_cfg_norm"],
                refine_strength=d["refine_strength"],
                generator=self.torch.Generator("cpu").manual_seed(seed),
            )
        return png(geometry.unfit(image, box, source.size))


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", compress_level=6)
    return buf.getvalue()


def get_input(s3, uri: str) -> bytes:
    """The bytes of an s3://bucket/key input."""
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


_model: PlainModel | PlainEditModel | None = None
_clients: dict[str, object] = {}
_load = threading.Lock()


def _resources():
    global _model
    with _load:
        if _model is None:
            import boto3
            import httpx

            from jobs.models import MODELS

            name = os.environ.get("MINIMAL_MODEL", "i1-fast")
            _model = PlainEditModel(name) if MODELS[name].kind == "edit" else PlainModel(name)
            _clients["s3"] = boto3.client("s3")  # (endpoint: AWS_ENDPOINT_URL_S3)
            _clients["http"] = httpx.Client(timeout=30)
    return _model, _clients["s3"], _clients["http"]


@app.task(name="minimal.render")
def render(prompt: str, seed: int, bucket: str, key: str, webhook: str) -> None:
    model, s3, http = _resources()
    assert isinstance(model, PlainModel), "this worker runs an edit model: send minimal.edit"
    data = model.render(prompt, seed)
    s3.put_object(Bucket=bucket, Key=key, Body=data, ContentType="image/png")
    http.post(webhook, json={"key": key, "seed": seed, "status": "completed"}).raise_for_status()


@app.task(name="minimal.edit")
def edit(image: str, instruction: str, seed: int, bucket: str, key: str, webhook: str) -> None:
    model, s3, http = _resources()
    assert isinstance(model, PlainEditModel), "this worker runs a generation model: send minimal.render"
    data = model.edit(get_input(s3, image), instruction, seed)
    s3.put_object(Bucket=bucket, Key=key, Body=data, ContentType="image/png")
    http.post(webhook, json={"key": key, "seed": seed, "status": "completed"}).raise_for_status()
