"""Catalog commands: `schedules list|run`, `beat`, `presets`. worker.cli.build_app adds them to the `dreambatch` app."""

from __future__ import annotations

import json
import logging
import signal
from datetime import UTC, datetime
from functools import partial
from typing import Annotated, Any

import typer

from jobs.cli import SetOpt, err, fail, out
from jobs.errors import DreambatchError

JsonOpt = Annotated[bool, typer.Option("--json")]


def list_schedules(json_: JsonOpt = False) -> None:
    """Every schedule: cron and time zone, next fire time, last run and its job."""
    from jobs.catalog.schedules import load_schedules
    from jobs.services import get_services
    from jobs.settings import get_settings

    settings = get_settings()
    try:
        schedules = load_schedules(settings)
        services = get_services()
        state, store = services.schedule_state, services.store
        now = datetime.now(UTC)
        rows: list[dict[str, Any]] = []
        for s in schedules.values():
            last = state.last_run(s.name)
            job = store.get_job(last["job_id"]) if last and last.get("job_id") else None
            upcoming = s.next_fire(now)
            rows.append(
                {
                    "name": s.name,
                    "cron": s.cron,
                    "timezone": s.timezone,
                    "model": s.model,
                    "source": s.source.prefix or s.source.manifest,
                    "output": s.output,
                    "next_fire": upcoming.isoformat() if upcoming else None,
                    "next_fire_local": upcoming.astimezone(s.zone).isoformat() if upcoming else None,
                    "last_run": last,
                    "last_job_status": job.status if job else None,
                }
            )
    except DreambatchError as exc:
        raise fail(str(exc)) from None
    if json_:
        print(json.dumps(rows))
        return
    for r in rows:
        last = r["last_run"]
        when = f"next {r['next_fire_local']}" if r["next_fire"] else "by hand only"
        if not last:
            ran = "never run"
        elif last.get("error"):
            then = (
                f"retrying in {last['retry_in']:.0f}s"
                if last.get("retry_in") is not None
                else "not retried: run it by hand"
            )
            ran = f"last run {last['at']}: failed (attempt {last['attempt']}): {last['error']}; {then}"
        else:
            ran = (
                f"last run {last['at']}: job {last['job_id'] or '-'} ({r['last_job_status'] or 'no job'}), "
                f"{last['queued']} queued, {last['unchanged']} unchanged, {last['skipped']} skipped"
                f"{_found(last)}"
            )
        out.print(
            f"{r['name']}  {r['cron'] or '-'} {r['timezone']}  {when}  {ran}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )


def _found(last: dict) -> str:
    """What the last run found that a person should act on: deleted images (and what became of their outputs),
    objects that failed for the first time, empty or unreadable objects."""
    parts = []
    if last.get("deleted"):
        shown = ", ".join(last.get("deleted_keys", [])[:5]) + (" …" if last["deleted"] > 5 else "")
        parts.append(f"{last['deleted']} deleted from the source (outputs {last.get('deleted_action')}: {shown})")
    if last.get("alerts"):
        parts.append(f"{len(last['alerts'])} failed for the first time ({', '.join(last['alerts'][:5])})")
    if last.get("problems"):
        parts.append(f"{last['problems']} empty or unreadable")
    if last.get("excluded"):
        parts.append(f"{last['excluded']} excluded")
    return "".join(f"; {p}" for p in parts)


def run_now(
    name: str,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list what would be processed; queue nothing")] = False,
    retry_failed: Annotated[
        bool,
        typer.Option(
            "--retry-failed",
            help="also queue the images that failed DREAMBATCH_CATALOG__MAX_FAILURES runs in a row "
            "(skipped otherwise until the image or its parameters change)",
        ),
    ] = False,
    confirm_deleted: Annotated[
        bool,
        typer.Option(
            "--confirm-deleted",
            help="let on_deleted delete or move the outputs of more than half of the edited images at once "
            "(held back otherwise: a source emptied by mistake)",
        ),
    ] = False,
    set_: SetOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Run schedule NAME now: scan its source and queue only new or changed images (`--dry-run`: just show)."""
    from jobs.catalog.run import run_schedule
    from jobs.catalog.schedules import get_schedule
    from jobs.manifest import parse_sets
    from jobs.services import get_services
    from jobs.settings import get_settings
    from jobs.storage import check_location

    settings = get_settings()
    try:
        schedule = get_schedule(settings, name)
        for location in (schedule.source.prefix or schedule.source.manifest, schedule.output):
            if location:
                check_location(location, settings)  # a bucket that is not there: say so in seconds
        report = run_schedule(
            schedule,
            get_services(),
            sets=parse_sets(set_ or []),
            dry_run=dry_run,
            retry_failed=retry_failed,
            confirm_deleted=confirm_deleted,
        )
    except DreambatchError as exc:
        raise fail(str(exc)) from None
    if json_:
        print(json.dumps(report.as_dict()))
        return
    verb = "would process" if dry_run else "queued"
    for key in report.new:
        why = "" if report.reasons.get(key) == "new" else f"  ({report.reasons.get(key)})"
        out.print(f"new      {key}{why}", highlight=False, markup=False, soft_wrap=True)
    for key in report.changed:
        out.print(f"changed  {key}  ({report.reasons.get(key)})", highlight=False, markup=False, soft_wrap=True)
    for s in report.skipped[:200]:
        err.print(f"skipped  {s.key}: {s.reason}", highlight=False, markup=False, soft_wrap=True)
    if len(report.skipped) > 200:
        err.print(f"skipped  … and {len(report.skipped) - 200} more", highlight=False)
    for gone in report.deleted[:200]:
        outputs = ", ".join(gone["outputs"]) or "none"
        err.print(
            f"deleted  {gone['key']}: {gone['why']}; its outputs {gone['action']}: {outputs}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    for alert in report.alerts:
        err.print(f"failed   {alert['key']}: {alert['error']}", highlight=False, markup=False, soft_wrap=True)
    for note in report.notes:
        err.print(f"note     {note}", highlight=False, markup=False, soft_wrap=True)
    count = len(report.new) + len(report.changed) if dry_run else report.queued
    err.print(
        f"{name}: {report.images} image(s), {verb} {count}, {report.unchanged} unchanged, "
        f"{report.in_flight} in flight, {len(report.skipped)} skipped, {len(report.deleted)} deleted"
        f"{f'; job {report.job_id}' if report.job_id else ''}",
        highlight=False,
        soft_wrap=True,
    )
    if report.job_id:
        out.print(report.job_id, highlight=False)


def beat(loglevel: Annotated[str, typer.Option()] = "INFO") -> None:
    """Run Celery beat over the schedules file. Any number may run: one holds a Redis lock and fires,
    the others stand by; a slot missed while no beat ran fires once when one comes back."""
    from celery.beat import Service

    from jobs.catalog.beat import CatalogScheduler
    from jobs.catalog.schedules import load_schedules
    from jobs.services import get_services
    from jobs.settings import get_settings
    from jobs.store import say_if_unreachable

    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = get_settings()
    say_if_unreachable(settings.redis_url, logging.getLogger("dreambatch.beat"), "Beat", " (it fires nothing)")
    try:
        load_schedules(settings)
    except DreambatchError as exc:
        raise fail(str(exc)) from None
    services = get_services()
    service = Service(
        services.celery,
        max_interval=settings.catalog.beat_interval,
        scheduler_cls=partial(CatalogScheduler, services=services),
    )

    def stop(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    logging.getLogger("dreambatch.beat").info("beat ready.")
    service.start()


def presets(json_: JsonOpt = False) -> None:
    """List the edit presets (ops/presets.toml plus DREAMBATCH_CATALOG__PRESETS_FILE)."""
    from jobs.presets import load_presets
    from jobs.settings import get_settings

    try:
        found = load_presets(get_settings())
    except DreambatchError as exc:
        raise fail(str(exc)) from None
    if json_:
        print(json.dumps({n: p.model_dump() for n, p in found.items()}))
        return
    for p in found.values():
        extra = f"  (--set {', '.join(f'{k}={v!r}' for k, v in p.vars.items())})" if p.vars else ""
        out.print(f"{p.name}: {p.description}{extra}", highlight=False, markup=False, soft_wrap=True)
