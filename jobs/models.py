"""Data only: model presets, manifest rows, the job spec, job and item records.

Rows are validated with pydantic. A generation row (HiDream-I1) and an edit row (HiDream-E1) share
`CommonParams`; each model names the row class it accepts in `MODELS`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from jobs.errors import ErrorKind, InputError, recorded_kind
from jobs.formats import CONTENT_TYPES, EXTENSIONS, SUFFIXES  # noqa: F401  (CONTENT_TYPES, EXTENSIONS: re-exported)
from jobs.lifecycle import ItemStatus, JobStatus
from jobs.modelspecs import I1_FULL_HUB_ID, MODELS, ModelSpec  # noqa: F401  (re-exported: the models' table)

OutputFormat = Literal["jpeg", "png", "webp"]
SchedulerName = Literal["flow_unipc", "flash_flow", "flow_euler"]

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
MAX_SEED = 2**32 - 1
OUTPUT_KEY_PATTERN = r"^[^/\x00-\x1f\x7f\\][^\x00-\x1f\x7f\\]{0,899}$"  # no control chars or backslash


class CommonParams(BaseModel):
    """Fields every row has, whatever the model."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    id: str | None = Field(None, pattern=ID_PATTERN)
    negative_prompt: str = Field("", max_length=4000)
    seed: int = Field(-1, ge=-1, le=MAX_SEED, description="-1 = random; the seed used is recorded")
    steps: int = Field(16, ge=1, le=150)
    guidance_scale: float = Field(0.0, ge=0.0, le=30.0)
    num_images: int = Field(1, ge=1, le=8)
    output_format: OutputFormat = "png"
    output_quality: int = Field(95, ge=1, le=100)
    output_key: str | None = Field(
        None,
        pattern=OUTPUT_KEY_PATTERN,
        description="object key under the job's output, e.g. shoes/123.jpg (mirrors a "
        "catalog layout); its extension must match output_format",
    )
    safety_check: bool | None = Field(
        None,
        description="run the worker's safety checker on the outputs; None: "
        "whenever the worker has one (worker/safety.py)",
    )
    lora: str | None = Field(
        None,
        min_length=1,
        max_length=2048,
        description="a LoRA adapter for the model's transformer: a local .safetensors file or s3://bucket/key "
        "(diffusers' LoRA format); see docs/lora.md",
    )
    lora_scale: float = Field(1.0, ge=-8.0, le=8.0, description="the LoRA's strength (its weight in set_adapters)")

    @field_validator("output_format", mode="before")
    @classmethod
    def _jpg_is_jpeg(cls, value: Any) -> Any:
        return "jpeg" if isinstance(value, str) and value.lower() in ("jpg", "jpeg") else value

    @model_validator(mode="after")
    def _output_key_is_an_image_key(self) -> CommonParams:
        key = self.output_key
        if key is not None:
            if len(key.encode()) > 900:
                raise ValueError(f"output_key is {len(key.encode())} bytes of UTF-8; at most 900")
            if any(part in ("", ".", "..") for part in key.split("/")):
                raise ValueError(f"output_key {key!r}: no empty, '.' or '..' path segments")
            if not key.lower().endswith(SUFFIXES[self.output_format]):
                raise ValueError(
                    f"output_key {key!r} must end with {' or '.join(SUFFIXES[self.output_format])} "
                    f"(output_format is {self.output_format})"
                )
        return self


class GenerateRow(CommonParams):
    """A HiDream-I1 text-to-image row."""

    prompt: str = Field(..., min_length=1, max_length=4000)
    width: int = Field(1024, ge=64, le=4096)
    height: int = Field(1024, ge=64, le=4096)
    shift: float = Field(3.0, gt=0.0, le=100.0)
    scheduler: SchedulerName = "flash_flow"
    exact_size: bool = Field(
        False,
        description="return exactly width x height: render at the nearest size HiDream "
        "supports (~1 MP, same aspect), then resize to the size asked for",
    )


SIZE_PATTERN = r"^(same|\d{2,5}x\d{2,5})$"
RATIO_PATTERN = r"^[1-9]\d{0,2}:[1-9]\d{0,2}$"
MAX_ASPECT = 16  # the longer side of an edit's output is at most 16× the shorter
MAX_OUTPUT_SIDE = 8192
RESOLUTION_PATTERN = r"^(0\.5K|1K|2K|4K|0\.25|0\.5|1|2|4)$"


class EditRow(CommonParams):
    """A HiDream-E1 edit row: an input image and what to change."""

    image: str = Field(
        ...,
        min_length=1,
        max_length=8 * 1024 * 1024,
        description="local path, s3://bucket/key, https:// URL or data: URI",
    )
    instruction: str = Field("", max_length=4000)
    target_description: str = Field("", max_length=4000)
    prompt: str = Field("", max_length=8000, description="a full prompt, used instead of instruction + description")
    image_guidance_scale: float = Field(4.0, ge=0.0, le=30.0)
    refine_strength: float = Field(0.3, ge=0.0, le=1.0)
    clip_cfg_norm: bool | None = Field(None, description="norm clipping of the guided prediction (default per model)")
    size: str = Field("same", pattern=SIZE_PATTERN, description="WxH, or 'same' (the input's); wins over the others")
    aspect_ratio: str | None = Field(None, pattern=RATIO_PATTERN)
    resolution: str | None = Field(None, pattern=RESOLUTION_PATTERN, description="0.5K/1K/2K/4K or megapixels")
    geometry: Literal["pad", "crop", "stretch"] = Field(
        "pad", description="how the input fits the model canvas and the output shape: pad keeps proportions"
    )
    response_format: Literal["url", "b64_json"] = "url"

    @field_validator("size")
    @classmethod
    def _size_in_bounds(cls, value: str) -> str:
        if value != "same":
            w, h = (int(v) for v in value.split("x"))
            if not (16 <= w <= MAX_OUTPUT_SIDE and 16 <= h <= MAX_OUTPUT_SIDE):
                raise ValueError(f"each side must be 16..{MAX_OUTPUT_SIDE} px")
            if max(w, h) > MAX_ASPECT * min(w, h):
                raise ValueError(f"aspect ratio must be within {MAX_ASPECT}:1")
        return value

    @field_validator("aspect_ratio")
    @classmethod
    def _ratio_in_bounds(cls, value: str | None) -> str | None:
        if value is not None:
            a, b = (int(v) for v in value.split(":"))
            if max(a, b) > MAX_ASPECT * min(a, b):
                raise ValueError(f"aspect ratio must be within {MAX_ASPECT}:1")
        return value

    @model_validator(mode="after")
    def _needs_something_to_do(self) -> EditRow:
        if not (self.instruction or self.prompt):
            raise ValueError("an edit row needs an instruction (or a prompt)")
        return self


ROW_CLASSES: dict[str, type[CommonParams]] = {"generate": GenerateRow, "edit": EditRow}


def row_class(model: str) -> type[CommonParams]:
    return ROW_CLASSES[MODELS[model].kind]


def rendered_size(width: int, height: int, base_size: int = 1024, multiple: int = 16) -> tuple[int, int]:
    """The size HiDream renders for a requested size: the same aspect at about base_size² pixels,
    each side a multiple of `multiple` (the pipeline's own rule)."""
    scale = math.sqrt(base_size * base_size / (width * height))
    return int(width * scale // multiple * multiple), int(height * scale // multiple * multiple)


class OutputImage(BaseModel):
    s3_uri: str | None = None  # s3://bucket/key, or the local path in `run` mode
    url: str | None = None  # presigned HTTPS URL when configured
    width: int
    height: int
    content_type: str
    b64_json: str | None = None  # only when the row asked for response_format=b64_json


class ItemOutput(BaseModel):
    images: list[OutputImage] = Field(default_factory=list)
    seed: int | None = None
    processed_size: list[int] | None = None  # the canvas the model worked at (edits)
    input_size: list[int] | None = None  # the input image's size after EXIF orientation (edits)
    lora: dict[str, Any] | None = None  # the adapter it ran with: {source, sha256, scale}
    nsfw: list[bool] | None = None  # per image, when a safety checker ran; None when none ran (see `safety`)
    safety: str | None = None  # the checker that ran ("tiny", a weights folder's name) or "off: <why it did not>"


class Timings(BaseModel):
    """The last attempt's time, by stage (s): fetch (edits), the model's own stages (inference_s split into
    text_encode, image_encode, denoise, refine, vae_decode, as far as the runner separates them), encode, upload."""

    started_at: float | None = None  # epoch s when the last attempt started
    queue_wait_s: float | None = None
    fetch_s: float | None = None  # an edit's input: fetched, decoded, fitted to the canvas
    inference_s: float | None = None  # the model's time: the GPU-seconds it used (its share of a micro-batch's)
    text_encode_s: float | None = None
    image_encode_s: float | None = None  # (edits) the source image through the VAE
    denoise_s: float | None = None
    refine_s: float | None = None  # (edits) the refine steps
    vae_decode_s: float | None = None  # latents to images
    model_started_at: float | None = None  # epoch s when the model began it (with inference_s: its model span)
    model_wait_s: float | None = None  # ready for the model → the model began it (another item had the GPU)
    encode_s: float | None = None  # images to PNG/JPEG/WebP bytes
    upload_s: float | None = None  # bytes to the output store
    total_s: float | None = None  # a completed attempt, start to result (before its record's own writes)


class ItemRecord(BaseModel):
    """One manifest row as an item: what to do, and what happened."""

    job_id: str
    item_id: str  # the row's `id`, else its line number
    line: int
    status: ItemStatus = ItemStatus.QUEUED
    params: dict[str, Any] = Field(default_factory=dict)  # normalized row, seed resolved
    metadata: dict[str, Any] = Field(default_factory=dict)  # unknown columns, echoed back
    attempts: int = 0
    seed: int | None = None
    output: ItemOutput | None = None
    error: str | None = None  # why it ended without its output, for people: "InputError: not a JPEG…"
    error_kind: ErrorKind | None = None  # the same for code: what kind of failure (jobs.errors), set with `error`
    timings: Timings = Field(default_factory=Timings)
    enqueued_at: float | None = None
    reason: str | None = None  # why it was cancelled: "cancelled" (cancel JOB) or "expired" (--expires-after)
    round: int = 0  # 0 = first run; n = the n-th `retry JOB` that re-queued it
    round_start_attempts: int = 0  # attempts before this round (the attempt cap counts per round)
    model_revision: str | None = None  # the weights revision its last attempt ran with (hub commit, folder digest)
    created_at: str
    updated_at: str

    @model_validator(mode="before")
    @classmethod
    def _kind_of_an_older_record(cls, data: Any) -> Any:
        """A record written before kinds were stored gets the kind its message names (jobs.errors)."""
        if isinstance(data, dict) and data.get("error") and not data.get("error_kind"):
            data = {**data, "error_kind": recorded_kind(data)}
        return data

    def result_line(self, model: str | None = None) -> dict[str, Any]:
        """The item's line in results.jsonl. `model` and `params` (the row as it ran: its prompt or instruction,
        negative prompt, steps, guidance, size, seed, refine…, job defaults applied) reproduce it alone."""
        return {
            "id": self.item_id,
            "line": self.line,
            "status": self.status,
            "model": model,
            "params": self.params,
            "error": self.error,
            "error_kind": self.error_kind,
            "reason": self.reason,
            "seed": self.seed,
            "metadata": self.metadata,
            "output": self.output.model_dump() if self.output else {"images": [], "seed": self.seed},
            "attempts": self.attempts,
            "timings": self.timings.model_dump(),
            "model_revision": self.model_revision,
        }


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d)?\s*$")
_UNIT = {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
MAX_DURATION_S = 30 * 86400


def parse_duration(text: str) -> float:
    """Seconds in "90", "90s", "15m", "2h" or "1d" (at most 30 days)."""
    match = _DURATION.match(str(text))
    if not match:
        raise InputError(f"expected a duration like 90s, 15m, 2h or 1d (got {text!r})")
    seconds = float(match.group(1)) * _UNIT[match.group(2)]
    if not 0 < seconds <= MAX_DURATION_S:
        raise InputError(f"duration must be more than 0 and at most 30d (got {text!r})")
    return seconds


Priority = Literal["high", "normal", "low"]
# which events a job's webhook gets (Replicate's webhook_events_filter, in our words): "start" (job.running, when its
# first item starts), "progress" (job.progress: counts, rate, ETA, at most every PROGRESS_EVERY s as items end),
# "item" (each item's end: item.completed, item.failed, item.cancelled), "job" (the job's end)
WebhookEvent = Literal["start", "progress", "item", "job"]
WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = ("start", "progress", "item", "job")
PROGRESS_EVERY = 10.0  # s: at most one job.progress event per job this often
DEFAULT_WEBHOOK_EVENTS: list[WebhookEvent] = ["item", "job"]


def parse_webhook_events(text: str | list[str]) -> list[WebhookEvent]:
    """ "item,job" (or a list of names) → the events, checked; an unknown name is an InputError naming it."""
    names = text if isinstance(text, list) else [text]
    events = [n.strip().lower() for name in names for n in str(name).replace(" ", ",").split(",") if n.strip()]
    unknown = [n for n in events if n not in WEBHOOK_EVENTS]
    if unknown or not events:
        raise InputError(
            f"webhook_events: expected some of {', '.join(WEBHOOK_EVENTS)}, comma-separated (got {text!r}); "
            "e.g. job (only the job's end) or start,progress,item,job (everything)"
        )
    return [e for e in WEBHOOK_EVENTS if e in events]


# dreambatch: an event per item and one per job; a vendor's (jobs.vendors): one envelope when the request ends
WebhookFormat = Literal["dreambatch", "fal", "inferencesh", "wavespeed"]


class JobSpec(BaseModel):
    """How a manifest becomes a job: every job option, declared once. The CLI's flags, the API's bodies, a
    schedule and local mode each build one; `jobs.submit.create_job(spec, manifest, services)` makes the job."""

    model_config = ConfigDict(extra="forbid")

    model: str  # one of MODELS
    defaults: dict[str, Any] = Field(default_factory=dict)  # job defaults (`--set`, a preset); a row overrides them
    output: str | None = None  # s3://bucket/prefix or a folder the workers share; None: DREAMBATCH_OUTPUT
    webhook: str | None = None  # POSTed on every item and job terminal state
    webhook_format: WebhookFormat = "dreambatch"
    webhook_events: list[WebhookEvent] = Field(default_factory=lambda: list(DEFAULT_WEBHOOK_EVENTS), min_length=1)
    api: dict[str, Any] = Field(default_factory=dict)  # what the vendor protocol that made it answers with
    priority: Priority = "normal"  # a worker takes high items first, low ones last
    max_concurrency: int | None = Field(None, ge=1)  # at most this many of its items running at once
    expires_after: float | None = Field(None, gt=0, le=MAX_DURATION_S)  # s from submission: items not started
    #                                                                     by then end cancelled, reason "expired"
    review_sheet: bool = False  # write the review contact sheet when the job ends
    schedule: str | None = None  # the catalog schedule whose run this is (jobs.catalog), named on its review sheet
    skip_invalid: bool = False  # queue the valid rows and record the invalid ones as failed (else: queue nothing)
    tenant: str | None = None  # whose job it is (the API key's tenant); None: the operator's (the CLI's)
    catalog: dict[str, Any] | None = None  # a scheduled run's: schedule, sheet, deleted and skipped objects
    check_remote: bool | None = None  # HEAD s3:// inputs, fetch URLs at submit; None: DREAMBATCH_INPUTS__CHECK_REMOTE


class JobRecord(BaseModel):
    job_id: str
    model: str
    priority: Priority = "normal"  # the queue order of its items: high before normal before low
    max_concurrency: int | None = Field(None, ge=1, description="at most this many items running at once")
    expires_at: float | None = None  # epoch s; items not started by then end cancelled, reason "expired"
    defaults: dict[str, Any] = Field(default_factory=dict)
    output: str  # s3://bucket/prefix or a local folder
    webhook: str | None = None
    webhook_format: WebhookFormat = "dreambatch"
    webhook_events: list[WebhookEvent] = Field(default_factory=lambda: list(DEFAULT_WEBHOOK_EVENTS))
    api: dict[str, Any] = Field(default_factory=dict)  # what the vendor protocol that made it answers with
    webhook_disabled: bool = False  # the endpoint answered 410 Gone: no more events for this job
    submitting: bool = False  # its submission has not committed yet: workers hold its items back
    submit_aborted: bool = False  # its submission failed: nothing of it runs
    review_sheet: bool = False  # write the review contact sheet (sheet.html, sheet.png) when the job ends
    schedule: str | None = None  # the catalog schedule whose run made it (None: submitted by hand or over HTTP)
    catalog: dict[str, Any] | None = None  # made by a scheduled run (jobs.catalog): in its job webhook and sheet
    manifest: str | None = None
    status: JobStatus = JobStatus.QUEUED
    total: int = 0
    counts: dict[str, int] = Field(default_factory=dict)
    created_at: str
    updated_at: str
    finished_at: str | None = None
    results_uri: str | None = None
    cancel_requested: bool = False  # `cancel JOB` was asked: running items stop at their next step
    round: int = 0  # how many times `retry JOB` re-opened it
    interrupted_at: str | None = None  # a local run stopped by Ctrl-C then; `dreambatch run … --resume` goes on
    tenant: str | None = None  # the tenant of the API key that made it; None: made by the operator (the CLI)
    gpu_s: float = 0.0  # seconds its items held the model, every attempt counted (the live store's sum)

    def wants(self, event: WebhookEvent) -> bool:
        """Whether its webhook gets `event` events (start, item, job: `webhook_events`)."""
        return bool(self.webhook) and event in self.webhook_events


Event = tuple[str, str | None, str]  # one webhook message: (job_id, item_id or None for the job's own, event_id)


def _round_suffix(round_: int) -> str:
    return f".r{round_}" if round_ else ""


def item_event_id(job_id: str, item_id: str, status: str, round_: int = 0) -> str:
    """The webhook id of an item's terminal event: the same on every redelivery; a retry round gets its own."""
    return f"evt_{job_id}_{item_id}_{status}{_round_suffix(round_)}"


def job_event_id(job_id: str, status: str, round_: int = 0) -> str:
    return f"evt_{job_id}_{status}{_round_suffix(round_)}"


def progress_event_id(job_id: str, ended: int, round_: int = 0) -> str:
    """A job.progress event's id: one per count of ended items (a job event to `event_item_id`)."""
    return job_event_id(job_id, f"progress.{ended}", round_)


def event_item_id(job_id: str, event_id: str) -> str | None:
    """The item an event id names (None for a job event): the inverse of the two functions above."""
    rest = event_id.removeprefix(f"evt_{job_id}_")
    return rest.rsplit("_", 1)[0] if "_" in rest else None


class ApiKeyRecord(BaseModel):
    """An API key as stored: never the token itself, only its SHA-256 (jobs.api.auth)."""

    key_id: str
    name: str
    token_sha256: str
    scopes: list[str]
    created_at: str
    revoked_at: str | None = None
    tenant: str | None = None  # whose jobs the key makes and sees (None, as keys made before tenants: its name)
    prefix: str | None = None  # its jobs write under this prefix of the output location
    rate: int | None = None  # at most this many requests a minute (then 429 with Retry-After)

    @property
    def owner(self) -> str:
        """The tenant the key's jobs belong to."""
        return self.tenant or self.name
