"""A scheduled catalog run: scan the source, keep only what is new or changed, submit one job.

    S3 prefix ─ list ─► images (others skipped, with the reason) ─► rows (templated instruction,
    mirrored output key) ─► fingerprint ─► diff against the ledger ─► job (only new/changed rows)
    manifest ─ read ─► checked rows ─► fingerprint (fields + the image's identity) ─► diff by row id ─► job

The ledger is durable and lives next to the outputs: `{output}/_catalog/{name}/ledger.json` says, for
each source key, the fingerprint it was last edited with and the weights revision it ran with. A
fingerprint covers the image's content (ETag + size) and everything that decides the edit: instruction,
target description, parameters, output key and format, model and the schedule's `revision` label. When the
live workers of the model all publish one weights revision (their heartbeat) and an image was last edited
with another, it is changed too ("model revision changed"). Each run also writes
`_catalog/{name}/runs/{job_id}.json` (its items and their fingerprints) and is listed as pending in the
ledger; the next run folds a pending run in once its job has ended, recording the items that completed
and counting, per key, the runs in a row that failed with the same fingerprint: after
`catalog.max_failures` of them the key is skipped (with the reason) until its image or parameters change or
a run asks for `retry_failed`. A run still in flight keeps its items from being queued twice.

Two runs of one schedule never overlap: a run holds `keys.SCHEDULE_RUNNING`, a lock with a short TTL that a
thread renews while the run goes, so a crashed holder blocks the schedule for one TTL, not for hours. A
beat-fired run that fails for a transient reason (S3 or Redis unreachable, another run in progress) is
retried with backoff (`run_fired`), until shortly before the schedule's next slot.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from jobs import broker, dialects, keys, netguard, records, templates
from jobs.errors import ConfigError, ErrorKind, InputError, TransientError, recorded_kind
from jobs.identity import Identities, Identity
from jobs.inputs import InputPolicy
from jobs.lifecycle import ItemStatus
from jobs.manifest import CheckedRow, Issue, RawRow, RowChecker, input_policy, read_rows
from jobs.models import EXTENSIONS, MODELS, OUTPUT_KEY_PATTERN, ItemRecord, row_class
from jobs.presets import get_preset
from jobs.schedules import Schedule
from jobs.settings import Settings
from jobs.storage import ObjectStore, S3Store, open_store, s3_client, split_s3, split_s3_key
from jobs.store import RedisStore, ScheduleState, Store
from jobs.submit import create_job, new_job_id, now_iso

FORMATS = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp"}
CONTENT_TYPES = {"image/jpeg": "jpeg", "image/jpg": "jpeg", "image/png": "png", "image/webp": "webp"}
OTHER_IMAGES = {".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif", ".svg", ".psd", ".ico", ".jxl",
                ".raw", ".cr2", ".nef", ".dng"}
BUILTIN_NAMES = ("key", "path", "dir", "name", "stem", "ext")
RESERVED_METADATA = ("source_key", "source_etag")
SHOWN_SKIPS = 1000  # skipped objects kept in a run record (the counts cover all of them)
SHOWN_NOTES = 20  # rows named in the notes of one run (a count stands for the rest)

log = logging.getLogger("dreambatch.catalog")


class RunInProgress(TransientError):
    """Another run of this schedule holds its run lock; try again once it has ended."""


@dataclass(frozen=True)
class Skipped:
    key: str
    reason: str


@dataclass
class Candidate:
    key: str
    item_id: str
    fingerprint: str
    row: dict[str, Any]


@dataclass
class RunReport:
    schedule: str
    dry_run: bool
    job_id: str | None = None
    images: int = 0
    queued: int = 0
    rejected: int = 0
    unchanged: int = 0
    in_flight: int = 0
    given_up: int = 0  # keys skipped because they failed catalog.max_failures runs in a row (in `skipped` too)
    new: list[str] = field(default_factory=list)  # keys processed (or, dry run, that would be)
    changed: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)  # key → why it is queued (new, changed, …)
    model_revision: str | None = None  # the weights revision the model's live workers run (None: not known)
    notes: list[str] = field(default_factory=list)  # what the operator should know about this run
    folded: list[str] = field(default_factory=list)  # earlier runs whose completed items were recorded now
    at: str = field(default_factory=now_iso)
    slot: str | None = None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["skipped"] = [asdict(s) for s in self.skipped[:SHOWN_SKIPS]]
        data["skipped_total"] = len(self.skipped)
        return data

    def summary(self) -> dict[str, Any]:
        """What `schedules list` shows about the last run."""
        return {"at": self.at, "slot": self.slot, "job_id": self.job_id, "images": self.images,
                "queued": self.queued, "unchanged": self.unchanged, "in_flight": self.in_flight,
                "skipped": len(self.skipped), "given_up": self.given_up}


# ---- the plan: texts, defaults, names -----------------------------------------------------------------


@dataclass
class Plan:
    """What every row of a schedule's run shares: job defaults, text templates and their constant values."""

    defaults: dict[str, Any]
    texts: dict[str, str]
    values: dict[str, str]
    metadata_names: list[str]  # the {meta.KEY} names the texts use (one HEAD per object when any)

    @property
    def uses_metadata(self) -> bool:
        return bool(self.metadata_names)


def make_plan(schedule: Schedule, sets: dict[str, Any], settings: Settings | None = None) -> Plan:
    """`--set` pairs naming a row field override params; any other name fills a placeholder."""
    fields = set(row_class(schedule.model).model_fields)
    preset = get_preset(schedule.preset, settings) if schedule.preset else None
    values = {**(preset.vars if preset else {}), **schedule.vars,
              **{k: str(v) for k, v in sets.items() if k not in fields}}
    defaults = {**(preset.params if preset else {}), **schedule.params,
                **{k: v for k, v in sets.items() if k in fields}}
    texts = dict(preset.texts()) if preset else {}
    for name in ("instruction", "target_description", "negative_prompt"):
        if getattr(schedule, name):
            texts[name] = getattr(schedule, name)
        defaults.pop(name, None)
    path_names = schedule.key_template().names if schedule.key_template() else []
    known = set(values) | set(BUILTIN_NAMES) | set(path_names)
    metadata_names: list[str] = []
    for text_field, text in texts.items():
        for name in templates.names(text, f"schedule {schedule.name}: {text_field}"):
            if name.startswith("meta."):
                metadata_names.append(name.lower())
            elif name not in known:
                raise ConfigError(f"schedule {schedule.name}: {text_field}: unknown placeholder {{{name}}} "
                                  f"(known: {', '.join(sorted(known))}, meta.<object metadata key>)")
    clash = sorted(set(path_names) & (fields | set(RESERVED_METADATA) | {"image_url", "edit_instruction",
                                                                         "target_image_description", "n"}))
    if clash:
        raise ConfigError(f"schedule {schedule.name}: source.path: {{{clash[0]}}} is a row field's name; rename it")
    return Plan(defaults, texts, values, sorted(set(metadata_names)))


def fingerprint(etag: str, size: int, row: dict[str, Any], defaults: dict[str, Any], schedule: Schedule) -> str:
    """Content + every input of the edit: a change to any of them changes this."""
    basis = {"etag": etag, "size": size, "model": schedule.model, "weights": MODELS[schedule.model].hub_id,
             "revision": schedule.revision, "defaults": defaults,
             "row": {k: v for k, v in row.items() if k not in ("id", *RESERVED_METADATA)}}
    return hashlib.sha256(json.dumps(basis, sort_keys=True, default=str).encode()).hexdigest()


def item_id_for(rel: str) -> str:
    """A valid, stable item id for a key: readable part + 8 hex of its hash (unique per key)."""
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", rel)[-100:].lstrip("._-") or "image"
    return f"{readable}-{hashlib.sha1(rel.encode()).hexdigest()[:8]}"


# ---- scanning ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceObject:
    key: str
    etag: str
    size: int
    fmt: str  # jpeg, png, webp
    metadata: dict[str, str]


def scan(source: S3Store, settings: Settings, want_metadata: bool) -> Iterator[SourceObject | Skipped]:
    """Every object under the source prefix: an image to edit, or the reason it is skipped."""
    from botocore.exceptions import BotoCoreError, ClientError

    limit, max_bytes = settings.catalog.max_objects, settings.inputs.max_bytes
    paginator = source.client.get_paginator("list_objects_v2")
    count = 0
    try:
        for page in paginator.paginate(Bucket=source.bucket, Prefix=source.prefix):
            for obj in page.get("Contents", []):
                count += 1
                if count > limit:
                    raise ConfigError(f"{source.location}: more than {limit} objects "
                                      f"(DREAMBATCH_CATALOG__MAX_OBJECTS); narrow the prefix")
                yield _classify(source, obj, max_bytes, want_metadata)
    except (ClientError, BotoCoreError) as exc:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        if code in ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise ConfigError(f"S3 {source.location}: {code}: {exc}") from None
        raise TransientError(f"S3 {source.location}: listing failed: {exc}") from None


def _classify(source: S3Store, obj: dict, max_bytes: int, want_metadata: bool) -> SourceObject | Skipped:
    key, size = obj["Key"], int(obj.get("Size", 0))
    etag = str(obj.get("ETag", "")).strip('"')
    if key.endswith("/"):
        return Skipped(key, "folder marker")
    if size == 0:
        return Skipped(key, "empty object")
    suffix = PurePosixPath(key).suffix.lower()
    fmt = FORMATS.get(suffix)
    if suffix in OTHER_IMAGES:
        return Skipped(key, f"unsupported image format {suffix} (JPEG, PNG and WebP are read)")
    if fmt is None and suffix and not suffix[1:].isdigit():
        return Skipped(key, f"not an image ({suffix} file)")
    head = None
    if fmt is None or want_metadata:
        head = source.head(key[len(source.prefix):])
        if head is None:
            return Skipped(key, "deleted while scanning")
    if fmt is None:
        content_type = (head.get("ContentType") or "").split(";")[0].strip().lower()
        fmt = CONTENT_TYPES.get(content_type)
        if fmt is None:
            return Skipped(key, f"not an image (no extension, content-type {content_type or 'unset'})")
    if size > max_bytes:
        return Skipped(key, f"{size} bytes, over the {max_bytes}-byte input limit")
    return SourceObject(key, etag, size, fmt, {k.lower(): v for k, v in (head or {}).get("Metadata", {}).items()})


def candidates(schedule: Schedule, plan: Plan, source: S3Store, settings: Settings,
               skipped: list[Skipped]) -> Iterator[Candidate]:
    """One row per image under the prefix, in listing order; what is not an image lands in `skipped`."""
    template = schedule.key_template()
    taken: dict[str, str] = {}  # output key → the source key that writes it
    out_format = str(plan.defaults.get("output_format", "png")).lower().replace("jpg", "jpeg")
    for entry in scan(source, settings, plan.uses_metadata):
        if isinstance(entry, Skipped):
            skipped.append(entry)
            continue
        key, rel = entry.key, entry.key[len(source.prefix):]
        parts = template.match(key) if template else {}
        if parts is None:
            skipped.append(Skipped(key, f"does not match source.path {schedule.source.path!r}"))
            continue
        path = PurePosixPath(rel)
        values = {**plan.values, "key": key, "path": rel, "dir": str(path.parent) if str(path.parent) != "." else "",
                  "name": path.name, "stem": path.stem, "ext": path.suffix.lstrip("."), **parts,
                  **{f"meta.{k}": v for k, v in entry.metadata.items()}}
        missing = [n for n in plan.metadata_names if n not in values]
        if missing:
            name = missing[0].removeprefix("meta.")
            skipped.append(Skipped(key, f"no object metadata x-amz-meta-{name} (the instruction uses {{meta.{name}}})"))
            continue
        try:
            texts = {f: templates.render(t, values, f) for f, t in plan.texts.items()}
        except InputError as exc:
            skipped.append(Skipped(key, str(exc)))
            continue
        row: dict[str, Any] = {"id": item_id_for(rel), "image": f"s3://{source.bucket}/{key}", **texts}
        fmt = entry.fmt if schedule.keep_format else out_format
        if schedule.keep_format:
            row["output_format"] = entry.fmt
        if schedule.mirror:
            if not schedule.keep_format:
                out_key = f"{path.with_suffix('')}.{EXTENSIONS[fmt]}"
            elif path.suffix.lower() in FORMATS:
                out_key = rel
            else:  # no image extension (its Content-Type said what it is): the output key gets its format's
                out_key = f"{rel}.{EXTENSIONS[fmt]}"
            if not re.match(OUTPUT_KEY_PATTERN, out_key) or len(out_key.encode()) > 900:
                skipped.append(Skipped(key, f"mirror layout: {out_key!r} cannot be an output key "
                                            f"(control characters, backslash, or over 900 bytes)"))
                continue
            if out_key in taken:
                hint = ("set keep_format = true to keep both" if not schedule.keep_format else
                        "an image without an extension takes its format's; rename one of them")
                skipped.append(Skipped(key, f"its output {out_key} is also {taken[out_key]}'s ({hint})"))
                continue
            taken[out_key] = key
            row["output_key"] = out_key
        row.update({"source_key": key, "source_etag": entry.etag, **parts})
        yield Candidate(key, row["id"], fingerprint(entry.etag, entry.size, row, plan.defaults, schedule), row)


# ---- the ledger -------------------------------------------------------------------------------------


@dataclass
class Ledger:
    # source key (or manifest row id) → {fp, job_id, outputs, at, model_revision} of its last completed edit
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    # key → {fp, count, error, job_id, at}: runs in a row whose item failed (or was rejected) with fingerprint fp
    failures: dict[str, dict[str, Any]] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)  # job ids of runs not folded in yet

    @classmethod
    def load(cls, objects: ObjectStore, name: str) -> Ledger:
        data = objects.get(keys.S3_CATALOG_LEDGER.format(prefix="", name=name))
        if data is None:
            return cls()
        raw = json.loads(data)
        return cls(entries=raw.get("entries", {}), failures=raw.get("failures", {}), pending=raw.get("pending", []))

    def save(self, objects: ObjectStore, name: str) -> None:
        body = json.dumps({"version": 1, "schedule": name, "updated_at": now_iso(), "pending": self.pending,
                           "entries": self.entries, "failures": self.failures}, sort_keys=True).encode()
        objects.put(keys.S3_CATALOG_LEDGER.format(prefix="", name=name), body, records.JSON)

    def record(self, key: str, fp: str, job_id: str, line: dict[str, Any]) -> None:
        """Fold one ended item in: a completed one is the key's edit now; one that failed because of its input
        (a rejected row, an image that does not decode) counts one more failed run in a row for that
        fingerprint. Other failures (S3 or the broker down, a model error, a lost worker) and cancelled items
        change nothing: the image is tried again next run, however often that happens."""
        if line["status"] == ItemStatus.COMPLETED:
            self.entries[key] = {"fp": fp, "job_id": job_id, "at": now_iso(),
                                 "outputs": [i["s3_uri"] for i in line["output"]["images"]],
                                 "model_revision": line.get("model_revision")}
            self.failures.pop(key, None)
        elif line["status"] == ItemStatus.FAILED and input_failure(line):
            before = self.failures.get(key)
            count = before["count"] + 1 if before and before["fp"] == fp else 1
            self.failures[key] = {"fp": fp, "count": count, "error": str(line.get("error") or "")[:500],
                                  "job_id": job_id, "at": now_iso()}

    def forget(self, key: str) -> None:
        self.entries.pop(key, None)
        self.failures.pop(key, None)

    def keys(self) -> set[str]:
        return set(self.entries) | set(self.failures)


def input_failure(line: dict[str, Any]) -> bool:
    """Whether a failed results line failed because of its input: rejected at submit, or an input error on
    the worker (the image would not fetch, decode or fit; its URL was refused)."""
    return recorded_kind(line) == ErrorKind.INPUT


def fold(ledger: Ledger, objects: ObjectStore, store: Store, name: str) -> tuple[list[str], dict[str, str]]:
    """Fold in every pending run whose job has ended (`Ledger.record`: completed items become the keys' edits,
    failed ones count a failed run). Returns the runs folded and the items still in flight (key → fingerprint)."""
    folded, in_flight = [], {}
    for job_id in list(ledger.pending):
        data = objects.get(keys.S3_CATALOG_RUN.format(prefix="", name=name, job_id=job_id))
        run = json.loads(data) if data else {"items": {}}
        lines = records.read_results(objects, job_id)
        if lines is None:
            live = store.get_job(job_id)
            if live is not None and not live.finished_at and not live.submit_aborted:
                in_flight.update({v["key"]: v["fp"] for v in run["items"].values()})
                continue
            # its live state is gone, or its submission failed (nothing of it runs): read what ended
            lines = _item_records(objects, job_id, run["items"])
        for line in lines:
            item = run["items"].get(line["id"])
            if item:
                ledger.record(item["key"], item["fp"], job_id, line)
        ledger.pending.remove(job_id)
        folded.append(job_id)
    return folded, in_flight


def _item_records(objects: ObjectStore, job_id: str, items: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for item_id in items:
        data = objects.get(keys.S3_ITEM_RESULT.format(prefix="", job_id=job_id, item_id=item_id))
        if data is not None:
            found.append(json.loads(data))
    return found


def live_revision(workers: list[dict[str, Any]], model: str) -> tuple[str | None, str | None]:
    """The weights revision the live workers of `model` run, when they all publish the same one; else None
    and a note saying why it is not known (no worker, or workers on different weights mid-upgrade)."""
    published = [w.get("model_revision") for w in workers if w.get("model") == model]
    if not published:
        return None, f"no live {model} worker: the model revision is not compared this run"
    found = sorted({str(r) for r in published if r})
    if len(found) == 1 and all(published):
        return found[0], None
    shown = ", ".join(found + (["unknown"] if not all(published) else []))
    return None, f"live {model} workers run different weights ({shown}): the model revision is not compared"


@dataclass(frozen=True)
class Diff:
    """How one run compares what it found with the ledger."""

    ledger: Ledger
    in_flight: dict[str, str]  # key → fingerprint of items of runs still going
    revision: str | None  # the live workers' weights revision (None: not compared)
    max_failures: int  # 0: never skip a key that keeps failing
    retry_failed: bool  # this run tries keys that failed max_failures runs in a row again
    schedule: str

    def verdict(self, key: str, fp: str, always: str | None = None) -> tuple[str, str | None]:
        """("unchanged" | "in_flight" | "given_up" | "new" | "changed", why) for one image or manifest row;
        `always` (why) when nothing tells whether it changed: a match in the ledger does not keep it back."""
        entry, failed = self.ledger.entries.get(key), self.ledger.failures.get(key)
        same = entry is not None and entry["fp"] == fp
        ran = entry.get("model_revision") if same else None
        moved = bool(self.revision and ran and ran != self.revision)  # edited with other weights than today's
        if same and not moved and always is None:
            return "unchanged", None
        if self.in_flight.get(key) == fp:  # a run still going has it (a re-run for new weights too)
            return "in_flight", None
        if entry is None:
            why = "new"
        elif moved:
            why = f"model revision changed ({ran} → {self.revision})"
        elif same:  # the same, as far as anyone can tell: `always` says why it runs anyway
            why = always
        else:
            why = "changed (content, instruction or parameters)"
        if failed and failed["fp"] == fp:
            if self.max_failures and failed["count"] >= self.max_failures and not self.retry_failed:
                return "given_up", (
                    f"failed {failed['count']} runs in a row with this image and these parameters (last error: "
                    f"{failed['error']}); not queued again until the image or its parameters change, or a run "
                    f"with: dreambatch schedules run {self.schedule} --retry-failed")
            why += f"; failed {failed['count']} run(s) in a row before, tried again"
        return ("new" if entry is None else "changed"), why

    def count(self, report: RunReport, key: str, fp: str, always: str | None = None) -> bool:
        """Count the verdict on `key` in the report; True when it is to be queued."""
        what, why = self.verdict(key, fp, always)
        if what == "unchanged":
            report.unchanged += 1
        elif what == "in_flight":
            report.in_flight += 1
        elif what == "given_up":
            report.given_up += 1
            report.skipped.append(Skipped(key, why))
        else:
            (report.changed if what == "changed" else report.new).append(key)
            report.reasons[key] = why
            return True
        return False


# ---- the run lock -----------------------------------------------------------------------------------


class RunLock:
    """One run of a schedule at a time: `keys.SCHEDULE_RUNNING` with a short TTL, renewed every third of it by
    a thread while the run goes and released at the end, so a holder that crashed blocks the schedule for one
    TTL at most. `check()` raises once the lock could not be kept (renewals failing for a TTL, or another
    run took it): the run stops before it queues anything."""

    def __init__(self, state: ScheduleState, name: str, owner: str, ttl: float):
        self.state, self.name, self.owner, self.ttl = state, name, owner, ttl
        self.key = keys.SCHEDULE_RUNNING.format(name=name)
        self.lost: str | None = None
        self._renewed = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RunLock:
        if not self.state.hold_lock(self.key, self.owner, self.ttl):
            raise RunInProgress(f"schedule {self.name}: another run is in progress")
        self._renewed = time.monotonic()
        self._thread = threading.Thread(target=self._keep, name=f"run-lock-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _keep(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self.state.hold_lock(self.key, self.owner, self.ttl):
                    self.lost = "another run holds it now"
                    return
                self._renewed = time.monotonic()
            except Exception as exc:  # Redis away for a moment: keep trying until the TTL has run out
                log.warning("schedule %s: run lock not renewed: %s", self.name, exc)
                if time.monotonic() - self._renewed > self.ttl:
                    self.lost = f"not renewed for {self.ttl:.0f}s ({exc})"

    def check(self) -> None:
        if self.lost is None and time.monotonic() - self._renewed > self.ttl:
            self.lost = f"not renewed for {self.ttl:.0f}s"
        if self.lost is not None:
            raise TransientError(f"schedule {self.name}: lost its run lock ({self.lost}); stopped before "
                                 f"queueing anything")

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.ttl)  # a renewal stuck on an unreachable Redis ends on its own (daemon)
        try:
            self.state.release_lock(self.key, self.owner)
        except Exception as exc:  # it expires by itself within one TTL
            log.warning("schedule %s: run lock not released (it expires in %.0fs): %s", self.name, self.ttl, exc)


# ---- one run ----------------------------------------------------------------------------------------


@dataclass
class Services:
    """What a run talks to: live state, schedule state, object stores and the queues."""

    store: Store
    state: ScheduleState
    objects: Callable[[str], ObjectStore]  # location → store
    publish: Callable[[str, str, list[str]], None]  # (model, job_id, item ids)
    finalize: Callable[[str], None]  # (job_id)
    notify_rejected: Callable[[str | None, list[ItemRecord]], None]  # (webhook, rejected rows)
    workers: Callable[[], list[dict[str, Any]]] = lambda: []  # live workers' heartbeats (model, model_revision)

    @classmethod
    def connect(cls, settings: Settings, celery=None) -> Services:
        """Redis, S3 and Celery from settings (the CLI and the io worker's task)."""
        from jobs.models import item_event_id

        celery = celery or broker.make_celery(settings)
        client = s3_client(settings)
        stores: dict[str, ObjectStore] = {}

        def objects(location: str) -> ObjectStore:
            if location not in stores:
                stores[location] = open_store(location, settings, client=client)
            return stores[location]

        def notify_rejected(webhook: str | None, items: list[ItemRecord]) -> None:
            for item in items if webhook else []:
                broker.send_webhook(celery, item.job_id, item.item_id,
                                    item_event_id(item.job_id, item.item_id, item.status))

        store = RedisStore.from_url(settings.redis_url)
        return cls(store=store, state=ScheduleState.from_url(settings.redis_url), objects=objects,
                   publish=lambda model, job_id, ids: broker.publish_items(celery, model, job_id, ids),
                   finalize=lambda job_id: broker.send_finalize(celery, job_id), notify_rejected=notify_rejected,
                   workers=store.workers)


def run_schedule(schedule: Schedule, settings: Settings, services: Services, *, sets: dict[str, Any] | None = None,
                 dry_run: bool = False, slot: str | None = None, retry_failed: bool = False) -> RunReport:
    """Scan, diff, submit. A dry run reads everything and writes nothing. `retry_failed` queues again the keys
    that failed `catalog.max_failures` runs in a row (otherwise skipped)."""
    report = RunReport(schedule.name, dry_run, slot=slot)
    if schedule.webhook:
        netguard.check_url(schedule.webhook, settings.netpolicy())
    run = _Run(schedule, settings, services, sets or {}, report, lambda: None, retry_failed)
    if dry_run:  # reads only: needs no lock
        run.go()
        return report
    with RunLock(services.state, schedule.name, new_job_id(), settings.catalog.run_lock_ttl) as lock:
        run.check = lock.check
        run.go()
    services.state.set_last_run(schedule.name, report.summary())
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

    def go(self) -> None:
        if self.schedule.source.manifest is not None:
            _run_manifest(self)
        else:
            _run_scan(self)

    def open_ledger(self) -> tuple[ObjectStore, Ledger, Diff]:
        """The schedule's output store, its ledger with every ended run folded in, and how to diff against it."""
        output = self.services.objects(self.schedule.output)
        ledger = Ledger.load(output, self.schedule.name)
        self.report.folded, in_flight = fold(ledger, output, self.services.store, self.schedule.name)
        self.report.model_revision, note = live_revision(self.services.workers(), self.schedule.model)
        self.report.notes.extend([note] if note else [])
        return output, ledger, Diff(ledger, in_flight, self.report.model_revision,
                                    self.settings.catalog.max_failures, self.retry_failed, self.schedule.name)


def _run_scan(run: _Run) -> None:
    schedule, settings, services, report, check = run.schedule, run.settings, run.services, run.report, run.check
    # 1. what every row shares, and the ledger with every ended run folded in
    plan = make_plan(schedule, run.sets, settings)
    output, ledger, diff = run.open_ledger()

    # 2. scan: one candidate per image; keep those whose fingerprint the ledger does not hold
    bucket, prefix = split_s3(schedule.source.prefix)
    source = services.objects(f"s3://{bucket}/{prefix}")
    if not isinstance(source, S3Store):
        raise ConfigError(f"source.prefix {schedule.source.prefix!r}: expected s3://bucket/prefix")
    todo: list[Candidate] = []
    seen: set[str] = set()
    for cand in candidates(schedule, plan, source, settings, report.skipped):
        check()  # still holding the run lock (a long scan keeps renewing it)
        seen.add(cand.key)
        report.images += 1
        if diff.count(report, cand.key, cand.fingerprint):
            todo.append(cand)
    if report.dry_run:
        return

    # 3. the run's record first (so a crash cannot lose which fingerprints it was for), then the job
    job_id = _start_run(run, ledger, output, seen, {c.item_id: {"key": c.key, "fp": c.fingerprint} for c in todo})
    if job_id is None:
        return
    with tempfile.TemporaryDirectory(prefix="dreambatch-scan-") as tmp:
        manifest = Path(tmp) / f"{schedule.name}.jsonl"
        with manifest.open("w") as fh:
            for cand in todo:
                fh.write(json.dumps(cand.row) + "\n")
        _submit(schedule, settings, services, manifest, plan.defaults, job_id, InputPolicy(Path(tmp)), report)


def _start_run(run: _Run, ledger: Ledger, output: ObjectStore, seen: set[str],
               items: dict[str, dict[str, str]]) -> str | None:
    """Forget the keys no longer in the source (re-added later = new). Nothing to run: save the ledger, no job
    (None). Else write the run record ({item id: {key, fp}}), list the run as pending in the ledger and return
    its job id."""
    for gone in ledger.keys() - seen:
        ledger.forget(gone)
    run.check()
    if not items:
        ledger.save(output, run.schedule.name)
        return None
    job_id, report = new_job_id(), run.report
    record = {"job_id": job_id, "schedule": run.schedule.name, "slot": report.slot, "created_at": report.at,
              "model_revision": report.model_revision, "items": items,
              "skipped": [asdict(s) for s in report.skipped[:SHOWN_SKIPS]], "skipped_total": len(report.skipped)}
    output.put(keys.S3_CATALOG_RUN.format(prefix="", name=run.schedule.name, job_id=job_id),
               json.dumps(record).encode(), records.JSON)
    ledger.pending.append(job_id)
    ledger.save(output, run.schedule.name)
    return job_id


def row_fingerprint(row: CheckedRow, raw: RawRow, image: Identity | None, defaults: dict[str, Any],
                    schedule: Schedule) -> str:
    """A manifest row's fingerprint: its normalized fields (its raw values when invalid), the job defaults,
    model and `revision` label, and its image's identity (jobs.identity; None for a prompt-only row)."""
    basis = {"model": schedule.model, "weights": MODELS[schedule.model].hub_id, "revision": schedule.revision,
             "defaults": defaults, "image": image.value if image else None,
             "row": {"params": row.params, "metadata": row.metadata} if row.ok else {"invalid": raw.values}}
    return hashlib.sha256(json.dumps(basis, sort_keys=True, default=str).encode()).hexdigest()


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
                        raise InputError(f"schedule {schedule.name}: source.manifest {schedule.source.manifest}: "
                                         f"{raw}")
                    report.skipped.append(Skipped(f"line {raw.line}", str(raw)))
                    continue
                check()
                row = checker.check(raw)
                if row.item_id in seen:  # one ledger key, one row: the later one is not run
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
        if report.dry_run:
            return

        # 3. the run's record, then the job (of the rows to run only)
        job_id = _start_run(run, ledger, output, seen, todo)
        if job_id is not None:
            _submit(schedule, settings, services, subset, defaults, job_id, policy, report)


def _manifest_file(run: _Run, tmp: Path) -> tuple[Path, InputPolicy]:
    """The schedule's manifest as a local file (downloaded when in S3), and the policy for its local paths."""
    ref, settings = run.schedule.source.manifest, run.settings
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


def _submit(schedule: Schedule, settings: Settings, services: Services, manifest: Path, defaults: dict[str, Any],
            job_id: str, policy: InputPolicy, report: RunReport) -> None:
    sub = create_job(manifest, model=schedule.model, defaults=defaults, output=schedule.output,
                     webhook=schedule.webhook, store=services.store, objects=services.objects(schedule.output),
                     dispatch=lambda ids: services.publish(schedule.model, job_id, ids), skip_invalid=True,
                     batch=settings.celery.publish_batch, job_id=job_id, policy=policy,
                     on_rejected=lambda items: services.notify_rejected(schedule.webhook, items),
                     review_sheet=schedule.contact_sheet)
    if sub.job_done:
        services.finalize(job_id)
    report.job_id, report.queued, report.rejected = job_id, sub.queued, sub.rejected


@dataclass(frozen=True)
class Fired:
    """What became of one attempt at a beat-fired run."""

    summary: dict[str, Any]
    retry_in: float | None = None  # set: try again after so many seconds


def retry_delay(schedule: Schedule | None, slot: str | None, attempt: int, settings: Settings,
                now: datetime | None = None) -> float | None:
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


def run_fired(name: str, settings: Settings, celery=None, slot: str | None = None, attempt: int = 1,
              services: Services | None = None) -> Fired:
    """The beat-fired run of schedule `name` (the io worker's task), logged. A transient failure (S3, Redis or
    the broker unreachable, another run in progress) asks for a retry; any other failure is logged and ends it.
    The last run's summary in Redis says what happened either way (when Redis can be reached)."""
    from jobs.schedules import get_schedule
    from jobs.submit import CONNECTION_ERRORS

    schedule = None
    try:
        schedule = get_schedule(settings, name)
        report = run_schedule(schedule, settings, services or Services.connect(settings, celery), slot=slot)
    except (TransientError, *CONNECTION_ERRORS) as exc:
        delay = retry_delay(schedule, slot, attempt, settings)
        what = f"retrying in {delay:.0f}s" if delay is not None else f"giving up after {attempt} attempt(s)"
        (log.warning if delay is not None else log.error)(
            "schedule %s (slot %s): attempt %d failed: %s; %s", name, slot, attempt, exc, what)
        return Fired(_failed(settings, name, slot, attempt, exc, delay, services), delay)
    except Exception as exc:
        log.exception("schedule %s (slot %s): run failed; not retried (fix the cause, then run it by hand: "
                      "dreambatch schedules run %s)", name, slot, name)
        return Fired(_failed(settings, name, slot, attempt, exc, None, services))
    log.info("schedule %s (slot %s): %d image(s), %d queued, %d unchanged, %d in flight, %d skipped; job %s",
             name, slot, report.images, report.queued, report.unchanged, report.in_flight, len(report.skipped),
             report.job_id or "-")
    return Fired(report.summary())


def _failed(settings: Settings, name: str, slot: str | None, attempt: int, exc: Exception, retry_in: float | None,
            services: Services | None) -> dict[str, Any]:
    summary = {"at": now_iso(), "slot": slot, "job_id": None, "error": f"{type(exc).__name__}: {exc}",
               "attempt": attempt, "retry_in": retry_in}
    try:
        state = services.state if services else ScheduleState.from_url(settings.redis_url, retry_s=5)
        state.set_last_run(name, summary)
    except Exception as err:  # Redis may be what failed
        log.warning("schedule %s: last run not recorded: %s", name, err)
    return summary
