"""The schedules file (`ops/schedules.toml`, or DREAMBATCH_CATALOG__SCHEDULES_FILE): recurring catalog jobs.
TOML, or YAML when the file is named `.yaml`/`.yml` (the same structure: a `schedules` mapping of names).

    [schedules.nightly-white]
    cron = "0 2 * * *"                 # when (croniter syntax); leave out for a run-by-hand schedule
    timezone = "Europe/Berlin"         # the cron's clock (IANA name); default UTC
    model = "e1-1"
    preset = "white-studio"            # ops/presets.toml; or give instruction = "…" (a template)
    params = { steps = 28, seed = 7 }  # E1 job defaults; win over the preset's
    output = "s3://catalog/edited"
    webhook = "https://example.com/hooks/catalog"
    webhook_events = ["job"]           # which events it gets: start, progress, item, job (default item, job)
    priority = "low"                   # each run's job, as `dreambatch submit`: --priority, --max-concurrency,
    max_concurrency = 4                # --expires-after (90s, 15m, 2h, 1d)
    expires_after = "6h"
    layout = "mirror"                  # products/shoes/123.jpg → edited/shoes/123.png; "job": {job_id}/{id}.png
    keep_format = true                 # … → edited/shoes/123.jpg, written as JPEG like its source
    [schedules.nightly-white.source]
    prefix = "s3://catalog/products/"  # every image under it is a row; or manifest = "s3://…/x.csv" / a path
    path = "products/{category}/{sku}.jpg"
    exclude = ["_thumbs/", "*.tmp"]    # folders (at any depth) and globs under the prefix that are not products

An image deleted from the source is reported (the run record, the job webhook's `catalog.deleted`,
`schedules list`); `on_deleted = "delete"` deletes its edited outputs, `"move"` moves them under
`move_deleted_to = "s3://catalog/attic"`; the default, `"keep"`, leaves them.

A prefix scan's `output` may not lie inside its `source.prefix` (each run would rescan its own outputs).
See docs/catalog.md for the whole workflow.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from croniter import croniter
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from jobs import templates
from jobs.errors import ConfigError, InputError
from jobs.models import DEFAULT_WEBHOOK_EVENTS, MODELS, JobSpec, Priority, WebhookEvent, parse_duration, row_class
from jobs.presets import read_config_text, read_toml
from jobs.settings import Settings
from jobs.storage import split_s3

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"


class Source(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prefix: str | None = Field(None, description="s3://bucket/prefix/ to scan: every image under it is a row")
    path: str | None = Field(
        None, description="key template naming parts of each key, e.g. products/{category}/{sku}.jpg"
    )
    manifest: str | None = Field(None, description="a CSV/JSONL manifest: a local path or s3://bucket/key")
    exclude: list[str] = Field(
        default_factory=list,
        description="keys under the prefix to leave out: a folder name ending in / (_thumbs/: at any depth; "
        "shoes/old/: that folder) or a glob over the key below the prefix (*.tmp, **/draft-*)",
    )

    @field_validator("exclude")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        for n, pattern in enumerate(value):
            if not pattern.strip() or pattern.strip() in ("/", "*", "**", "**/*"):
                raise ValueError(f"entry {n + 1}, {pattern!r}: would leave out every object; name a folder or a glob")
            if pattern.startswith("/") or "\\" in pattern:
                raise ValueError(f"entry {n + 1}, {pattern!r}: give it relative to source.prefix, with / separators")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> Source:
        if (self.prefix is None) == (self.manifest is None):
            raise ValueError("give exactly one of source.prefix (an S3 prefix scan) or source.manifest")
        if self.prefix is not None and not self.prefix.startswith("s3://"):
            raise ValueError(f"source.prefix must be s3://bucket/prefix (got {self.prefix!r})")
        if self.path is not None and self.prefix is None:
            raise ValueError("source.path applies to a prefix scan only")
        if self.exclude and self.prefix is None:
            raise ValueError("source.exclude applies to a prefix scan only")
        return self


class Schedule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=NAME_PATTERN)
    cron: str | None = None
    timezone: str = "UTC"
    model: str = "e1-1"
    source: Source
    preset: str | None = None
    vars: dict[str, str] = Field(default_factory=dict)  # fill the preset's / instruction's {placeholders}
    instruction: str | None = Field(None, max_length=4000)  # a template; wins over the preset's
    target_description: str | None = Field(None, max_length=4000)
    negative_prompt: str | None = Field(None, max_length=4000)
    params: dict[str, Any] = Field(default_factory=dict)
    output: str
    webhook: str | None = None
    webhook_events: list[WebhookEvent] = Field(
        default_factory=lambda: list(DEFAULT_WEBHOOK_EVENTS),
        min_length=1,
        description="some of start, progress, item, job",
    )
    priority: Priority = Field("normal", description="the queue order of each run's items: high, normal or low")
    max_concurrency: int | None = Field(None, ge=1, description="at most this many of a run's items at once")
    expires_after: float | None = Field(
        None, description="a run's items not started within this long (90s, 15m, 2h, 1d) end cancelled, reason expired"
    )
    layout: Literal["mirror", "job"] | None = None  # default: mirror for a prefix scan, job for a manifest
    keep_format: bool = False
    revision: str = Field("", max_length=200, description="the model weights' revision; change it to re-run all")
    contact_sheet: bool = Field(True, description="write each run's review sheet (sheet.html, sheet.png) at its end")
    on_deleted: Literal["keep", "delete", "move"] = Field(
        "keep",
        description="the edited outputs of an image deleted from the source (always reported): keep them, "
        "delete them, or move them under move_deleted_to",
    )
    move_deleted_to: str | None = Field(None, description="s3://bucket/prefix the outputs of deleted images move to")

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        if value is not None and not croniter.is_valid(value):
            raise ValueError(f"not a cron expression: {value!r} (e.g. '0 2 * * *' = 02:00 every day)")
        return value

    @field_validator("expires_after", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float | None:
        try:
            return None if value is None else parse_duration(str(value))
        except InputError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("timezone")
    @classmethod
    def _valid_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (an IANA name such as Europe/Berlin)") from None
        return value

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value not in MODELS:
            raise ValueError(f"unknown model {value!r}; choose one of {', '.join(MODELS)}")
        return value

    @field_validator("output")
    @classmethod
    def _s3_output(cls, value: str) -> str:
        if not value.startswith("s3://") or len(value) <= 5:
            raise ValueError(f"output must be s3://bucket/prefix (got {value!r})")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _scan_needs_an_edit_model(self) -> Schedule:
        if self.source.prefix is not None:
            if MODELS[self.model].kind != "edit":
                raise ValueError(f"a prefix scan edits images: model must be an E1 model (got {self.model!r})")
            if not (self.instruction or self.preset):
                raise ValueError("a prefix scan needs an instruction (a template) or a preset")
        if self.source.manifest is not None and self.layout == "mirror":
            raise ValueError("layout = 'mirror' needs a prefix scan (a manifest row can set output_key itself)")
        fields = set(row_class(self.model).model_fields)
        unknown = sorted(set(self.params) - fields - {"id"})
        if unknown:
            raise ValueError(f"params: {', '.join(unknown)}: not a field of {self.model}")
        return self

    @model_validator(mode="after")
    def _where_deleted_outputs_go(self) -> Schedule:
        if self.on_deleted == "move":
            target = self.move_deleted_to or ""
            if not target.startswith("s3://") or len(target.rstrip("/")) <= 5:
                raise ValueError(
                    f"on_deleted = 'move' needs move_deleted_to = 's3://bucket/prefix' (got {self.move_deleted_to!r})"
                )
            if self.source.prefix:
                (src_bucket, src_prefix), (to_bucket, to_prefix) = split_s3(self.source.prefix), split_s3(target)
                if src_bucket == to_bucket and to_prefix.startswith(src_prefix):
                    raise ValueError(
                        f"move_deleted_to: {target} is inside source.prefix {self.source.prefix}: the next run "
                        f"would scan the moved outputs as images; choose a prefix beside it"
                    )
        elif self.move_deleted_to is not None:
            raise ValueError(f"move_deleted_to is set but on_deleted is {self.on_deleted!r}: set on_deleted = 'move'")
        return self

    @model_validator(mode="after")
    def _output_outside_source(self) -> Schedule:
        """Outputs (and the ledger) under the scanned prefix would be scanned as new images by the next run."""
        if self.source.prefix is None:
            return self
        try:
            (src_bucket, src_prefix), (out_bucket, out_prefix) = split_s3(self.source.prefix), split_s3(self.output)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        if src_bucket == out_bucket and out_prefix.startswith(src_prefix):
            raise ValueError(
                f"output: {self.output} is inside source.prefix {self.source.prefix}: every run would "
                f"scan its own outputs as new images; choose an output outside that prefix "
                f"(e.g. s3://{out_bucket}/edited next to it)"
            )
        return self

    @property
    def mirror(self) -> bool:
        return (self.layout or ("mirror" if self.source.prefix else "job")) == "mirror"

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def next_fire(self, after: datetime) -> datetime | None:
        """The first slot strictly after `after`, in UTC (None: no cron)."""
        if self.cron is None:
            return None
        return croniter(self.cron, after.astimezone(self.zone)).get_next(datetime).astimezone(UTC)

    def latest_slot(self, now: datetime) -> datetime | None:
        """The most recent slot at or before `now`, in UTC: the one a late beat fires (once) for."""
        if self.cron is None:
            return None
        local = now.astimezone(self.zone)
        if croniter.match(self.cron, local) and local.second == 0 and local.microsecond == 0:
            return local.astimezone(UTC)
        return croniter(self.cron, local).get_prev(datetime).astimezone(UTC)

    def job_spec(self, defaults: dict[str, Any]) -> JobSpec:
        """How each run's rows become its job (`defaults`: the run's plan: preset, params, rendered texts). A row
        the job rejects is recorded as failed and the rest run."""
        return JobSpec(
            model=self.model,
            defaults=defaults,
            output=self.output,
            webhook=self.webhook,
            webhook_events=self.webhook_events,
            priority=self.priority,
            max_concurrency=self.max_concurrency,
            expires_after=self.expires_after,
            review_sheet=self.contact_sheet,
            schedule=self.name,
            skip_invalid=True,
        )

    def key_template(self) -> templates.KeyTemplate | None:
        if self.source.path is None:
            return None
        return templates.KeyTemplate(self.source.path, f"schedule {self.name}: source.path")


def read_schedules_file(path: Path) -> dict[str, Any]:
    """The file's data: YAML for .yaml/.yml, else TOML; ConfigError names the file (and the line)."""
    if path.suffix.lower() not in (".yaml", ".yml"):
        return read_toml(path, "schedules file")
    text = read_config_text(path, "schedules file")
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        context = f" ({exc.context})" if exc.context else ""
        raise ConfigError(f"schedules file {path}: {where}{exc.problem}{context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"schedules file {path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"schedules file {path}: expected a mapping with a `schedules` key (got a {type(data).__name__})"
        )
    return data


def load_schedules(settings: Settings, path: str | Path | None = None) -> dict[str, Schedule]:
    """Every schedule in the file, validated; ConfigError names the schedule and the field."""
    path = Path(path or settings.catalog.schedules_file).expanduser()
    data = read_schedules_file(path)
    table = data.get("schedules", {})
    extra = sorted(set(data) - {"schedules"})
    if extra or not isinstance(table, dict):
        raise ConfigError(f"schedules file {path}: expected only [schedules.NAME] tables (found {', '.join(extra)})")
    out: dict[str, Schedule] = {}
    for name, entry in table.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"schedules file {path}: schedules.{name} must be a table (a mapping)")
        try:
            schedule = Schedule.model_validate({**entry, "name": name})
            schedule.key_template()
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            field = ".".join(str(p) for p in first["loc"])  # empty: a rule across fields, named in the message
            message = first["msg"].removeprefix("Value error, ")
            raise ConfigError(
                f"schedules file {path}: schedules.{name}: {f'{field}: ' if field else ''}{message}"
            ) from None
        except InputError as exc:
            raise ConfigError(f"schedules file {path}: {exc}") from None
        out[name] = schedule
    return out


def get_schedule(settings: Settings, name: str) -> Schedule:
    schedules = load_schedules(settings)
    if name not in schedules:
        known = ", ".join(sorted(schedules)) or "none"
        raise InputError(f"no schedule {name!r} in {settings.catalog.schedules_file} (known: {known})")
    return schedules[name]
