"""The control-plane commands: validate, submit, status, results, and the options and output they share.

The commands are plain functions; `worker.cli.build_app`, the console script's, adds them to the
`dreambatch` app with the catalog's and the worker-side ones, each wrapped by `guarded`: the one place
that turns what a command could not do into one line on stderr (`error: cause; fix`), never a traceback,
and that first makes sure a command that needs Redis can reach it, within `DREAMBATCH_REDIS_WAIT_S`.
Everything printed is printed literally (no rich markup: `[api]` and `products[v2].csv` stay as they are).
This module never imports `worker`, torch or diffusers.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console, Group
from rich.text import Text

from jobs import keys, lifecycle
from jobs.errors import ConfigError, DreambatchError, InputError, JobNotFound, ManifestInvalid
from jobs.lifecycle import ItemStatus, JobStatus
from jobs.modelspecs import MODELS

if TYPE_CHECKING:
    from jobs.models import JobRecord

# user text (file names, messages, `pip install 'dreambatch[api]'`) is printed as it is: no markup, no highlighting
err = Console(stderr=True, markup=False, highlight=False)
out = Console(markup=False, highlight=False)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help=f"one of: {', '.join(MODELS)}")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="job default, key=value (a row overrides it)")]
PresetOpt = Annotated[
    str | None,
    typer.Option(
        "--preset", help="an edit preset (ops/presets.toml): instruction + params; --set NAME=value fills its {NAME}"
    ),
]

RemoteChecksOpt = Annotated[
    bool | None,
    typer.Option(
        "--remote-checks/--no-remote-checks",
        help="HEAD s3:// inputs and fetch URL inputs now (default DREAMBATCH_INPUTS__CHECK_REMOTE, on); "
        "off for inputs that exist only later: the worker checks them",
        show_default=False,
    ),
]


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(Text.assemble(("error:", "red"), " ", message), soft_wrap=True)
    return typer.Exit(code)


def warn(message: str) -> None:
    err.print(Text.assemble(("warning:", "yellow"), " ", message), soft_wrap=True)


# modules an extra brings: a command that imports one without it says which extra to install
EXTRA_MODULES = {
    "worker": {
        "torch",
        "diffusers",
        "transformers",
        "accelerate",
        "safetensors",
        "sentencepiece",
        "tokenizers",
        "peft",
        "torchao",
    },
    "api": {"fastapi", "uvicorn", "multipart", "python_multipart"},
}


def explain(exc: BaseException) -> str | None:
    """The line a person reads for an exception that is not one of ours but has a known cause and fix (Redis or
    S3 unreachable or refusing us, an extra not installed); None for anything else (a bug: its traceback shows)."""
    from jobs import store
    from jobs.settings import get_settings

    if isinstance(exc, store.redis_errors()):
        return str(store.unreachable(get_settings().redis_url, exc))
    if isinstance(exc, ModuleNotFoundError):
        top = (exc.name or "").split(".")[0]
        extra = next((name for name, mods in EXTRA_MODULES.items() if top in mods), None)
        if extra is None:
            return None
        torch = "pip install torch, then " if extra == "worker" else ""
        return (
            f"this command needs the {extra} extra ({top} is not installed): {torch}"
            f"pip install 'dreambatch[{extra}]' (from a checkout: pip install -e '.[{extra}]')"
        )
    if type(exc).__module__.startswith("botocore"):
        from jobs.storage import s3_error

        return str(s3_error("S3", exc))  # type: ignore[arg-type]
    return None


def guarded(command: Callable, *, needs_redis: bool = False) -> Callable:
    """`command` as the app runs it: when it `needs_redis`, Redis is reached first (waiting at most
    DREAMBATCH_REDIS_WAIT_S); then any DreambatchError, and any exception `explain` knows, ends it with one
    `error:` line and exit code 1."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            if needs_redis and not kwargs.get("api"):  # (a command given --api asks the API, which reaches it)
                from jobs import store
                from jobs.settings import get_settings

                settings = get_settings()
                store.reach(settings.redis_url, settings.redis_wait_s)
            return command(*args, **kwargs)
        except DreambatchError as exc:
            raise fail(str(exc)) from None
        except Exception as exc:
            message = explain(exc)
            if message is None:
                raise
            raise fail(message) from None

    return run


def report_invalid(exc: ManifestInvalid) -> typer.Exit:
    for line in exc.issues:
        err.print(line, highlight=False, markup=False, soft_wrap=True)
    return fail(str(exc), 2)


def validate(
    manifest: Path,
    model: ModelOpt = "i1-fast",
    set_: SetOpt = None,
    preset: PresetOpt = None,
    json_: Annotated[bool, typer.Option("--json")] = False,
    remote_checks: RemoteChecksOpt = None,
) -> None:
    """Check every row of MANIFEST; print each problem as `line N: field: message (got value)`."""
    from jobs.inputs import ImageChecks
    from jobs.manifest import input_policy, parse_sets, validate_manifest
    from jobs.presets import job_defaults
    from jobs.services import get_services
    from jobs.settings import get_settings

    try:
        policy = input_policy(manifest, get_settings())
        defaults = job_defaults(preset, parse_sets(set_ or []), get_settings())
        with ImageChecks(get_settings(), get_services().objects, remote=remote_checks) as checks:
            report = validate_manifest(manifest, model, defaults, policy, checks)
    except (InputError, ConfigError) as exc:
        raise fail(str(exc), 2) from None
    if json_:
        print(
            json.dumps(
                {
                    "rows": report.rows,
                    "valid": report.valid,
                    "errors": [str(i) for i in report.issues],
                    "notes": report.notes,
                    "metadata_columns": report.metadata_columns,
                }
            )
        )
    else:
        for issue in report.issues:
            err.print(str(issue), highlight=False, markup=False, soft_wrap=True)
        for note in report.notes[:20]:
            err.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
        if len(report.notes) > 20:
            err.print(f"note: … and {len(report.notes) - 20} more size adjustments", highlight=False)
        if report.metadata_columns:
            err.print(
                f"note: kept as metadata (not used by the model; echoed in results and webhooks): "
                f"{', '.join(report.metadata_columns)}",
                soft_wrap=True,
            )
        out.print(f"{report.rows} rows, {report.valid} valid, {len(report.issues)} error(s)", highlight=False)
    if report.issues:
        raise typer.Exit(2)


def submit(
    manifest: Path,
    model: ModelOpt = "i1-fast",
    output: Annotated[str | None, typer.Option(help="s3://bucket/prefix (default DREAMBATCH_OUTPUT)")] = None,
    webhook: Annotated[str | None, typer.Option(help="POSTed on every item and job terminal state")] = None,
    webhook_events: Annotated[
        str | None,
        typer.Option(help="events the webhook gets: start,progress,item,job (default item,job; job: only its end)"),
    ] = None,
    set_: SetOpt = None,
    preset: PresetOpt = None,
    skip_invalid: Annotated[bool, typer.Option(help="queue valid rows, record invalid ones as failed")] = False,
    wait: Annotated[bool, typer.Option(help="wait until the job ends, with a progress bar")] = False,
    sheet: Annotated[bool, typer.Option("--sheet", help="write a review contact sheet when the job ends")] = False,
    json_: Annotated[bool, typer.Option("--json")] = False,
    priority: Annotated[str, typer.Option(help="high, normal or low: a worker takes high items first")] = "normal",
    max_concurrency: Annotated[
        int | None, typer.Option(help="at most N of this job's items running at once, across all workers")
    ] = None,
    expires_after: Annotated[
        str | None,
        typer.Option(help="items not started within this long (90s, 15m, 2h, 1d) end cancelled, reason expired"),
    ] = None,
    remote_checks: RemoteChecksOpt = None,
    api: Annotated[
        str | None,
        typer.Option(
            "--api",
            envvar="DREAMBATCH_API_URL",
            help="hand the manifest to a running `dreambatch api` at this URL (POST /v1/jobs): no Redis or S3 "
            "access needed here, and a faster start; the API picks the output location",
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key", envvar="DREAMBATCH_API_KEY", help="with --api: a key with jobs:write", show_default=False
        ),
    ] = None,
) -> None:
    """Validate MANIFEST and queue one task per row; prints the job id."""
    if priority not in keys.PRIORITIES:
        raise fail(f"--priority: expected one of {', '.join(keys.PRIORITIES)} (got {priority!r})", 2)
    if max_concurrency is not None and max_concurrency < 1:
        raise fail(f"--max-concurrency: expected 1 or more (got {max_concurrency})", 2)
    if api:
        given = {"--output": output, "--preset": preset, "--sheet": sheet, "--remote-checks": remote_checks}
        for option, value in given.items():
            if value not in (None, False):
                raise fail(
                    f"{option}: not available with --api (the API decides it from its own settings); drop "
                    f"{option}, or submit without --api",
                    2,
                )
        fields = [("model", model), ("priority", priority), *(("set", pair) for pair in set_ or [])]
        asked = {"webhook": webhook, "webhook_events": webhook_events, "expires_after": expires_after}
        fields += [(name, value) for name, value in asked.items() if value]
        fields += [("max_concurrency", str(max_concurrency))] if max_concurrency else []
        fields += [("skip_invalid", "true")] if skip_invalid else []
        _submit_to_api(api, api_key, manifest, fields, wait=wait, json_=json_)
        return
    _submit_here(
        manifest, model, output, webhook, webhook_events, set_, preset, skip_invalid, wait, sheet, json_, priority,
        max_concurrency, expires_after, remote_checks,
    )  # fmt: skip


def _submit_to_api(api: str, key: str | None, manifest: Path, fields: list, *, wait: bool, json_: bool) -> None:
    """`submit --api`: the API makes the job (jobs.remote); the same output as a submit made here."""
    from jobs import remote

    try:
        made = remote.submit(api, key, manifest, fields)
    except ManifestInvalid as exc:
        raise report_invalid(exc) from None
    counts = made.get("counts") or {}
    with _watching(made["id"]):
        _submitted(
            made["id"],
            made.get("queued", 0),
            made.get("rejected", 0),
            counts.get("total", 0),
            json_,
            made.get("notes") or [],
            made.get("warning"),
        )
        if wait:
            status = made
            seen = None
            while not status.get("finished_at"):
                time.sleep(0.5)
                status = remote.job(api, key, made["id"])
                counts = status.get("counts") or {}
                line = f"{lifecycle.ended(counts)}/{counts.get('total', 0)} ended ({status.get('status')})"
                if line != seen and not json_:
                    err.print(line, highlight=False)
                seen = line
            raise typer.Exit(0 if status.get("status") == JobStatus.COMPLETED else 1)


def _submitted(
    job_id: str, queued: int, rejected: int, total: int, json_: bool, notes: list[str], warning: str | None
) -> None:
    """What a submit says of the job it made, made here or by the API: its id and counts, the manifest's notes
    on what was not checked before queueing (jobs.manifest), and `warning` (no live worker serves it)."""
    if json_:
        print(json.dumps({"job_id": job_id, "queued": queued, "rejected": rejected, "total": total}))
    else:
        out.print(job_id, highlight=False)
        err.print(f"queued {queued} item(s), rejected {rejected}", highlight=False)
        for note in (n for n in notes if "not checked before queueing" in n):
            err.print(f"note: {note}", highlight=False, soft_wrap=True)
    if warning:
        warn(warning)


def _submit_here(
    manifest: Path,
    model: str,
    output: str | None,
    webhook: str | None,
    webhook_events: str | None,
    set_: list[str] | None,
    preset: str | None,
    skip_invalid: bool,
    wait: bool,
    sheet: bool,
    json_: bool,
    priority: str,
    max_concurrency: int | None,
    expires_after: str | None,
    remote_checks: bool | None,
) -> None:
    """`submit` without --api: this process validates the manifest and makes the job (jobs.submit)."""
    from jobs.manifest import parse_sets
    from jobs.metrics import no_worker_warning
    from jobs.models import DEFAULT_WEBHOOK_EVENTS, JobSpec, parse_duration, parse_webhook_events
    from jobs.presets import job_defaults
    from jobs.services import get_services
    from jobs.settings import get_settings
    from jobs.storage import check_location
    from jobs.submit import create_job

    settings = get_settings()
    output = output or settings.output
    if not output or not output.startswith("s3://"):
        raise fail("--output s3://bucket/prefix is required (or set DREAMBATCH_OUTPUT)")
    try:
        expires_s = parse_duration(expires_after) if expires_after else None
    except InputError as exc:
        raise fail(f"--expires-after: {exc}", 2) from None
    try:
        events = parse_webhook_events(webhook_events) if webhook_events is not None else DEFAULT_WEBHOOK_EVENTS
    except InputError as exc:
        raise fail(f"--webhook-events: {exc}", 2) from None
    try:
        check_location(output, settings)  # a bucket that is not there: say so before a job exists
        spec = JobSpec(
            model=model,
            defaults=job_defaults(preset, parse_sets(set_ or []), settings),
            output=output,
            webhook=webhook,
            webhook_events=events,
            priority=priority,
            max_concurrency=max_concurrency,
            expires_after=expires_s,
            review_sheet=sheet,
            skip_invalid=skip_invalid,
            check_remote=remote_checks,
        )
        sub = create_job(spec, manifest, get_services())
    except ManifestInvalid as exc:
        raise report_invalid(exc) from None
    except DreambatchError as exc:
        raise fail(str(exc)) from None
    job_id = sub.job.job_id
    with _watching(job_id):
        warning = no_worker_warning(get_services().store.workers(), model) if sub.queued else None
        _submitted(job_id, sub.queued, sub.rejected, sub.job.total, json_, sub.report.notes, warning)
        if wait:
            job = _watch(job_id, quiet=json_, warn_unserved=False)
            raise typer.Exit(0 if job.status == JobStatus.COMPLETED else 1)


def reconcile(
    job_id: str,
    output: Annotated[
        str | None, typer.Option(help="s3://bucket/prefix the job was submitted with (default DREAMBATCH_OUTPUT)")
    ] = None,
    json_: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Rebuild JOB_ID's live state from its durable record (after Redis lost its data) and re-queue
    exactly the items that have no result."""
    from jobs import records
    from jobs.reconcile import reconcile as reconcile_job
    from jobs.services import get_services
    from jobs.settings import get_settings
    from jobs.storage import check_location

    settings = get_settings()
    output = output or settings.output
    if not output or not output.startswith("s3://"):
        raise fail("--output s3://bucket/prefix is required (or set DREAMBATCH_OUTPUT)")
    try:
        check_location(output, settings)
        services = get_services()
        objects = services.objects(output)
        spec = records.read_job(objects, job_id)
        if spec is None:
            raise JobNotFound(f"no job {job_id!r} under {output}")
        report = reconcile_job(
            job_id,
            objects,
            services.store,
            dispatch=lambda ids: services.publish(spec, ids),
            finalize=services.finalize,
            batch=settings.celery.publish_batch,
            notify=services.notify,
        )
    except DreambatchError as exc:
        raise fail(str(exc)) from None
    if json_:
        print(json.dumps(report.as_dict()))
    else:
        out.print(
            f"{job_id}: {report.total} item(s), {report.ended} ended, {report.requeued} re-queued"
            f"{'' if report.recreated else ' (repaired in place)'}"
            f"{', finalizing' if report.finalized else ''}"
            f"{f', {report.resent} webhook event(s) sent again' if report.resent else ''}",
            highlight=False,
        )


def purge(
    job_id: str,
    outputs: Annotated[
        bool, typer.Option("--outputs", help="delete its images and its whole job folder (record included) too")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="purge a job that has not ended (it is cancelled)")] = False,
    output: Annotated[
        str | None,
        typer.Option(help="where the job was written, if Redis no longer has it (default DREAMBATCH_OUTPUT)"),
    ] = None,
    json_: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Remove JOB_ID's live state from Redis now (its durable record stays, and `status`/`results` read it);
    --outputs deletes its outputs and record as well. A job that has not ended needs --force."""
    from jobs.retention import purge as purge_job
    from jobs.services import get_services

    try:
        report = purge_job(get_services(), job_id, output=output, outputs=outputs, force=force)
    except DreambatchError as exc:
        raise fail(str(exc)) from None
    if json_:
        print(json.dumps(report.as_dict()))
    else:
        kept = f"{report.objects_deleted} object(s) deleted" if outputs else f"its record stays under {report.output}"
        out.print(f"{job_id}: {report.keys_deleted} live key(s) removed; {kept}", highlight=False, soft_wrap=True)


def cancel(job_id: str, json_: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Cancel JOB_ID: queued items end cancelled now, running ones stop at their next step; outputs
    already written are kept. The job ends `cancelled` (with its webhook) when its running items stop."""
    from jobs.control import cancel_job
    from jobs.services import get_services

    try:
        job = cancel_job(get_services(), job_id)
    except DreambatchError as exc:
        raise fail(str(exc)) from None
    if json_:
        print(json.dumps(_status_object(job)))
    else:
        c = job.counts
        out.print(
            f"{job_id}: cancelling — {c.get('cancelled', 0)} cancelled, {c.get('running', 0)} running "
            f"(stop at their next step), {c.get('completed', 0)} completed kept",
            highlight=False,
            soft_wrap=True,
        )


def _requeued(job_id: str, ids: list[str], what: str, json_: bool) -> None:
    if json_:
        print(json.dumps({"job_id": job_id, "requeued": ids}))
    else:
        out.print(f"{job_id}: re-queued {len(ids)} {what} item(s)", highlight=False, soft_wrap=True)


def retry(job_id: str, json_: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Re-queue only JOB_ID's failed items, in the same job (same ids and manifest lines); the job runs
    again and ends once more. Rows rejected at submit are not retried."""
    from jobs.control import retry_job
    from jobs.services import get_services

    try:
        ids = retry_job(get_services(), job_id)
    except DreambatchError as exc:
        raise fail(str(exc)) from None
    _requeued(job_id, ids, "failed", json_)


def resume(
    job_id: str,
    output: Annotated[str | None, typer.Option(help="s3://bucket/prefix, only when Redis lost the job")] = None,
    json_: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Re-queue JOB_ID's items that have no result (after an outage lost their messages); nothing that
    ended runs again."""
    from jobs.control import resume_job
    from jobs.services import get_services
    from jobs.settings import get_settings
    from jobs.storage import check_location

    try:
        if output:
            check_location(output, get_settings())
        ids = resume_job(get_services(), job_id, output=output)
    except DreambatchError as exc:
        raise fail(str(exc)) from None
    _requeued(job_id, ids, "unfinished", json_)


def _top_tables(view) -> Group:
    from rich.table import Table

    from jobs.metrics import no_worker_warning

    now = view.at
    queues = Table("queue", *keys.PRIORITIES, "waiting", title="queues", title_justify="left")
    for queue, by_pri in view.queues.items():
        queues.add_row(queue, *(str(by_pri[p]) for p in keys.PRIORITIES), str(sum(by_pri.values())))
    workers = Table("worker", "queue", "running", "ended", "seen", title="workers", title_justify="left")
    for w in view.workers:
        workers.add_row(
            w["name"],
            w["queue"],
            " ".join(w.get("active", [])) or "-",
            str(w.get("ended", 0)),
            f"{now - w['seen']:.0f}s ago",
        )
    jobs = Table(
        "job",
        "model",
        "priority",
        "status",
        "done",
        "running",
        "failed",
        "cancelled",
        title="jobs",
        title_justify="left",
    )
    for j in view.jobs:
        if j["finished_at"] or j.get("submit_aborted"):
            continue
        c = j["counts"]
        status = j["status"] + (" (cancelling)" if j["cancel_requested"] else "")
        jobs.add_row(
            j["job_id"],
            j["model"],
            j["priority"],
            status,
            f"{lifecycle.ended(c)}/{j['total']}",
            str(c.get("running", 0)),
            str(c.get("failed", 0)),
            str(c.get("cancelled", 0)),
        )
    warnings = dict.fromkeys(
        no_worker_warning(view.workers, j["model"])
        for j in view.jobs
        if not j["finished_at"] and not j.get("submit_aborted")
    )
    lines = [Text.assemble(("warning:", "yellow"), " ", w) for w in warnings if w]
    return Group(queues, workers, jobs, *lines)


def top(
    once: Annotated[bool, typer.Option("--once", help="print the tables once and exit")] = False,
    json_: Annotated[bool, typer.Option("--json", help="print one JSON snapshot and exit")] = False,
    interval: Annotated[float, typer.Option(help="seconds between refreshes")] = 1.0,
) -> None:
    """Queues (waiting items per model and priority), live workers (heartbeats) and unfinished jobs."""
    from rich.live import Live

    from jobs.metrics import overview
    from jobs.services import get_services

    store = get_services().store
    if json_:
        print(json.dumps(overview(store).as_dict()))
        return
    if once:
        out.print(_top_tables(overview(store)))
        return
    with Live(_top_tables(overview(store)), console=out, refresh_per_second=4) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(_top_tables(overview(store)))
        except KeyboardInterrupt:
            pass


def webhooks(job_id: str, redeliver: Annotated[bool, typer.Option(help="send every event again")] = False) -> None:
    """List every webhook delivery attempt of a job (time, status, latency, error); --redeliver re-sends."""
    from jobs.models import event_item_id
    from jobs.services import get_services

    services = get_services()
    try:
        job = _load_job(job_id)
    except DreambatchError as exc:
        raise fail(str(exc)) from None
    events = services.store.events(job_id)
    for event_id, attempts in events.items():
        for n, a in enumerate(attempts, 1):
            out.print(
                f"{event_id}  #{n}  {time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(a['at']))}Z  "
                f"{a['status_code'] or '-'}  {a['latency_s'] * 1000:.0f} ms  {a['error'] or 'delivered'}",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
    unattempted = sorted(services.store.sent_events(job_id) - set(events))  # published; no attempt logged yet
    for event_id in unattempted:
        out.print(f"{event_id}  published, no delivery attempt logged", highlight=False, markup=False, soft_wrap=True)
    if redeliver:
        if not job.webhook:
            raise fail(f"job {job_id} has no webhook")
        every = [*events, *unattempted]
        services.notify([(job_id, event_item_id(job_id, event_id), event_id) for event_id in every])
        err.print(f"re-sending {len(every)} event(s)", highlight=False)


def _load_job(job_id: str) -> JobRecord:
    """The job's live state; for a job whose live state was purged, its durable record (or why there is none)."""
    from jobs.retention import purged_job
    from jobs.services import get_services

    job = get_services().store.get_job(job_id)
    if job is None:
        return purged_job(get_services(), job_id)
    return job


def _status_object(job: JobRecord, steps: dict[str, tuple[int, int]] | None = None) -> dict:
    from jobs import pace

    counts = {"total": job.total, **{s.value: job.counts.get(s, 0) for s in ItemStatus}}
    return {
        "job_id": job.job_id,
        "status": job.status,
        "model": job.model,
        "counts": counts,
        "results": job.results_uri,
        "created_at": job.created_at,
        "finished_at": job.finished_at,
        "priority": job.priority,
        "cancel_requested": job.cancel_requested,
        "round": job.round,
        **pace.since(job).as_dict(),
        "gpu_s": job.gpu_s,
        "running": pace.running(steps or {}),
    }


@contextmanager
def _watching(job_id: str) -> Iterator[None]:
    """A Ctrl-C once the job exists, at any moment (its id being printed, the watch's set-up, the bar), stops
    watching it, not the job: say so and how to watch again (typer would exit 130 without a word)."""
    try:
        yield
    except KeyboardInterrupt:
        err.print(f"stopped watching; job {job_id} goes on: dreambatch status {job_id} --watch", soft_wrap=True)
        raise typer.Exit(130) from None


def _watch(job_id: str, quiet: bool = False, interval: float = 0.5, *, warn_unserved: bool = True) -> JobRecord:
    """A live bar until the job ends: ended/total, failed, the rate and ETA of what ended while watching
    (jobs.pace.Meter) and the running items' denoising steps; `warn_unserved`: first say if no live worker
    serves it (a submit has said so already)."""
    with _watching(job_id):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        from jobs import pace
        from jobs.services import get_services

        columns = [
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("failed {task.fields[failed]}", markup=False),
            TextColumn("{task.fields[rate]}", markup=False),
            TextColumn("ETA {task.fields[eta]}", markup=False),
            TextColumn("{task.fields[steps]}", markup=False),
        ]
        services = get_services()
        job = _load_job(job_id)
        if warn_unserved and not job.finished_at and not quiet and (warning := _unserved(job)):
            warn(warning)
        meter = pace.Meter()
        with Progress(*columns, console=err, disable=quiet) as progress:
            bar = progress.add_task(job_id, total=job.total, failed=0, rate="", eta="", steps="")
            while True:
                job = _load_job(job_id)
                ended = lifecycle.ended(job.counts)
                now = meter.observe(ended, job.total, job)
                steps = {} if job.finished_at else services.store.running_steps(job_id)
                progress.update(
                    bar,
                    total=job.total,
                    completed=ended,
                    failed=job.counts.get("failed", 0),
                    rate=now.text(),
                    eta=now.eta_text(),
                    steps=pace.steps_text(steps),
                )
                if job.finished_at or job.submit_aborted:
                    return job
                time.sleep(interval)


def _unserved(job: JobRecord) -> str | None:
    from jobs.metrics import no_worker_warning
    from jobs.services import get_services

    return no_worker_warning(get_services().store.workers(), job.model)


def status(
    job_id: str,
    watch: Annotated[bool, typer.Option("--watch")] = False,
    json_: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show a job's status and counts (`--watch`: a live progress bar until it ends)."""
    from jobs import pace
    from jobs.retention import purged_message
    from jobs.services import get_services

    try:
        job = _watch(job_id) if watch else _load_job(job_id)
        steps = {} if job.finished_at else get_services().store.running_steps(job_id)
    except DreambatchError as exc:
        raise fail(str(exc)) from None
    obj = _status_object(job, steps)
    if not get_services().store.get_job(job_id) and (note := purged_message(get_services(), job_id)):
        warn(f"{note}: this is what that record says")
    if json_:
        print(json.dumps(obj))
        return
    c = obj["counts"]
    out.print(
        f"{job.job_id}  {job.status}  model={job.model}  total={c['total']} queued={c['queued']} "
        f"running={c['running']} completed={c['completed']} failed={c['failed']} cancelled={c['cancelled']}",
        highlight=False,
        soft_wrap=True,
    )
    rate = pace.since(job)
    out.print(
        f"rate: {rate.text()}  "
        + ("" if job.finished_at else f"ETA {rate.eta_text()}  ")
        + f"model time: {job.gpu_s:.1f} GPU-s",
        highlight=False,
        soft_wrap=True,
    )
    if steps:
        out.print(f"running: {pace.steps_text(steps, limit=10)}", highlight=False, soft_wrap=True)
    if job.results_uri:
        out.print(f"results: {job.results_uri}", highlight=False, soft_wrap=True)
    if job.submit_aborted:
        warn(f"its submission failed, so nothing of it runs; submit the manifest again ({job.manifest})")
    elif job.submitting:
        warn("its submission has not completed: if the submit that made it failed, nothing of it runs")
    elif not job.finished_at and not watch and (warning := _unserved(job)):
        warn(warning)


def results(job_id: str, format_: Annotated[str, typer.Option("--format", help="jsonl or csv")] = "jsonl") -> None:
    """Print a job's results, one line per manifest row (live state while it runs)."""
    from jobs import export
    from jobs.services import get_services

    if format_ not in ("jsonl", "csv"):
        raise fail(f"--format: expected jsonl or csv (got {format_!r})", 2)
    try:
        job = _load_job(job_id)
        lines = list(export.result_lines(job, get_services()))
    except DreambatchError as exc:
        raise fail(str(exc)) from None
    sys.stdout.writelines(export.jsonl_rows(lines) if format_ == "jsonl" else export.csv_rows(lines))


def api(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    ssl_certfile: Annotated[
        str | None,
        typer.Option(
            help="serve HTTPS with this PEM certificate (fal-client speaks only https); DREAMBATCH_API__SSL_CERTFILE"
        ),
    ] = None,
    ssl_keyfile: Annotated[str | None, typer.Option(help="its PEM private key; DREAMBATCH_API__SSL_KEYFILE")] = None,
) -> None:
    """Serve the HTTP API (docs/api.md): jobs, OpenAI-compatible images, and the fal, inference.sh and
    WaveSpeed protocols. Needs the `api` extra and a key from `dreambatch keys create`."""
    from jobs.settings import get_settings

    try:
        from jobs.api.app import serve
    except ImportError as exc:
        raise fail(f"the API needs the api extra: pip install 'dreambatch[api]' ({exc})") from None
    try:
        serve(get_settings(), host, port, ssl_certfile, ssl_keyfile)
    except ConfigError as exc:
        raise fail(str(exc)) from None
