"""One typed Settings object, read from the environment once, by `get_settings()`.

Variables use the prefix `DREAMBATCH_` (nested with `__`, e.g. `DREAMBATCH_CELERY__VISIBILITY_TIMEOUT`).
S3 credentials and endpoint come from boto3's own variables (`AWS_ENDPOINT_URL_S3`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`), which boto3 reads itself.
Tests build a `Settings(...)` directly and pass it in; nothing is constructed at import time.

`get_settings()` (the one accessor the commands use) also reads `.env` in the current directory when there is
one — the file docker compose reads — for every variable the environment does not set (AWS_* and HF_* too,
so boto3 and huggingface_hub see them); `DREAMBATCH_ENV_FILE` names another file, or "" for none.
A `Settings(...)` built directly never reads it.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from jobs.envfile import load_env_file
from jobs.errors import ConfigError


class CelerySettings(BaseModel):
    task_time_limit: int = Field(3000, description="hard limit (s) for one item on a GPU worker")
    visibility_timeout: int = Field(3600 + 600, description="redelivery after this many s unacked; > time limit")
    max_attempts: int = Field(3, description="an item that started this many times without ending fails")
    publish_batch: int = Field(500, description="tasks published per producer batch at submit")
    restore_interval: int = Field(10, description="s between scans that redeliver expired unacked tasks")
    lease_ttl: int = Field(60, description="s an item's execution lease lives unless its worker renews it")
    submit_grace: int = Field(900, description="s after which items of a submission that never committed are dropped")
    reconcile_interval: int = Field(300, description="s between sweeps for jobs whose live state was lost; 0: off")
    slot_wait: float = Field(2.0, description="s before an item over its job's --max-concurrency is tried again")
    heartbeat: float = Field(5.0, description="s between a worker's heartbeats in Redis (dreambatch top)")
    recovery_interval: float = Field(
        15.0, description="s between scans that re-queue the items of a dead worker (lease gone, no heartbeat); 0: off"
    )

    @model_validator(mode="after")
    def _visibility_above_time_limit(self) -> CelerySettings:
        if self.lease_ttl < 3:
            raise ValueError(f"lease_ttl ({self.lease_ttl}s) must be at least 3s: it is renewed every third of it")
        if self.visibility_timeout <= self.task_time_limit:
            raise ValueError(
                f"visibility_timeout ({self.visibility_timeout}s) must exceed task_time_limit "
                f"({self.task_time_limit}s), or a running item is delivered a second time"
            )
        return self


class S3Settings(BaseModel):
    endpoint_url: str | None = Field(None, description="defaults to boto3's AWS_ENDPOINT_URL_S3")
    region: str | None = None
    presign_expires: int = Field(0, description="seconds; >0 adds presigned HTTPS URLs to results")
    public_endpoint_url: str | None = Field(
        None,
        description="the S3 endpoint presigned links name, as clients reach it (compose: http://127.0.0.1:9000, "
        "where workers use http://minio:9000); default: the endpoint dreambatch uses",
    )
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    max_attempts: int = 5
    outage_wait: float = Field(
        60.0,
        description="s an item waits, in its thread, for S3 to answer again before it hands its message back to "
        "the broker (an outage spends none of an item's attempts, up to s3.outage_limit)",
    )
    outage_limit: float = Field(
        1800.0,
        description="s an item waits for S3 without spending attempts; past it, S3 errors count as attempts and "
        "an item S3 keeps refusing ends failed after celery.max_attempts",
    )


class WebhookSettings(BaseModel):
    timeout: float = Field(15.0, description="s for one delivery attempt, in all (connect, headers, body)")
    retry_window: float = Field(86400.0, description="s after an event's first attempt during which it is retried")
    max_attempts: int = Field(0, description="stop after this many attempts even inside the window; 0: no cap")
    backoff_base: float = Field(5.0, description="s before the second attempt; doubles each time")
    backoff_max: float = Field(3600.0, description="longest wait between attempts; below the visibility timeout")


class InputSettings(BaseModel):
    max_bytes: int = Field(50 * 2**20, description="largest input image file")
    max_pixels: int = Field(64_000_000, description="larger images fail their item (decompression bombs)")
    download_timeout: float = Field(30.0, description="s for one URL download, redirects included")
    check_remote: bool = Field(
        True, description="at submit and validate, HEAD s3:// inputs and fetch URL inputs (off: the worker does)"
    )
    check_workers: int = Field(8, ge=1, description="input checks at once at submit")
    check_budget_s: float = Field(120.0, gt=0, description="s into a submission after which no network check starts")


class ApiSettings(BaseModel):
    wait_timeout: float = Field(
        600.0,
        description="s a waiting request (/v1/images, fal's run, WaveSpeed's sync "
        "mode) waits for its job; shortened to end before the client's "
        "own read timeout when it sends one",
    )
    url_expires: int = Field(3600, description="s a presigned (or served) image URL in a response stays valid")
    max_upload_bytes: int = Field(50 * 2**20, description="largest uploaded manifest or image (vendor uploads too)")
    max_json_rows: int = Field(10_000, description="rows in one JSON POST /v1/jobs body; upload a file for more")
    public_url: str | None = Field(None, description="base URL clients reach the API at (default: the request's)")
    url_secret: str | None = Field(None, description="signs served image URLs; random per process when unset")
    retry_window: float = Field(
        30.0,
        ge=0,
        description="s within which the same request body from the same key "
        "attaches to the job it made (clients that retry a POST "
        "without marking it); 0 = off",
    )
    ssl_certfile: str | None = Field(None, description="serve HTTPS with this certificate (PEM); with ssl_keyfile")
    ssl_keyfile: str | None = Field(None, description="the certificate's private key (PEM)")


class SafetySettings(BaseModel):
    """The safety checker workers run on outputs (worker/safety.py)."""

    checker: str = Field(
        "off",
        description="off, tiny (random weights, for tests), or a local folder (or a hub id "
        "in the local cache) laid out as CompVis/stable-diffusion-safety-checker",
    )
    action: Literal["flag", "black"] = Field(
        "flag",
        description="flag: report flagged images and keep them; black: also replace them with black images "
        "(as diffusers' pipelines do)",
    )
    device: str | None = Field(None, description="where the checker runs (default: the worker's --device)")


class CatalogSettings(BaseModel):
    schedules_file: str = Field("ops/schedules.toml", description="the schedules (TOML); relative to the cwd")
    presets_file: str | None = Field(None, description="your presets (TOML), on top of ops/presets.toml")
    beat_interval: float = Field(5.0, description="s between beat ticks at most")
    beat_lock_ttl: float = Field(30.0, description="s a beat keeps the lock without renewing it")
    max_objects: int = Field(1_000_000, description="objects one prefix scan may list")
    max_manifest_bytes: int = Field(256 * 2**20, description="largest manifest a schedule downloads")
    run_lock_ttl: float = Field(
        60.0,
        ge=1,
        description="s a schedule's run lock outlives its holder; renewed every third of it while the run goes",
    )
    run_retries: int = Field(10, ge=0, description="retries of a fired run that failed for a transient reason")
    run_retry_base: float = Field(30.0, gt=0, description="s before the first retry of a fired run; doubles")
    run_retry_max: float = Field(600.0, gt=0, description="longest wait between two retries of a fired run")
    max_failures: int = Field(
        3,
        ge=0,
        description="runs in a row an image may fail with the same fingerprint "
        "before its schedule skips it; 0 = never skip",
    )


class RunnerSettings(BaseModel):
    """How a GPU worker runs its model (docs/benchmarks.md has what each one gains), and where the components
    its weights folder does not hold are found (a folder, or a hub id in the local cache)."""

    i1_full: str | None = Field(
        None,
        description="HiDream-I1-Full: E1-Full's base transformer and both E1 models' VAE, text encoders and "
        "scheduler (default: the E1 folder's refine/, then the hub cache)",
    )
    llama: str | None = Field(
        None,
        description="Llama 3.1 8B Instruct, text encoder 4 (default: the pipeline folder's text_encoder_4/, "
        "then the hub cache under meta-llama/Llama-3.1-8B-Instruct or Meta-Llama-3.1-8B-Instruct)",
    )

    moe: Literal["auto", "grouped", "dense", "off"] = Field(
        "auto", description="expert routing: grouped/dense are sync-free; off = diffusers'; auto picks per device"
    )
    prompt_cache_mb: int = Field(1024, ge=0, description="encoded prompts kept per worker, MiB; 0 = off")
    memory_plan: Literal["auto", "resident", "text-cpu", "text-stream", "int8", "stream", "int8-stream"] = Field(
        "auto",
        description="what lives on the GPU, what in CPU memory, what in int8 (docs/memory.md); auto: the "
        "fastest plan that fits the card's free memory (on a CPU device: resident)",
    )
    text_encoders: Literal["auto", "device", "cpu"] = Field(
        "auto",
        description="older spelling of memory_plan, used while memory_plan is auto: cpu = text-cpu, device = resident",
    )
    batch_max: int = Field(1, ge=0, description="most I1 items denoised together; 1 = off, 0 = from free GPU memory")
    lora_cache: int = Field(4, ge=1, description="user LoRA adapters kept loaded per worker (least recently used go)")
    lora_dir: str = Field("~/.cache/dreambatch/loras", description="where workers keep the LoRA files rows name")
    batch_window_ms: float = Field(20.0, ge=0, description="how long a batch waits for more items to arrive")
    fold_padding: bool = Field(True, description="non-square latents: one token stands for the padding")
    model_cpus: str = Field(
        "auto",
        pattern=r"^(auto|off|\d+(-\d+)?(,\d+(-\d+)?)*)$",
        description="the CPUs a GPU worker's model process keeps to (e.g. 3 or 0-3,8); auto: N of its own when "
        "OMP_NUM_THREADS=N is fewer than the worker's CPUs (chosen by device index), else wherever the OS puts it; "
        "off: wherever the OS puts it",
    )
    compile: Literal["off", "inductor", "cudagraphs", "aot_eager", "eager"] = Field(
        "off",
        description="torch.compile each transformer block with this backend (one graph per block when "
        "the expert routing is sync-free); the first items pay the compile time",
    )

    @model_validator(mode="after")
    def _one_memory_setting(self) -> RunnerSettings:
        if self.memory_plan != "auto" and self.text_encoders != "auto":
            raise ValueError(
                f"runner.text_encoders={self.text_encoders!r} and runner.memory_plan={self.memory_plan!r} are both "
                "set; set memory_plan alone (text_encoders=cpu is memory_plan=text-cpu, device is resident)"
            )
        return self

    def effective_memory_plan(self) -> str:
        """`memory_plan`, or while it is auto what the older `text_encoders` asks for (cpu: text-cpu, device:
        resident)."""
        if self.memory_plan == "auto":
            return {"cpu": "text-cpu", "device": "resident"}.get(self.text_encoders, "auto")
        return self.memory_plan


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DREAMBATCH_", env_nested_delimiter="__", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_retry_s: float = Field(120.0, description="s a Redis call or a publish keeps retrying while Redis is down")
    redis_wait_s: float = Field(
        3.0,
        ge=0,
        description="s a command a person runs (status, submit, keys…) waits for "
        "Redis to answer before it says it cannot reach it",
    )
    reconcile_locations: str = Field(
        "", description="output locations (comma-separated) swept for lost jobs, besides DREAMBATCH_OUTPUT"
    )
    output: str | None = Field(None, description="default output location, s3://bucket/prefix")
    retention: float = Field(
        0.0,
        ge=0,
        description="s after a job ends that its live state stays in Redis (an I/O worker's sweep then purges "
        "it; the durable record stays); 0: kept until `dreambatch purge`",
    )
    webhook_secret: str | None = Field(
        None, description="whsec_… secret that signs webhooks; several (space or comma separated) while rotating keys"
    )
    input_roots: str = Field("", description="extra folders (comma-separated) local input paths may come from")
    allow_private_hosts: str = Field("", description="hosts or CIDRs (comma-separated) URLs may reach though private")
    inputs: InputSettings = InputSettings()
    celery: CelerySettings = CelerySettings()
    s3: S3Settings = S3Settings()
    webhooks: WebhookSettings = WebhookSettings()
    api: ApiSettings = ApiSettings()
    catalog: CatalogSettings = CatalogSettings()
    runner: RunnerSettings = RunnerSettings()
    safety: SafetySettings = SafetySettings()

    @model_validator(mode="after")
    def _webhook_waits_below_visibility(self) -> Settings:
        if self.webhooks.backoff_max >= self.celery.visibility_timeout:
            raise ValueError(
                f"webhooks.backoff_max ({self.webhooks.backoff_max}s) must stay below celery.visibility_timeout "
                f"({self.celery.visibility_timeout}s): a retry waiting longer is delivered twice"
            )
        return self

    def signing_secrets(self) -> list[str]:
        """Every configured webhook secret; during a key rotation each event carries one signature per secret."""
        return [s for s in (self.webhook_secret or "").replace(",", " ").split() if s]

    def netpolicy(self):
        from jobs.netguard import Policy

        return Policy.from_setting(self.allow_private_hosts)

    def roots(self) -> list[str]:
        return [r.strip() for r in self.input_roots.split(",") if r.strip()]

    def s3_endpoint(self) -> str | None:
        return self.s3.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, built on first use from the environment and `.env` (see the module docstring).
    Invalid values are a ConfigError naming the setting."""
    read = load_env_file()
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        loc = [str(p) for p in first["loc"]]
        nested = len(loc) == 1 and isinstance(getattr(Settings.model_fields.get(loc[0]), "default", None), BaseModel)
        variable = "DREAMBATCH_" + "__".join(loc).upper() + ("__…" if nested else "") if loc else "DREAMBATCH_…"
        raise ConfigError(
            f"setting {where}: {first['msg'].removeprefix('Value error, ')}; fix {variable} in the "
            f"environment{f' or {read}' if read else ''}"
        ) from None
