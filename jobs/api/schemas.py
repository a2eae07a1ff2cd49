"""Response shapes, for the OpenAPI document (routes build plain dicts; these describe them)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel


class Counts(BaseModel):
    total: int
    queued: int
    running: int
    completed: int
    failed: int
    cancelled: int


class RunningItem(BaseModel):
    id: str
    step: int  # denoising steps done
    steps: int  # of this many


class JobStatus(BaseModel):
    id: str
    object: Literal["job"] = "job"
    status: Literal["queued", "running", "completed", "failed", "cancelled"]
    model: str
    counts: Counts
    rate_per_s: float
    eta_s: float | None
    gpu_s: float = 0.0  # seconds its items held the model, every attempt counted
    running: list[RunningItem] = []  # running items' denoising progress
    priority: Literal["high", "normal", "low"]
    max_concurrency: int | None
    expires_at: float | None
    cancel_requested: bool
    round: int
    schedule: str | None = None  # the catalog schedule whose run this is
    webhook: str | None
    webhook_events: list[str] = ["item", "job"]
    results_uri: str | None
    created_at: str
    finished_at: str | None
    warning: str | None = None  # e.g. no live worker serves the queues the job needs: which one to start


class JobCreated(JobStatus):
    queued: int | None = None
    rejected: int | None = None
    notes: list[str] | None = None


class JobRequeued(JobStatus):
    requeued: list[str]


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobStatus]


class ItemList(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]  # results lines: id, line, status, error, error_kind, reason, seed, metadata, output, …
    total: int
    next_offset: int | None


class ImageData(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str | None = None
    size: str | None = None
    id: str  # the job id
    has_nsfw_concepts: list[bool] | None = None  # one per image when a safety checker ran; null when none did
    safety_checker: str  # the checker that ran, or "off: …" (why none did)


class ErrorBody(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None
    errors: list[str] | None = None


class Error(BaseModel):
    error: ErrorBody


class Problem(BaseModel):
    """RFC 9457 problem details (inference.sh's errors)."""

    type: str
    title: str
    status: int
    detail: str
    code: str | None = None
    errors: list[str] | None = None


class WaveSpeedError(BaseModel):
    code: int
    message: str
    data: None = None


class FalError(BaseModel):
    detail: str | list[dict[str, Any]]
    error_type: str | None = None


class FalSubmitted(BaseModel):
    request_id: str
    gateway_request_id: str
    response_url: str
    status_url: str
    cancel_url: str
    queue_position: int | None = None


class FalStatus(BaseModel):
    status: Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    request_id: str
    response_url: str
    status_url: str
    cancel_url: str
    queue_position: int | None = None  # IN_QUEUE only: 0-based, an upper bound
    logs: list[dict[str, Any]] | None  # null unless ?logs=true
    metrics: dict[str, float | None] | None = None  # COMPLETED only: inference_time (s)
    error: str | None = None  # COMPLETED without images: why
    error_type: str | None = None  # ... and its kind (input, model, transient, lost, cancelled, …)


class FalImage(BaseModel):
    url: str | None  # a data URI with sync_mode
    width: int
    height: int
    content_type: str


class FalResult(BaseModel):
    images: list[FalImage]
    seed: int | None
    prompt: str | None
    has_nsfw_concepts: list[bool] | None  # null when no safety checker ran
    safety_checker: str  # the checker that ran, or "off: …"
    timings: dict[str, float | None]
