"""One run: plan, open the ledger, scan the prefix (or read the manifest), diff, record the run, submit the job;
and the beat-fired run with its retries."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from jobs import dialects, keys, netguard, records, templates
from jobs.catalog.ledger import Diff, Ledger, fold, live_revision
from jobs.catalog.lock import RunLock
from jobs.catalog.plan import make_plan, row_fingerprint
from jobs.catalog.report import SHOWN_SKIPS, RunReport, Skipped
from jobs.catalog.scan import Candidate, candidates, excluded_by
from jobs.catalog.schedules import Schedule, get_schedule
from jobs.errors import ConfigError, InputError, TransientError
from jobs.identity import Identities
from jobs.inputs import InputPolicy
from jobs.manifest import CheckedRow, Issue, RawRow, RowChecker, input_policy, read_rows
from jobs.models import MODELS
from jobs.services import Services
from jobs.settings import Settings
from jobs.storage import ObjectStore, S3Store, key_of, split_s3, split_s3_key
from jobs.store import ScheduleState
from jobs.submit import CONNECTION_ERRORS, create_job, new_job_id, now_iso

SHOWN_NOTES = 20  # rows named in the notes of one run (a count stands for the rest)
RECORD_RETRY_S = 5.0  # s a failed run's summary waits for Redis before it is only logged

log = logging.getLogger("dreambatch.catalog")


def run_schedule(
    schedule: Schedule,
    services: Services,
    *,
    sets: dict[str, Any] | None = None,
    dry_run: bool = False,
    slot: str | None = None,
    retry_failed: bool = False,
    confirm_deleted: bool = False,
) -> RunReport:
    """Scan, diff, submit. A dry run reads everything and writes nothing. `retry_failed` queues again the keys
    that failed `catalog.max_failures` runs in a row (otherwise skipped); `confirm_deleted` lets `on_deleted` act
    on more than half of the edited images at once (`hold_mass_deletion`)."""
    settings = services.settings
    report = RunReport(schedule.name, dry_run, slot=slot)
    if schedule.webhook:
        netguard.check_url(schedule.webhook, settings.netpolicy())
    run = _Run(schedule, settings, services, sets or {}, report, lambda: None, retry_failed, confirm_deleted)
    if dry_run:  # reads only: needs no lock
        run.go()
        return report
    with RunLock(services.schedule_state, schedule.name, new_job_id(), settings.catalog.run_lock_ttl) as lock:
        run.check = lock.check
        run.go()
    services.schedule_state.set_last_run(schedule.name, report.summary())
    return report


@dataclass
class _Run:
    schedule: Schedule
    settings: Settings
    services: Services
    sets: dict[str, Any]
    report: RunReport
    check: Callable[[], None]  # raises when the run lost its lock
    retry_failed: bool
    confirm_deleted: bool = False

    def go(self) -> None:
        if self.schedule.source.manifest is not None:
            _run_manifest(self)
        else:
            _run_scan(self)

    def open_ledger(self) -> tuple[ObjectStore, Ledger, Diff]:
        """The schedule's output store, its ledger with every ended run folded in, and how to diff against it.
        A prefix scan's image that failed for its content is not queued again until its object changes (its
        bytes are the same, so is the outcome: a corrupt upload fails, and is reported, once); a manifest's
        rows get `catalog.max_failures` runs."""
        output = self.services.objects(self.schedule.output)
        ledger = Ledger.load(output, self.schedule.name)
        self.report.folded, in_flight = fold(ledger, output, self.services.store, self.schedule.name)
        self.report.alerts = ledger.alerts
        max_failures = self.settings.catalog.max_failures
        if self.schedule.source.prefix is not None:
            max_failures = min(max_failures, 1)
        self.report.model_revision, note = live_revision(self.services.store.workers(), self.schedule.model)
        self.report.notes.extend([note] if note else [])
        return (
            output,
            ledger,
            Diff(
                ledger,
                in_flight,
                self.report.model_revision,
                max_failures,
                self.retry_failed,
                self.schedule.name,
            ),
        )


def _run_scan(run: _Run) -> None:
    schedule, settings, services, report, check = run.schedule, run.settings, run.services, run.report, run.check
    # 1. what every row shares, and the ledger with every ended run folded in
    plan = make_plan(schedule, run.sets, settings)
    output, ledger, diff = run.open_ledger()

    # 2. scan: one candidate per image; keep those whose fingerprint the ledger does not hold
    assert schedule.source.prefix is not None  # (a prefix source: the caller's branch)
    bucket, prefix = split_s3(schedule.source.prefix)
    source = services.objects(f"s3://{bucket}/{prefix}")
    if not isinstance(source, S3Store):
        raise ConfigError(f"source.prefix {schedule.source.prefix!r}: expected s3://bucket/prefix")
    todo: list[Candidate] = []
    seen: set[str] = set()
    for cand in candidates(schedule, plan, source, settings, report.skipped, report.excluded):
        check()  # still holding the run lock (a long scan keeps renewing it)
        seen.add(cand.key)
        report.images += 1
        if diff.count(report, cand.key, cand.fingerprint):
            todo.append(cand)
    gone = sorted(ledger.keys() - seen)
    report.deleted = _deleted(schedule, ledger, gone, source.prefix, report.dry_run)
    seen |= hold_mass_deletion(run, ledger)
    if report.dry_run:
        return
    _act_on_deleted(schedule, services, output, report.deleted)

    # 3. the run's record first (so a crash cannot lose which fingerprints it was for), then the job
    job_id = _start_run(run, ledger, output, seen, {c.item_id: {"key": c.key, "fp": c.fingerprint} for c in todo})
    if job_id is None:
        return
    catalog = report.for_job(f"{schedule.output}/{job_id}/sheet.html" if schedule.contact_sheet else None)
    with tempfile.TemporaryDirectory(prefix="dreambatch-scan-") as tmp:
        manifest = Path(tmp) / f"{schedule.name}.jsonl"
        with manifest.open("w") as fh:
            for cand in todo:
                fh.write(json.dumps(cand.row) + "\n")
        _submit(schedule, services, manifest, plan.defaults, job_id, InputPolicy(Path(tmp)), report, catalog)


def _deleted(schedule: Schedule, ledger: Ledger, gone: list[str], prefix: str, dry_run: bool) -> list[dict[str, Any]]:
    """The images the ledger holds outputs of that this scan did not find: deleted from the source, or left
    out by source.exclude now; and what becomes of their outputs (schedule.on_deleted)."""
    found = []
    gone_from = "removed from the manifest" if schedule.source.manifest else "deleted from the source"
    for key in gone:
        entry = ledger.entries.get(key)
        if entry is None:  # never edited (it only failed): nothing of it to report
            continue
        pattern = excluded_by(key[len(prefix) :], schedule.source.exclude) if key.startswith(prefix) else None
        action = {"keep": "kept", "delete": "deleted", "move": "moved"}[schedule.on_deleted]
        action = f"would be {action}" if dry_run and action != "kept" else action
        found.append(
            {
                "key": key,
                "why": f"excluded by {pattern!r}" if pattern else gone_from,
                "outputs": entry.get("outputs", []),
                "job_id": entry.get("job_id"),
                "action": action,
                "moved_to": None,
            }
        )
    return found


MASS_DELETION = 0.5  # more than this share of the edited images gone at once: on_deleted waits for a confirmation
MASS_DELETION_MIN = 10  # … when more than this many are gone


def hold_mass_deletion(run: _Run, ledger: Ledger) -> set[str]:
    """A source emptied by mistake (a wrong prefix, a sync that failed) must not delete or move every output: when
    more than MASS_DELETION of the edited images are gone at once and `on_deleted` would act, nothing is done
    to them, they stay in the ledger (reported again by every run) and the note says how to confirm. Returns
    the keys held back (the run treats them as still there)."""
    deleted, schedule = run.report.deleted, run.schedule
    if schedule.on_deleted == "keep" or run.confirm_deleted:
        return set()
    if len(deleted) <= MASS_DELETION_MIN or len(deleted) <= MASS_DELETION * len(ledger.entries):
        return set()
    for item in deleted:
        item["action"] = "held back"
    run.report.notes.append(
        f"{len(deleted)} of {len(ledger.entries)} edited images are gone from the source at once: their outputs "
        f"were not {'moved' if schedule.on_deleted == 'move' else 'deleted'} and they stay in the ledger; check "
        f"source.prefix, and if they were deleted on purpose: dreambatch schedules run {schedule.name} "
        f"--confirm-deleted"
    )
    return {item["key"] for item in deleted}


def _act_on_deleted(schedule: Schedule, services: Services, output: ObjectStore, deleted: list[dict[str, Any]]) -> None:
    """Delete the outputs of deleted images, or move them under move_deleted_to (same key below it), as the
    schedule says. Safe to run twice: an output already gone is skipped."""
    if schedule.on_deleted == "keep":
        return
    deleted = [item for item in deleted if item["action"] != "held back"]
    target = schedule.move_deleted_to if schedule.on_deleted == "move" else None
    attic = services.objects(target) if target else None
    for item in deleted:
        moved = []
        for uri in item["outputs"]:
            key = key_of(schedule.output, uri)
            if key is None:
                continue  # not under the schedule's output (written elsewhere): left alone
            if isinstance(attic, S3Store):
                new = attic.copy_from(key, uri)
                if new:
                    moved.append(new)
            output.delete(key)
        if attic is not None:
            item["moved_to"] = moved


def _start_run(
    run: _Run, ledger: Ledger, output: ObjectStore, seen: set[str], items: dict[str, dict[str, str]]
) -> str | None:
    """Forget the keys no longer in the source (re-added later = new). Nothing to run: save the ledger, no job
    (None). Else write the run record ({item id: {key, fp}}), list the run as pending in the ledger and return
    its job id."""
    for gone in ledger.keys() - seen:
        ledger.forget(gone)
    run.check()
    job_id, report = new_job_id(), run.report
    if not items:
        ledger.save(output, run.schedule.name)
        if report.deleted or report.alerts:  # nothing to run, but something to say: a record of the run
            output.put(
                keys.S3_CATALOG_RUN.format(prefix="", name=run.schedule.name, job_id=job_id),
                json.dumps(_run_record(run, None, {})).encode(),
                records.JSON,
            )
        return None
    output.put(
        keys.S3_CATALOG_RUN.format(prefix="", name=run.schedule.name, job_id=job_id),
        json.dumps(_run_record(run, job_id, items)).encode(),
        records.JSON,
    )
    ledger.pending.append(job_id)
    ledger.save(output, run.schedule.name)
    return job_id


def _run_record(run: _Run, job_id: str | None, items: dict[str, dict[str, str]]) -> dict[str, Any]:
    """`_catalog/{name}/runs/{id}.json`: what one run queued (item → key, fingerprint), skipped, found deleted."""
    report = run.report
    problems = report.problems()
    return {
        "job_id": job_id,
        "schedule": run.schedule.name,
        "slot": report.slot,
        "created_at": report.at,
        "model_revision": report.model_revision,
        "items": items,
        "skipped": [asdict(s) for s in report.skipped[:SHOWN_SKIPS]],
        "skipped_total": len(report.skipped),
        "problems": [asdict(s) for s in problems[:SHOWN_SKIPS]],
        "problems_total": len(problems),
        "deleted": report.deleted[:SHOWN_SKIPS],
        "deleted_total": len(report.deleted),
        "excluded": report.excluded,
        "alerts": report.alerts,
    }


def _run_manifest(run: _Run) -> None:
    """A manifest source, incremental like a scan: each row (by its id: the `id` column, else its line) is
    queued only when its fingerprint is not the one the ledger holds. The rows queued are written to a JSONL
    file at their own line numbers, so ids and lines in the results are the manifest's."""
    schedule, settings, services, report, check = run.schedule, run.settings, run.services, run.report, run.check
    # 1. what every row shares, and the ledger with every ended run folded in
    plan = make_plan(schedule, run.sets, settings)
    defaults = dict(plan.defaults)
    for name, text in plan.texts.items():
        defaults[name] = templates.render(text, plan.values, f"schedule {schedule.name}: {name}")
    output, ledger, diff = run.open_ledger()
    with tempfile.TemporaryDirectory(prefix="dreambatch-manifest-") as tmp:
        path, policy = _manifest_file(run, Path(tmp))
        checker = RowChecker(schedule.model, defaults, policy)
        if issues := checker.check_defaults():
            raise InputError(f"schedule {schedule.name}: {'; '.join(str(i) for i in issues)}")
        identities = Identities(services.objects, policy, settings.netpolicy(), settings.inputs.download_timeout)

        # 2. every row: its fingerprint against the ledger; the ones to run go to the job's manifest
        todo: dict[str, dict[str, str]] = {}
        subset = Path(tmp) / f"{schedule.name}-rows.jsonl"
        seen: set[str] = set()
        every_time: list[str] = []  # rows whose image has no identity (a URL without ETag/Last-Modified)
        with subset.open("w") as fh:
            written = 0
            for raw in read_rows(path):
                if isinstance(raw, Issue):
                    if raw.line <= 0:  # the file itself (its header)
                        raise InputError(f"schedule {schedule.name}: source.manifest {schedule.source.manifest}: {raw}")
                    report.skipped.append(Skipped(f"line {raw.line}", str(raw)))
                    continue
                check()
                row = checker.check(raw)
                if checker.named_id(raw) in seen:  # one ledger key, one row: the later one is not run
                    report.skipped.append(Skipped(f"line {raw.line}", "; ".join(map(str, row.issues))))
                    continue
                report.images += 1
                ref = _image_ref(row, raw, schedule.model)
                image = identities.of(ref) if ref else None
                always = None if image is None or image.known else f"{image.why}: it runs every time"
                if always:
                    every_time.append(f"row {row.item_id}: {always}")
                fp = row_fingerprint(row, raw, image, defaults, schedule)
                seen.add(row.item_id)
                if diff.count(report, row.item_id, fp, always):
                    if not row.ok:
                        report.reasons[row.item_id] += f"; it will be rejected: {'; '.join(map(str, row.issues))}"
                    todo[row.item_id] = {"key": row.item_id, "fp": fp}
                    fh.write("\n" * (raw.line - written - 1) + json.dumps(raw.values) + "\n")
                    written = raw.line
        report.notes.extend(every_time[:SHOWN_NOTES])
        if len(every_time) > SHOWN_NOTES:
            report.notes.append(f"… and {len(every_time) - SHOWN_NOTES} more rows whose image runs every time")
        report.deleted = _deleted(schedule, ledger, sorted(ledger.keys() - seen), "", report.dry_run)
        seen |= hold_mass_deletion(run, ledger)
        if report.dry_run:
            return
        _act_on_deleted(schedule, services, output, report.deleted)

        # 3. the run's record, then the job (of the rows to run only)
        job_id = _start_run(run, ledger, output, seen, todo)
        if job_id is not None:
            sheet = f"{schedule.output}/{job_id}/sheet.html" if schedule.contact_sheet else None
            _submit(schedule, services, subset, defaults, job_id, policy, report, report.for_job(sheet))


def _manifest_file(run: _Run, tmp: Path) -> tuple[Path, InputPolicy]:
    """The schedule's manifest as a local file (downloaded when in S3), and the policy for its local paths."""
    ref, settings = run.schedule.source.manifest, run.settings
    assert ref is not None  # (a manifest source: the caller's branch)
    if not ref.startswith("s3://"):
        path = Path(ref).expanduser()
        return path, input_policy(path, settings)
    bucket, key = split_s3_key(ref)
    data = run.services.objects(f"s3://{bucket}").get(key, max_bytes=settings.catalog.max_manifest_bytes)
    if data is None:
        raise InputError(f"schedule {run.schedule.name}: source.manifest {ref}: no such object")
    path = tmp / PurePosixPath(key).name
    path.write_bytes(data)
    return path, InputPolicy(tmp, (), settings.inputs.max_bytes)


def _image_ref(row: CheckedRow, raw: RawRow, model: str) -> str | None:
    """The row's input image reference: checked (a local path made absolute), or as written when invalid."""
    if row.ok:
        return (row.params or {}).get("image")
    try:
        values = dialects.normalize(raw.values, MODELS[model].kind)
    except dialects.DialectConflict:
        values = raw.values
    image = values.get("image")
    return image if isinstance(image, str) and image else None


def _submit(
    schedule: Schedule,
    services: Services,
    manifest: Path,
    defaults: dict[str, Any],
    job_id: str,
    policy: InputPolicy,
    report: RunReport,
    catalog: dict[str, Any] | None = None,
) -> None:
    spec = schedule.job_spec(defaults).model_copy(update={"catalog": catalog})
    sub = create_job(spec, manifest, services, policy=policy, job_id=job_id)
    report.job_id, report.queued, report.rejected = job_id, sub.queued, sub.rejected


@dataclass(frozen=True)
class Fired:
    """What became of one attempt at a beat-fired run."""

    summary: dict[str, Any]
    retry_in: float | None = None  # set: try again after so many seconds


def retry_delay(
    schedule: Schedule | None, slot: str | None, attempt: int, settings: Settings, now: datetime | None = None
) -> float | None:
    """Seconds before retry `attempt` (1 = the first) of a fired run, or None: give up. The wait doubles from
    `run_retry_base` up to `run_retry_max`; at most `run_retries` retries, and none that would start after the
    schedule's next slot less one base wait (that slot's run does the work)."""
    cfg = settings.catalog
    if attempt > cfg.run_retries:
        return None
    delay = min(cfg.run_retry_max, cfg.run_retry_base * 2 ** (attempt - 1))
    if schedule is not None and slot is not None:
        following = schedule.next_fire(datetime.fromisoformat(slot))
        now = now or datetime.now(UTC)
        if following is not None and (following - now).total_seconds() - cfg.run_retry_base < delay:
            return None
    return delay


def run_fired(name: str, services: Services, slot: str | None = None, attempt: int = 1) -> Fired:
    """The beat-fired run of schedule `name` (the io worker's task), logged. A transient failure (S3, Redis or
    the broker unreachable, another run in progress) asks for a retry; any other failure is logged and ends it.
    The last run's summary in Redis says what happened either way (when Redis can be reached)."""
    schedule, settings = None, services.settings
    try:
        schedule = get_schedule(settings, name)
        report = run_schedule(schedule, services, slot=slot)
    except (TransientError, *CONNECTION_ERRORS) as exc:
        delay = retry_delay(schedule, slot, attempt, settings)
        what = f"retrying in {delay:.0f}s" if delay is not None else f"giving up after {attempt} attempt(s)"
        (log.warning if delay is not None else log.error)(
            "schedule %s (slot %s): attempt %d failed: %s; %s", name, slot, attempt, exc, what
        )
        return Fired(_failed(services, name, slot, attempt, exc, delay), delay)
    except Exception as exc:
        log.exception(
            "schedule %s (slot %s): run failed; not retried (fix the cause, then run it by hand: "
            "dreambatch schedules run %s)",
            name,
            slot,
            name,
        )
        return Fired(_failed(services, name, slot, attempt, exc, None))
    log.info(
        "schedule %s (slot %s): %d image(s), %d queued, %d unchanged, %d in flight, %d skipped; job %s",
        name,
        slot,
        report.images,
        report.queued,
        report.unchanged,
        report.in_flight,
        len(report.skipped),
        report.job_id or "-",
    )
    return Fired(report.summary())


def _failed(
    services: Services, name: str, slot: str | None, attempt: int, exc: Exception, retry_in: float | None
) -> dict[str, Any]:
    summary = {
        "at": now_iso(),
        "slot": slot,
        "job_id": None,
        "error": f"{type(exc).__name__}: {exc}",
        "attempt": attempt,
        "retry_in": retry_in,
    }
    try:  # on a client that gives up soon: Redis may be what failed
        ScheduleState(services.redis(retry_s=RECORD_RETRY_S)).set_last_run(name, summary)
    except Exception as err:  # Redis may be what failed
        log.warning("schedule %s: last run not recorded: %s", name, err)
    return summary
