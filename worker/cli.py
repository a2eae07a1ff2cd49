"""The `dreambatch` console script: `build_app` puts the control-plane and catalog commands together with
worker, run, sheet and models, defined here.

Nothing heavy is imported at module level: torch and diffusers load inside the commands that
need them, in the process that will use them.
"""

from __future__ import annotations

import atexit
import logging
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from jobs import cli as jobs_cli
from jobs import keys, lifecycle
from jobs.api import keys_cli
from jobs.catalog import cli as catalog_cli
from jobs.cli import ModelOpt, PresetOpt, SetOpt, err, fail, guarded, out, report_invalid, warn
from jobs.envfile import load_env_file
from jobs.errors import DreambatchError, ManifestInvalid
from jobs.lifecycle import JobStatus
from jobs.modelspecs import MODELS

if TYPE_CHECKING:
    from jobs.settings import RunnerSettings

WeightsOpt = Annotated[
    str | None,
    typer.Option(
        "--weights", help="'tiny', a local pipeline folder, or a hub id in the local cache (default: the model's)"
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="cuda:0, cuda:1, … or cpu")]
I1FullOpt = Annotated[
    str | None,
    typer.Option(
        "--i1-full", help="HiDream-I1-Full folder or cached hub id, for E1 models (DREAMBATCH_RUNNER__I1_FULL)"
    ),
]
LlamaOpt = Annotated[
    str | None, typer.Option("--llama", help="Llama 3.1 8B Instruct folder or cached hub id (DREAMBATCH_RUNNER__LLAMA)")
]


def _settings(i1_full: str | None = None, llama: str | None = None):
    """The process settings, with the component folders the command line names on top."""
    from jobs.settings import get_settings

    settings = get_settings()
    given = {name: value for name, value in (("i1_full", i1_full), ("llama", llama)) if value}
    if not given:
        return settings
    return settings.model_copy(update={"runner": settings.runner.model_copy(update=given)})


def worker(
    model: Annotated[str | None, typer.Option("--model", "-m", help="serve this model's queue")] = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = "",
    i1_full: I1FullOpt = None,
    llama: LlamaOpt = None,
    io: Annotated[bool, typer.Option("--io", help="serve the I/O queue (finalize, webhooks)")] = False,
    concurrency: Annotated[
        int,
        typer.Option(
            help="item threads (default 3: one on the model, one fetching the next input, one uploading the last "
            "output; with micro-batching 3 x the batch limit)"
        ),
    ] = 0,
    loglevel: Annotated[str, typer.Option()] = "INFO",
    log_format: Annotated[str, typer.Option(help="text, or json: one object per line with job_id/item_id")] = "text",
    metrics_port: Annotated[
        int | None, typer.Option(help="serve Prometheus metrics on this port (/metrics); off by default")
    ] = None,
) -> None:
    """Run a worker: one process per GPU (`--model`), or an I/O worker (`--io`)."""
    from jobs import logs, store
    from jobs.services import Services
    from worker.heartbeat import Heartbeat
    from worker.runtime import Runtime
    from worker.tasks import register

    if io == (model is not None):
        raise fail("give exactly one of --model M or --io")
    if model is not None and model not in MODELS:
        raise fail(f"--model: unknown model {model!r}; choose one of {', '.join(MODELS)}", 2)
    if log_format not in ("text", "json"):
        raise fail(f"--log-format: expected text or json (got {log_format!r})", 2)
    logs.configure(loglevel, log_format)
    settings = _settings(i1_full, llama)
    store.say_if_unreachable(settings.redis_url, logging.getLogger("dreambatch.worker"), "This worker")
    services = Services(settings)
    celery = services.celery
    if model is None:  # (--io: the check above)
        from worker import sweeper
        from worker.webhooks import DeliverySlots

        runtime = Runtime(services)
        queue, threads, name = keys.IO_QUEUE, concurrency or 8, "io"
        # deliveries take all but two threads (a third of those per receiver host): finalizing never waits on them
        runtime.deliveries = DeliverySlots.for_threads(threads, FREE_FOR_FINALIZE)
        sweeper.start(services)  # periodic reconciliation of jobs whose live state was lost
    else:
        from worker.runtime import check_device

        # the model runs in a process of its own (worker.modelproc), loaded now so a bad setup fails at start
        runtime = Runtime(
            services, model=model, weights=weights, device=check_device(device), model_process=(loglevel, log_format)
        )
        try:
            runtime.runner()
        except DreambatchError as exc:
            raise fail(str(exc)) from None
        threads = concurrency or default_threads(model, settings.runner)
        queue, name = keys.gpu_queue(model), f"gpu-{model}"
        if threads > 1:  # items past the model end in processes of their own: at most threads - 1 at once
            from worker.finisher import MOST_PROCESSES, Finisher

            runtime.finisher = Finisher(min(threads - 1, MOST_PROCESSES))
            runtime.finisher.warm()
    register(celery, runtime)
    if metrics_port is not None:
        runtime.metrics.serve(metrics_port)
    worker_name = runtime.name = f"{name}.{os.getpid()}@{socket.gethostname()}"
    from worker import recovery

    recovery.start(services, worker_name)  # items of workers that died are queued again once their leases expire
    Heartbeat(
        runtime, worker_name, queue, settings.celery.heartbeat, chores=_expiry_chore(runtime) if io else None
    ).start()
    asked_to_stop = _stop_requests()
    argv = [
        "worker",
        "-Q",
        queue,
        "-P",
        "threads",
        "-c",
        str(threads),
        "-n",
        f"{name}.{os.getpid()}@%h",
        "-l",
        loglevel,
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    started = time.monotonic()
    try:
        celery.worker_main(argv)
        code: object = 0
    except SystemExit as exc:
        code = exc.code
    if not asked_to_stop.is_set():  # Celery gave up on its own (a broker crash it did not recover from)
        _restart_in_place(code, time.monotonic() - started)
    raise SystemExit(code)


def _stop_requests() -> threading.Event:
    """Set once a signal (SIGTERM, SIGINT, SIGQUIT) asks this worker to stop."""
    from celery.signals import worker_shutting_down

    asked = threading.Event()
    worker_shutting_down.connect(lambda *args, **kwargs: asked.set(), weak=False)
    return asked


RESTART_PAUSE = 2.0  # s before a worker that stopped on its own starts again
RESTARTS_IN_A_ROW = 5  # …at most this many times when each run lasts under a minute (then it exits 1)
RESTARTS = "DREAMBATCH_WORKER_RESTARTS"  # env: restarts in a row so far (set for the restarted process)


def _restart_in_place(code: object, ran_s: float) -> None:
    """A worker that nobody asked to stop must not stay stopped: Celery ends its main loop on an error it
    cannot recover from (a broker connection that broke the wrong way: "Unrecoverable error" above), and
    its process would exit as if all were well. Start it again in this process (same pid, same command),
    so it picks its queue up as soon as the broker answers; its items in flight are recovered
    (worker.recovery), since the warm shutdown before this let its threads finish."""
    import sys

    log = logging.getLogger("dreambatch.worker")
    in_a_row = int(os.environ.get(RESTARTS, "0")) + 1 if ran_s < 60 else 1
    if in_a_row > RESTARTS_IN_A_ROW:
        log.error(
            "this worker stopped on its own %d times in a row, each within a minute of starting; not starting it "
            "again (see the errors above; check DREAMBATCH_REDIS_URL and that Redis answers)",
            in_a_row - 1,
        )
        raise SystemExit(1)
    log.error(
        "this worker stopped on its own (exit code %s), most likely after its broker connection broke; "
        "restarting it in place in %.0fs",
        code,
        RESTART_PAUSE,
    )
    time.sleep(RESTART_PAUSE)
    os.environ[RESTARTS] = str(in_a_row)
    os.execv(sys.executable, sys.orig_argv)


FREE_FOR_FINALIZE = 2  # threads of an I/O worker webhook deliveries never take
PIPELINE_THREADS = 3  # the model's item, the next item's fetch + decode, the last item's encode + upload


def default_threads(model: str, options: RunnerSettings) -> int:
    """Item threads of a GPU worker: a three-stage pipeline, so the model never waits on I/O while an item's
    time outside the model is below its model call; with micro-batching, each stage a whole batch."""
    from worker.runtime import batches

    if not batches(model, options):
        return PIPELINE_THREADS
    from worker.runners.batching import AUTO_MAX

    return PIPELINE_THREADS * (options.batch_max or AUTO_MAX)


def _expiry_chore(runtime):
    """An I/O worker ends never-started items of jobs past their deadline, even when no GPU reaches them."""
    from jobs.control import expire_due

    log = logging.getLogger("dreambatch.worker")

    def chore() -> None:
        for job_id, ids in expire_due(runtime.services).items():
            log.info("job %s: %d item(s) expired before they started", job_id, len(ids), extra={"job_id": job_id})

    return chore


def run(
    manifest: Path,
    model: ModelOpt = "i1-fast",
    out_dir: Annotated[str, typer.Option("--out", help="folder (or s3://bucket/prefix) for images, results")] = "out",
    weights: WeightsOpt = None,
    device: DeviceOpt = "",
    i1_full: I1FullOpt = None,
    llama: LlamaOpt = None,
    set_: SetOpt = None,
    preset: PresetOpt = None,
    webhook: Annotated[str | None, typer.Option()] = None,
    skip_invalid: Annotated[bool, typer.Option()] = False,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="go on with the run of MANIFEST that Ctrl-C stopped in --out: its unended items"),
    ] = False,
) -> None:
    """Local mode: run MANIFEST in this process (no Redis), same item code path as a worker. Ctrl-C stops at the
    running item's next step; --resume then runs the rest."""
    import threading

    from jobs.manifest import parse_sets
    from jobs.models import JobSpec
    from jobs.presets import job_defaults
    from worker.local import run_local
    from worker.progress import RunProgress, ctrl_c_stops
    from worker.runtime import check_device

    stop = threading.Event()
    try:
        settings = _settings(i1_full, llama)
        defaults = job_defaults(preset, parse_sets(set_ or []), settings)
        device = check_device(device)
        spec = JobSpec(model=model, defaults=defaults, output=out_dir, webhook=webhook, skip_invalid=skip_invalid)
        with RunProgress(err) as progress, ctrl_c_stops(stop):
            sub = run_local(
                manifest,
                spec,
                settings=settings,
                weights=weights,
                device=device,
                observer=progress,
                stop=stop,
                resume=resume,
            )
    except ManifestInvalid as exc:
        raise report_invalid(exc) from None
    except KeyboardInterrupt:
        raise fail("interrupted before any item ran; nothing to resume", 130) from None
    job = sub.job
    c = job.counts
    if job.interrupted_at:
        again = [
            "dreambatch",
            "run",
            str(manifest),
            "--model",
            model,
            "--out",
            out_dir,
            "--resume",
            *(["--weights", weights] if weights else []),
            *(["--device", device] if device != "cpu" else []),
        ]
        out.print(
            f"{job.job_id}: interrupted — {c.get('completed', 0)} completed, {c.get('failed', 0)} failed, "
            f"{job.total - lifecycle.ended(c)} not run of {job.total}",
            soft_wrap=True,
        )
        out.print(f"results so far: {job.results_uri}", soft_wrap=True)
        out.print(f"to run the rest: {shlex.join(again)}", soft_wrap=True)
        raise typer.Exit(130)
    out.print(
        f"{job.job_id}: {job.status} — {c.get('completed', 0)} completed, {c.get('failed', 0)} failed of {job.total}"
        f" ({job.gpu_s:.1f} GPU-s of model time)",
        soft_wrap=True,
    )
    out.print(f"results: {job.results_uri}", soft_wrap=True)
    if job.status != JobStatus.COMPLETED:
        raise typer.Exit(1)


def sheet(
    job_id: str,
    output: Annotated[
        str | None,
        typer.Option(
            help="where the job is: s3://bucket/prefix or a local folder "
            "(default: the job's own, else DREAMBATCH_OUTPUT)"
        ),
    ] = None,
    to: Annotated[Path | None, typer.Option("--to", help="also write the page(s) into this folder")] = None,
    page_size: Annotated[int, typer.Option(help="rows per page")] = 200,
) -> None:
    """Make JOB_ID's review contact sheet: sheet.html (before/after pairs, ids, metadata, output links)
    and sheet.png, written next to the job."""
    from jobs import store
    from jobs.services import get_services
    from jobs.settings import get_settings
    from jobs.storage import check_location
    from worker.contact_sheet import make_sheet

    settings = get_settings()
    services = get_services()
    try:
        if output is None:  # the job's own location, from Redis; without Redis, DREAMBATCH_OUTPUT
            if (away := store.problem(settings.redis_url)) is None:
                job = services.store.get_job(job_id)
                output = job.output if job else settings.output
            elif settings.output:
                warn(f"{away}; looking for the job under DREAMBATCH_OUTPUT ({settings.output})")
                output = settings.output
            else:
                raise away
        if not output:
            raise fail("--output is required (the job is not in Redis and DREAMBATCH_OUTPUT is not set)")
        check_location(output, settings)
        pages = make_sheet(job_id, services.objects(output), settings, services.objects, page_size, to)
    except DreambatchError as exc:
        raise fail(str(exc)) from None
    for page in pages:
        out.print(f"{page.html_uri}  {page.png_uri}  ({page.pairs} rows)", highlight=False, soft_wrap=True)


def download(model: Annotated[str, typer.Argument(help=f"one of: {', '.join(MODELS)}")]) -> None:
    """Download MODEL's weights and the components it needs (HiDream-I1-Full for E1, the Llama 3.1 text encoder)
    into the local Hugging Face cache (HF_HOME; the compose GPU worker mounts it). Needs the hub; the Llama
    repo is gated (accept its licence, then hf auth login)."""
    from worker.hub import download as fetch

    for folder in fetch(model, say=lambda line: err.print(line, soft_wrap=True)):
        out.print(str(folder))
    err.print(f"done: dreambatch worker --model {model} finds them in the cache", soft_wrap=True)


def make_tiny(variant: str, directory: Path) -> None:
    """Build a tiny random-weight pipeline for VARIANT (same classes and layout) in DIRECTORY."""
    from worker.runners.tiny import make_tiny as build

    if variant not in MODELS:
        raise fail(f"unknown variant {variant!r}; choose one of {', '.join(MODELS)}", 2)
    path = build(variant, directory)
    out.print(str(path), highlight=False)


# commands a person runs against the live state: Redis is reached first, or they say in seconds that it is not there
NEEDS_REDIS = {
    "submit",  # (not with --api: the API reaches Redis then)
    "reconcile",
    "purge",
    "cancel",
    "retry",
    "resume",
    "top",
    "webhooks",
    "status",
    "results",
    "keys",
    "schedules",
}


def build_app() -> typer.Typer:
    """The `dreambatch` command line. Every command and group is added here, in the order `--help` lists
    them; the modules named only define the commands. Each runs `guarded` (jobs.cli): one line, never a
    traceback, for what it could not do; those in NEEDS_REDIS reach Redis first. Long-running processes
    (worker, api, beat) are not held to that: they say in their logs that Redis is away and wait for it."""
    app = typer.Typer(
        help="dreambatch: batch HiDream image jobs on your own GPUs.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
    )
    commands: dict[str, Callable[..., Any]] = {
        # the control plane (jobs.cli): manifests and jobs
        "validate": jobs_cli.validate,
        "submit": jobs_cli.submit,
        "reconcile": jobs_cli.reconcile,
        "purge": jobs_cli.purge,
        "cancel": jobs_cli.cancel,
        "retry": jobs_cli.retry,
        "resume": jobs_cli.resume,
        "top": jobs_cli.top,
        "webhooks": jobs_cli.webhooks,
        "status": jobs_cli.status,
        "results": jobs_cli.results,
        "api": jobs_cli.api,
        # the catalog (jobs.catalog.cli)
        "beat": catalog_cli.beat,
        "presets": catalog_cli.presets,
        # the data plane (this module)
        "worker": worker,
        "run": run,
        "sheet": sheet,
    }
    groups: dict[str, tuple[str, dict[str, Callable[..., Any]]]] = {
        "keys": (
            "API keys for `dreambatch api`: create (shown once), list, revoke.",
            {"create": keys_cli.create, "list": keys_cli.list_keys, "revoke": keys_cli.revoke},
        ),
        "schedules": (
            "Scheduled catalog runs (the schedules file).",
            {"list": catalog_cli.list_schedules, "run": catalog_cli.run_now},
        ),
        "models": (
            "Model weights: download them into the local hub cache, or build tiny random ones.",
            {"download": download, "make-tiny": make_tiny},
        ),
    }
    for name, command in commands.items():
        app.command(name)(guarded(command, needs_redis=name in NEEDS_REDIS))
    for name, (help_text, subcommands) in groups.items():
        group = typer.Typer(help=help_text, no_args_is_help=True)
        for sub, command in subcommands.items():
            group.command(sub)(guarded(command, needs_redis=name in NEEDS_REDIS))
        app.add_typer(group, name=name)
    return app


def main() -> None:
    load_env_file()  # (before the options are parsed: some fall back on variables .env may set)
    try:
        build_app()()
        code: object = 0
    except SystemExit as exc:  # (how typer ends every command)
        code = exc.code
    _exit_now(code)


def _exit_now(code: object) -> NoReturn:
    """End the process as a normal exit would, less Python's teardown of every module it imported (measured:
    ~0.35 s of a `submit`, a third of its time): threads joined as at shutdown, atexit handlers, streams
    flushed, then os._exit with the command's code."""
    shutdown = getattr(threading, "_shutdown", None)  # what the interpreter's exit calls: joins non-daemon threads
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)  # (SystemExit("message"), as the interpreter prints it)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(code or 0)
