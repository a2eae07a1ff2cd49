"""The `dreambatch` console script: the control-plane commands plus worker, run and models.

Nothing heavy is imported at module level: torch and diffusers load inside the commands that
need them, in the process that will use them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from jobs import keys
from jobs.cli import ModelOpt, SetOpt, app, err, fail, out, report_invalid
from jobs.errors import DreambatchError
from jobs.manifest import parse_sets
from jobs.models import MODELS
from jobs.settings import get_settings
from jobs.submit import ManifestInvalid

models_app = typer.Typer(help="Model weights: build tiny random-weight pipelines.", no_args_is_help=True)
app.add_typer(models_app, name="models")

WeightsOpt = Annotated[str | None, typer.Option(
    "--weights", help="'tiny', a local pipeline folder, or a hub id in the local cache (default: the model's)")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cuda:0, cuda:1, … or cpu")]


def _default_device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


@app.command()
def worker(
    model: Annotated[str | None, typer.Option("--model", "-m", help="serve this model's queue")] = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = "",
    io: Annotated[bool, typer.Option("--io", help="serve the I/O queue (finalize, webhooks)")] = False,
    concurrency: Annotated[int, typer.Option(help="threads; >1 overlaps encode/upload with inference")] = 0,
    loglevel: Annotated[str, typer.Option()] = "INFO",
) -> None:
    """Run a worker: one process per GPU (`--model`), or an I/O worker (`--io`)."""
    from jobs import broker
    from worker.runtime import Runtime, batches
    from worker.tasks import register

    if io == (model is not None):
        raise fail("give exactly one of --model M or --io")
    if model is not None and model not in MODELS:
        raise fail(f"--model: unknown model {model!r}; choose one of {', '.join(MODELS)}", 2)
    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = get_settings()
    celery = broker.make_celery(settings)
    if io:
        runtime = Runtime(settings, celery)
        queue, threads, name = keys.IO_QUEUE, concurrency or 8, "io"
    else:
        runtime = Runtime(settings, celery, model=model, weights=weights, device=device or _default_device())
        try:
            runtime.runner()  # load the model now, in this process, so a bad setup fails at start
        except DreambatchError as exc:
            raise fail(str(exc)) from None
        # a micro-batch needs that many items in flight, plus one encoding and uploading
        batching = batches(model, settings.runner)
        threads = concurrency or (max(settings.runner.batch_max, 4) + 1 if batching else 2)
        queue, name = keys.gpu_queue(model), f"gpu-{model}"
    register(celery, runtime)
    celery.worker_main(["worker", "-Q", queue, "-P", "threads", "-c", str(threads), "-n", f"{name}.{os.getpid()}@%h",
                        "-l", loglevel, "--without-gossip", "--without-mingle", "--without-heartbeat"])


@app.command()
def run(
    manifest: Path,
    model: ModelOpt = "i1-fast",
    out_dir: Annotated[str, typer.Option("--out", help="folder for images and results.jsonl")] = "out",
    weights: WeightsOpt = None,
    device: DeviceOpt = "",
    set_: SetOpt = None,
    webhook: Annotated[str | None, typer.Option()] = None,
    skip_invalid: Annotated[bool, typer.Option()] = False,
) -> None:
    """Local mode: run MANIFEST in this process (no Redis, no S3), same item code path as a worker."""
    from worker.local import run_local

    done = {"n": 0}

    def on_item(item_id: str, status: str) -> None:
        done["n"] += 1
        err.print(f"[{done['n']}] {item_id}: {status}", highlight=False)

    try:
        sub = run_local(manifest, model=model, defaults=parse_sets(set_ or []), out=out_dir,
                        settings=get_settings(), weights=weights, device=device or _default_device(),
                        webhook=webhook, skip_invalid=skip_invalid, on_item=on_item)
    except ManifestInvalid as exc:
        raise report_invalid(exc) from None
    except DreambatchError as exc:
        raise fail(str(exc)) from None
    job = sub.job
    out.print(f"{job.job_id}: {job.status} — {job.counts.get('completed', 0)} completed, "
              f"{job.counts.get('failed', 0)} failed of {job.total}", highlight=False, soft_wrap=True)
    out.print(f"results: {job.results_uri}", highlight=False, soft_wrap=True)
    if job.status != "completed":
        raise typer.Exit(1)


@models_app.command("make-tiny")
def make_tiny(variant: str, directory: Path) -> None:
    """Build a tiny random-weight pipeline for VARIANT (same classes and layout) in DIRECTORY."""
    from worker.runners.weights import make_tiny as build

    if variant not in MODELS:
        raise fail(f"unknown variant {variant!r}; choose one of {', '.join(MODELS)}", 2)
    path = build(variant, directory)
    out.print(str(path), highlight=False)


def main() -> None:
    app()
